"""Host -> device fetch of selected memory chunks: the K̄/V̄ rows a router layer selected.

A served bank keeps each router layer's pooled K̄ and V̄ in pinned host memory, one row per
64-token chunk (`[chunks, kv_heads, head_dim]`, e.g. 8 x 128 bf16 = 2 KiB). Routing picks
documents; their chunks (ascending document, then chunk) must land in a device staging buffer
before memory attention. Two ways to move them, both bit-exact copies:

* `gather_rows` — one Triton kernel for K and V together that reads the host rows **through
  their mapped device pointers** (UVA zero-copy: pinned memory from `cudaHostAlloc`, which is
  what `Tensor.pin_memory()` uses, is mapped into the device's address space; Triton's launcher
  turns a pinned CPU tensor's `data_ptr()` into its device pointer with
  `cuPointerGetAttribute(CU_POINTER_ATTRIBUTE_DEVICE_POINTER)`). Each program copies blocks
  of `block_rows` rows with 16-byte loads; rows may be in any order and repeat; the rows land
  in `dst[0:n]` or, with `dst_rows`, in arbitrary destination rows (pool slots). Host-side
  row indices are read through UVA too (pinned first if they are not), so no separate index
  upload is issued. After the first call of a shape the compiled kernel is launched directly
  (Triton's per-call binding costs more host time than a small fetch's copy).
* `copy_runs` — the DMA baseline: one `cudaMemcpyAsync` (`dst[a:b].copy_(src[c:d],
  non_blocking=True)`) per run of consecutive rows (a document's chunks), for K and for V.
  Launch-bound when runs are short: a document of ~8 chunks is a 16 KiB copy.

Measured (benchmarks/results/fetch-nvidia-h100-80gb-hbm3.json: H100 80GB HBM3, PCIe gen 5
x16, MSA-4B shape, 18 layers x 16 documents x ~8 chunks per request, one fetch per layer):
at 64 requests a step (577 MiB) the kernel moves 49.7 GB/s, 0.91x the 54.8 GB/s of one
contiguous pinned copy of the same bytes; at 8 requests 0.82x; at 1 request (0.5 MiB a
layer) it is bound by host time per call (~40 µs with device row indices, ~80 µs with
pageable host ones), 0.14x. `copy_runs` reaches 0.8-1.4 GB/s (~12 µs of host time per
cudaMemcpyAsync; 437 ms a step at 64 requests). A third way was measured and dropped: the
same runs through one `cuMemcpyBatchAsync` per layer (ctypes, CUDA 13 driver): ~9 µs of host
time per run inside the driver (6.3 / 26 ms a step at 1 / 8 requests vs the kernel's 1.8 /
1.9 ms in the same run), and the process died at 64 requests (2,048 copies in one call).

Every path issues its work on a given stream (default: the current one), first making that
stream wait for the current stream (so inputs produced there are ready), and returns a CUDA
event recorded after the copy: wait on it (`torch.cuda.current_stream().wait_event(ev)`) before
reading the destination. Callers that free or reuse `dst` must keep it alive until the event
has completed (or `dst.record_stream(stream)`).

`gather_rows_reference` (`src[rows].to(device)`) is the torch reference the tests compare
with. Triton is imported lazily: importing this module needs neither Triton nor a GPU.
The measured choice between the paths (see benchmarks/fetch.py and its results) is
`DEFAULT_METHOD`, used by `fetch_rows`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
from typing import Any

import torch

try:  # the dequantising row copy the kernels call (a Triton function: looked up as a global)
    from .fp8_rows import copy_fp8_rows
except ImportError:  # pragma: no cover - no Triton: the kernels are never built
    copy_fp8_rows = None

__all__ = [
    "DEFAULT_METHOD",
    "GatherConfig",
    "copy_runs",
    "fetch_rows",
    "gather_rows",
    "gather_rows_reference",
    "row_runs",
]

# What benchmarks/fetch.py measured best at 64 requests per step (see its results JSON).
DEFAULT_METHOD = "gather"


class GatherConfig:
    """Launch shape of the gather kernel.

    block_rows: rows per program iteration (each row read once for K, once for V);
    num_warps: warps per program; max_programs: cap on the grid (None: one program per
    block of rows; a cap makes the programs loop, leaving SMs to concurrent compute).
    tile_bytes: the most bytes of one row handled per inner step (longer rows are split).

    Defaults from the launch-shape sweep of benchmarks/fetch.py (MSA-4B rows of 2 KiB, 64
    requests per step, H100 and H200, PCIe gen 5): PCIe read bandwidth needs enough bytes in
    flight, i.e. programs x block_rows x 2 rows; 16 programs of 16 rows (8 warps) reach the
    same ~49-50 GB/s as one program per block of rows, while holding 16 of the 132 SMs."""

    block_rows: int = 16
    num_warps: int = 8
    max_programs: int | None = 16
    tile_bytes: int = 8192


# ------------------------------------------------------------------ helpers (CPU-safe)
_WORD_BYTES = {torch.int32: 4, torch.int16: 2, torch.uint8: 1}


def _word_dtype(row_bytes: int) -> torch.dtype:
    for size, dtype in ((4, torch.int32), (2, torch.int16)):
        if row_bytes % size == 0:
            return dtype
    return torch.uint8


def _row_bytes(t: torch.Tensor) -> int:
    return math.prod(t.shape[1:]) * t.element_size()


def _check(src_k: torch.Tensor, src_v: torch.Tensor, dst_k: torch.Tensor,
           dst_v: torch.Tensor, pinned: bool = True, scales: Any = None) -> None:
    fp8 = scales is not None
    if fp8 != (src_k.dtype == torch.float8_e4m3fn):
        raise ValueError("fetch: an FP8 source needs its scales (and only an FP8 source has "
                         "them)")
    if fp8 and any(s.shape != src_k.shape[:2] or s.dtype != torch.float32 or
                   not s.is_contiguous() for s in scales):
        raise ValueError(f"fetch: FP8 scales must be float32 {tuple(src_k.shape[:2])}, "
                         "contiguous")
    if src_k.shape != src_v.shape or src_k.dtype != src_v.dtype:
        raise ValueError(f"fetch: K {tuple(src_k.shape)} {src_k.dtype} and V "
                         f"{tuple(src_v.shape)} {src_v.dtype} sources differ")
    for name, dst in (("K", dst_k), ("V", dst_v)):
        if dst.device.type != "cuda":
            raise ValueError(f"fetch: the {name} destination must be on a CUDA device")
        if (dst.dtype != src_k.dtype and not fp8) or dst.shape[1:] != src_k.shape[1:]:
            raise ValueError(
                f"fetch: {name} destination {tuple(dst.shape)} {dst.dtype} does not hold rows "
                f"of the source {tuple(src_k.shape[1:])} {src_k.dtype}")
    for name, src in (("K", src_k), ("V", src_v)):
        if src.device.type == "cpu" and (pinned and not src.is_pinned()):
            raise ValueError(f"fetch: the {name} source is in pageable host memory; the device "
                             "reads only pinned host memory (Tensor.pin_memory())")


def _check_rows(rows: torch.Tensor, num_src: int, what: str) -> None:
    if rows.dtype != torch.int64 or rows.dim() != 1:
        raise ValueError(f"fetch: {what} must be a 1-D int64 tensor")
    if rows.device.type == "cpu" and rows.numel():
        lo, hi = (int(x) for x in torch.aminmax(rows))
        if lo < 0 or hi >= num_src:
            raise IndexError(f"fetch: {what} out of range [0, {num_src}): min {lo}, max {hi}")


def row_runs(rows: torch.Tensor, dst_rows: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Maximal runs of consecutive source rows that also land in consecutive destination
    rows: (source start, destination start, length), each a CPU int64 tensor."""
    rows = rows.to("cpu", torch.int64)
    n = rows.numel()
    dst = torch.arange(n, dtype=torch.int64) if dst_rows is None else dst_rows.to(
        "cpu", torch.int64)
    if n == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty, empty
    breaks = (rows[1:] - rows[:-1] != 1) | (dst[1:] - dst[:-1] != 1)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64),
                        torch.nonzero(breaks).flatten() + 1])
    lengths = torch.diff(starts, append=torch.tensor([n]))
    return rows[starts], dst[starts], lengths


def gather_rows_reference(src: torch.Tensor, rows: torch.Tensor,
                          device: torch.device | str) -> torch.Tensor:
    """The torch reference: `src[rows]` moved to `device`."""
    return src[rows.to(src.device)].to(device)


# Host tensors a launched kernel still reads (pinned row indices), kept alive until its event.
_IN_FLIGHT: collections.deque[tuple[torch.cuda.Event, tuple[torch.Tensor, ...]]] = (
    collections.deque())


def _keep_until(event: torch.cuda.Event, tensors: tuple[torch.Tensor, ...]) -> None:
    while _IN_FLIGHT and _IN_FLIGHT[0][0].query():
        _IN_FLIGHT.popleft()
    if tensors:
        _IN_FLIGHT.append((event, tensors))


def _kernel_rows(rows: torch.Tensor, device: torch.device, keep: list) -> torch.Tensor:
    """Row indices as the kernel reads them: on the device, or pinned host memory read
    through UVA like the bank itself (no separate upload; pageable indices are pinned
    first), 16-byte aligned (the variant the engine's warm-up compiled). Host indices are
    kept alive until the launch's event has completed."""
    rows = rows.contiguous()  # the kernel reads them densely
    if rows.data_ptr() % 16:  # a row slice: Triton would compile an unaligned variant
        rows = rows.clone()
    if rows.device.type == "cuda":
        return rows if rows.device == device else rows.to(device, non_blocking=True)
    if not rows.is_pinned():
        rows = rows.pin_memory()
    keep.append(rows)
    return rows


# ------------------------------------------------------------------ Triton gather kernel
@functools.cache
def _gather_kernel() -> Any:
    import triton
    import triton.language as tl

    # Row counts vary per call: don't compile a variant per divisibility of n_rows.
    @triton.jit(do_not_specialize=["n_rows", "num_blocks"])
    def gather_kv_kernel(src_k, src_v, dst_k, dst_v, rows, dst_rows, scale_k, scale_v, n_rows,
                         num_blocks, ROW: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_C: tl.constexpr, SCATTER: tl.constexpr, FP8: tl.constexpr,
                         HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
        # src_*: [*, ROW] words (pinned host through UVA, or device); dst_*: [*, ROW] words.
        # FP8: src_* are e4m3 bytes [*, HEADS, HEAD_DIM] with float32 scales [*, HEADS],
        # dst_* typed rows of the model dtype (dequantised on the way: `fp8_rows.py`).
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        r_in = tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        for blk in range(pid, num_blocks, nprog):
            r = blk * BLOCK_R + r_in
            rmask = r < n_rows
            src_row = tl.load(rows + r, mask=rmask, other=0).to(tl.int64)
            rmask = rmask & (src_row >= 0)  # a negative row is a hole: nothing to copy
            if SCATTER:
                dst_row = tl.load(dst_rows + r, mask=rmask, other=0).to(tl.int64)
            else:
                dst_row = r.to(tl.int64)
            if FP8:
                copy_fp8_rows(src_k, src_v, scale_k, scale_v, dst_k, dst_v, src_row, dst_row,
                              rmask, HEADS, HEAD_DIM, D_PAD)
            else:
                src_base = src_row * ROW
                dst_base = dst_row * ROW
                for c0 in tl.static_range(0, ROW, BLOCK_C):
                    c = c0 + cols
                    if ROW % BLOCK_C == 0:  # (a compile-time branch)
                        mask = rmask[:, None]
                    else:
                        mask = rmask[:, None] & (c < ROW)[None, :]
                    s_off = src_base[:, None] + c[None, :]
                    d_off = dst_base[:, None] + c[None, :]
                    k = tl.load(src_k + s_off, mask=mask)
                    v = tl.load(src_v + s_off, mask=mask)
                    tl.store(dst_k + d_off, k, mask=mask)
                    tl.store(dst_v + d_off, v, mask=mask)

    return gather_kv_kernel


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


class _Words:
    """A pointer argument for Triton: a contiguous tensor's memory seen as integer words.
    Triton's launcher needs only `data_ptr()` and `dtype` (it maps a pinned host pointer to
    its device pointer itself); this skips the view ops a reinterpreting view would cost."""

    __slots__ = ("_ptr", "dtype")

    def __init__(self, t: torch.Tensor, dtype: torch.dtype) -> None:
        if not t.is_contiguous():
            raise ValueError("fetch: source and destination must be contiguous row-major "
                             "tensors")
        self._ptr = t.data_ptr()
        self.dtype = dtype

    def data_ptr(self) -> int:
        return self._ptr


_WRAP_POINTERS = True


def _use_views() -> None:
    global _WRAP_POINTERS
    _WRAP_POINTERS = False


def _typed(t: torch.Tensor) -> Any:
    """A typed pointer argument (FP8 dequantisation's destinations and scales)."""
    return _Words(t, t.dtype) if _WRAP_POINTERS else t


def fp8_layout(src: torch.Tensor, scales: Any) -> tuple[bool, int, int, int]:
    """The kernels' FP8 constants for rows of `src` [N, heads, head_dim]: (FP8, HEADS,
    HEAD_DIM, D_PAD); (False, 1, 1, 1) for a full-precision source."""
    if scales is None:
        return (False, 1, 1, 1)
    heads, head_dim = src.shape[1], math.prod(src.shape[2:])
    return (True, heads, head_dim, _next_pow2(head_dim))


def _word_view(t: torch.Tensor, word: torch.dtype) -> torch.Tensor:
    """`t` [rows, ...] (contiguous) as [rows, row_words] integer words (a reinterpreting
    view: the copy is bit-exact and never touches floating-point values)."""
    if not t.is_contiguous():
        raise ValueError("fetch: source and destination must be contiguous row-major tensors")
    flat = t.view(t.shape[0], math.prod(t.shape[1:]))
    return flat.view(torch.uint8) if word == torch.uint8 else flat.view(torch.uint8).view(word)


def _on_device(device: torch.device) -> Any:
    if device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _on_stream(stream: torch.cuda.Stream, current: torch.cuda.Stream) -> Any:
    return contextlib.nullcontext() if stream == current else torch.cuda.stream(stream)


def _check_destination_rows(rows: torch.Tensor, dst_rows: torch.Tensor | None,
                            dst_k: torch.Tensor, dst_v: torch.Tensor) -> None:
    if dst_rows is not None:
        _check_rows(dst_rows, dst_k.shape[0], "dst_rows")
        if dst_rows.numel() != rows.numel():
            raise ValueError("fetch: dst_rows and rows differ in length")
    elif rows.numel() > min(dst_k.shape[0], dst_v.shape[0]):
        raise ValueError(f"fetch: {rows.numel()} rows do not fit destinations of "
                         f"{dst_k.shape[0]} rows")


def _work_stream(stream: torch.cuda.Stream | None, wait: bool
                 ) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
    """(the stream to work on, the current one); the former waits for the latter if asked."""
    current = torch.cuda.current_stream()
    if stream is None:
        return current, current
    if wait and stream != current:
        stream.wait_stream(current)
    return stream, current


@functools.cache
def _shape(row_bytes: int, block_rows: int, tile_bytes: int
           ) -> tuple[torch.dtype, int, int, int]:
    """(word dtype, words per row, column tile, rows per block) for a row size."""
    word = _word_dtype(row_bytes)
    word_bytes = _WORD_BYTES[word]
    row_words = row_bytes // word_bytes
    block_c = min(_next_pow2(row_words), max(1, _next_pow2(tile_bytes // word_bytes)))
    return word, row_words, block_c, _next_pow2(block_rows)


def gather_rows(src_k: torch.Tensor, src_v: torch.Tensor, rows: torch.Tensor,
                dst_k: torch.Tensor, dst_v: torch.Tensor, *,
                dst_rows: torch.Tensor | None = None,
                scales: tuple[torch.Tensor, torch.Tensor] | None = None,
                stream: torch.cuda.Stream | None = None, wait: bool = True,
                block_rows: int | None = None, num_warps: int | None = None,
                max_programs: int | None = -1) -> torch.cuda.Event:
    """Copy `src_k[rows]`, `src_v[rows]` into `dst_k[:n]`, `dst_v[:n]` (or into rows
    `dst_rows` of them) with one Triton launch on `stream`; returns an event recorded after it.

    src_k, src_v: `[N, ...]` contiguous, pinned host memory (read through UVA) or device.
    rows (and dst_rows): int64 `[n]`, any order, repeats allowed. On the host they are
    range-checked and read by the kernel through UVA (pageable ones are pinned first; a
    caller's pinned tensor must stay unchanged until the event completes); on the device they
    are trusted (an out-of-range row is a device fault) and a negative row is skipped (a
    hole in a reservation the device filled without the host knowing its size).
    dst_k, dst_v: device `[M, ...]` contiguous, same row shape and dtype, M >= n (M > every
    `dst_rows` entry). Launch shape: `GatherConfig` unless given (`max_programs=None`: one
    program per block of rows). `scales`: an FP8 source's float32 [N, heads] scales (K, V;
    where the source is), dequantised into dst's dtype on the device (`fp8_rows.py`)."""
    _check(src_k, src_v, dst_k, dst_v, pinned=False, scales=scales)
    _check_rows(rows, src_k.shape[0], "rows")
    n = rows.numel()
    _check_destination_rows(rows, dst_rows, dst_k, dst_v)
    device = dst_k.device
    with _on_device(device):
        stream, current = _work_stream(stream, wait)
        event = torch.cuda.Event()
        keep: list[torch.Tensor] = []
        with _on_stream(stream, current):
            if n:
                _launch(src_k, src_v, rows, dst_k, dst_v, dst_rows, n, device, stream,
                        block_rows, num_warps, max_programs, keep, scales)
            event.record(stream)
        if keep or _IN_FLIGHT:
            _keep_until(event, tuple(keep))
    return event


def _launch(src_k, src_v, rows, dst_k, dst_v, dst_rows, n, device, stream, block_rows,
            num_warps, max_programs, keep, scales=None) -> None:
    word, row_words, block_c, block_r = _shape(_row_bytes(src_k),
                                               block_rows or GatherConfig.block_rows,
                                               GatherConfig.tile_bytes)
    fp8 = fp8_layout(src_k, scales)
    num_warps = num_warps or GatherConfig.num_warps
    num_blocks = -(-n // block_r)
    cap = GatherConfig.max_programs if max_programs == -1 else max_programs
    grid0 = min(num_blocks, cap) if cap else num_blocks
    rows_k = _kernel_rows(rows, device, keep)
    dst_k_rows = _kernel_rows(dst_rows, device, keep) if dst_rows is not None else rows_k
    consts = (row_words, block_r, block_c, dst_rows is not None, *fp8)
    try:
        while True:
            wrap = _Words if _WRAP_POINTERS else _word_view
            if fp8[0]:
                src = (wrap(src_k, torch.uint8), wrap(src_v, torch.uint8))
                dst = (_typed(dst_k), _typed(dst_v))
                scale = (_typed(scales[0]), _typed(scales[1]))
            else:
                src = (wrap(src_k, word), wrap(src_v, word))
                dst = (wrap(dst_k, word), wrap(dst_v, word))
                scale = (rows_k, rows_k)  # (unused)
            args = (*src, *dst, rows_k, dst_k_rows, *scale, n, num_blocks)
            try:
                _run_kernel(grid0, args, consts, num_warps, word, device, stream)
                break
            except (TypeError, AttributeError):
                if wrap is _word_view:
                    raise
                _use_views()  # a Triton whose launcher wants real tensors
    except ValueError as e:
        for name, src in (("K", src_k), ("V", src_v)):
            if src.device.type == "cpu" and not src.is_pinned():
                raise ValueError(f"fetch: the {name} source is in pageable host memory; the "
                                 "device reads only pinned host memory (Tensor.pin_memory())"
                                 ) from e
        raise


# Compiled kernels by specialization, launched the way Triton's JITFunction.run launches them
# but without its per-call argument binding and cache lookup (~15 µs of host time a call, more
# than a small fetch's copy). Only for 16-byte-aligned pointers (what Triton specializes on;
# the row counts are not specialized) and 32-bit row counts; anything else, or a Triton whose
# launcher differs, takes the plain launch.
_COMPILED: dict[tuple, Any] = {}
_FAST_LAUNCH = True


def _run_kernel(grid0: int, args: tuple, consts: tuple, num_warps: int, word: torch.dtype,
                device: torch.device, stream: torch.cuda.Stream) -> None:
    global _FAST_LAUNCH
    aligned = ((args[0].data_ptr() | args[1].data_ptr() | args[2].data_ptr()
                | args[3].data_ptr() | args[4].data_ptr() | args[5].data_ptr()
                | args[6].data_ptr() | args[7].data_ptr()) & 15) == 0
    fast = _FAST_LAUNCH and aligned and args[8] < 2**31
    key = (device.index, word, args[2].dtype, num_warps, consts)
    compiled = _COMPILED.get(key) if fast else None
    if compiled is not None:
        try:
            from triton import knobs

            handle = stream.cuda_stream
            grid = (grid0, 1, 1)
            full = (*args, *consts)
            compiled.run(grid0, 1, 1, handle, compiled.function, compiled.packed_metadata,
                         compiled.launch_metadata(grid, handle, *full),
                         knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook,
                         *full)
            return
        except (ImportError, TypeError, AttributeError, SystemError):
            _FAST_LAUNCH = False  # another Triton's launcher: use the plain launch
    row_words, block_r, block_c, scatter, fp8, heads, head_dim, d_pad = consts
    compiled = _gather_kernel()[(grid0,)](*args, ROW=row_words, BLOCK_R=block_r,
                                          BLOCK_C=block_c, SCATTER=scatter, FP8=fp8,
                                          HEADS=heads, HEAD_DIM=head_dim, D_PAD=d_pad,
                                          num_warps=num_warps)
    if fast and hasattr(compiled, "packed_metadata") and hasattr(compiled, "launch_metadata"):
        _COMPILED[key] = compiled


# ------------------------------------------------------------------ DMA baselines
def copy_runs(src_k: torch.Tensor, src_v: torch.Tensor, rows: torch.Tensor,
              dst_k: torch.Tensor, dst_v: torch.Tensor, *,
              dst_rows: torch.Tensor | None = None,
              stream: torch.cuda.Stream | None = None, wait: bool = True
              ) -> torch.cuda.Event:
    """The same copy as `gather_rows` by the copy engines: one cudaMemcpyAsync per run of
    consecutive rows, for K and for V. `rows` (and `dst_rows`) should be on the host; device
    indices are synchronised to it."""
    _check(src_k, src_v, dst_k, dst_v)
    rows = rows.cpu()
    _check_rows(rows, src_k.shape[0], "rows")
    if dst_rows is not None:
        dst_rows = dst_rows.cpu()
    _check_destination_rows(rows, dst_rows, dst_k, dst_v)
    device = dst_k.device
    src_start, dst_start, length = row_runs(rows, dst_rows)
    with _on_device(device):
        stream, current = _work_stream(stream, wait)
        event = torch.cuda.Event()
        if length.numel():
            with _on_stream(stream, current):
                for s, d, n in zip(src_start.tolist(), dst_start.tolist(), length.tolist(),
                                   strict=True):
                    dst_k[d:d + n].copy_(src_k[s:s + n], non_blocking=True)
                    dst_v[d:d + n].copy_(src_v[s:s + n], non_blocking=True)
        event.record(stream)
    return event


def fetch_rows(src_k: torch.Tensor, src_v: torch.Tensor, rows: torch.Tensor,
               dst_k: torch.Tensor, dst_v: torch.Tensor, *, method: str | None = None,
               **kwargs: Any) -> torch.cuda.Event:
    """`gather_rows` ("gather") or `copy_runs` ("memcpy"); default `DEFAULT_METHOD`, what
    measured best."""
    method = method or DEFAULT_METHOD
    if method == "gather":
        return gather_rows(src_k, src_v, rows, dst_k, dst_v, **kwargs)
    if method == "memcpy":
        return copy_runs(src_k, src_v, rows, dst_k, dst_v, **kwargs)
    raise ValueError(f"fetch: unknown method {method!r} (gather, memcpy)")
