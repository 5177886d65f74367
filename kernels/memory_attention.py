"""Memory attention (msa-spec §3): a step's query rows attend over their request's staged
memory K̄/V̄ and are merged with the local (paged) attention by log-sum-exp, in one launch.

The staged memory of every request lives in one device pool (`StagingPool`): rows of
`[slots, kv_heads, head_dim]`, a request owning any set of slots. `memory_attention` reads
them in place through a slot list (no gather copy), so a whole step — every request with
memory, decode or prefill — is one kernel per router layer:

* programs = (tile of one request's query tokens) x (KV head). A tile holds `BLOCK_M` tokens x
  the `G` query heads that share the KV head, flattened into the rows of one `tl.dot`, so every
  memory row is read once per KV head and tile (GQA reuse) — decode reads each request's
  memory exactly once per layer.
* online softmax over the memory in tiles of `BLOCK_N` slots (fp32 accumulation);
* epilogue: memory LSE, then, given the local attention's output and LSE, the exact merge
  out = (e^(lse_l - m) out_l + e^(lse_m - m) out_m) / (e^(lse_l - m) + e^(lse_m - m)),
  written straight into the layer output's rows (any dtype) and, optionally, the merged LSE.

A row with no memory gets the local result unchanged (memory LSE -inf); with no local part
(`local=None`) the kernel returns memory attention alone with its LSE.

`memory_attention_reference` is the plain-torch version the tests compare with (they also
check against softmax over the concatenated keys, written independently in the tests).
Triton is imported lazily enough that importing this module needs neither Triton nor a GPU;
under `TRITON_INTERPRET=1` the kernel runs on CPU tensors (how the CPU tests run it).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch

from vllm_msa.attention.uploads import upload

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

__all__ = [
    "MemoryBatch",
    "kernel_supported",
    "memory_attention",
    "memory_attention_reference",
]

HAS_TRITON = triton is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class MemoryBatch:
    """Which query rows belong to which request, and which pool slots hold its memory.

    Host lists describe the batch (they size the launch); device tensors are what the kernel
    reads. Build once per step and layer with `MemoryBatch.build`.
    """

    cu_query: list[int]  # request r owns query rows cu_query[r]:cu_query[r+1]
    cu_slots: list[int]  # and slots[cu_slots[r]:cu_slots[r+1]] (a reservation, see counts)
    slots: torch.Tensor  # [total slots] int32/int64, device
    # [tiles, 5] int32: query row start, rows, slot start, slot end, and the index into
    # `counts` of the number of those slots in use (-1: all of them)
    tiles: torch.Tensor
    block_m: int  # query tokens per tile
    # [requests] int, device: slots in use of each request's reservation, when the device
    # decided it (staging writes it without the host waiting); None: every slot is used
    counts: torch.Tensor | None = None

    @property
    def num_requests(self) -> int:
        return len(self.cu_query) - 1

    @classmethod
    def from_buffers(cls, slots: torch.Tensor, tiles: torch.Tensor, block_m: int = 1,
                     counts: torch.Tensor | None = None) -> MemoryBatch:
        """A batch described only by device buffers (for CUDA-graph capture: the kernel
        reads `tiles`, `slots` and `counts` at replay). Kernel path only: the torch fallback
        needs the host lists."""
        return cls([], [], slots, tiles, block_m, counts)

    @classmethod
    def build(cls, cu_query: list[int], cu_slots: list[int], slots: torch.Tensor,
              block_m: int | None = None, counts: torch.Tensor | None = None,
              cache: dict | None = None) -> MemoryBatch:
        """Tiles of `block_m` query rows per request. With `counts`, request r attends over
        only the first counts[r] of its slots (read by the kernel on the device). `cache`:
        a dict kept by the caller where tile tables are reused for the same layout (the
        router layers of one step share it)."""
        key = (tuple(cu_query), tuple(cu_slots), block_m, counts is not None, slots.device)
        if cache is not None and key in cache:
            table, block_m = cache[key]
            return cls(list(cu_query), list(cu_slots), slots, table, block_m, counts)
        if len(cu_query) != len(cu_slots):
            raise ValueError("cu_query and cu_slots must describe the same requests")
        longest = max((b - a for a, b in itertools.pairwise(cu_query)), default=1)
        if block_m is None:  # decode: one token a request; prefill: 16-token tiles
            block_m = 1 if longest <= 1 else 16
        tiles = []
        for r in range(len(cu_query) - 1):
            for start in range(cu_query[r], cu_query[r + 1], block_m):
                tiles.append((start, min(block_m, cu_query[r + 1] - start),
                              cu_slots[r], cu_slots[r + 1], -1 if counts is None else r))
        table = upload(tiles or [(0, 0, 0, 0, -1)], slots.device, torch.int32)
        if cache is not None:
            cache[key] = (table, block_m)
        return cls(list(cu_query), list(cu_slots), slots, table, block_m, counts)


def memory_attention_reference(
    query: torch.Tensor, pool_keys: torch.Tensor, pool_values: torch.Tensor,
    batch: MemoryBatch, scale: float,
    local: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, per request, fp32: (out [T, H, D], lse [H, T])."""
    num_rows, num_heads, head_dim = query.shape
    group = num_heads // pool_keys.shape[1]
    out = query.new_zeros((num_rows, num_heads, head_dim), dtype=torch.float32)
    lse = query.new_full((num_heads, num_rows), float("-inf"), dtype=torch.float32)
    slots = batch.slots.long()
    counts = None if batch.counts is None else batch.counts.tolist()
    for r in range(batch.num_requests):
        rows = slice(batch.cu_query[r], batch.cu_query[r + 1])
        end = batch.cu_slots[r + 1]
        if counts is not None:
            end = min(end, batch.cu_slots[r] + counts[r])
        mine = slots[batch.cu_slots[r]:end]
        if mine.numel() == 0 or rows.stop == rows.start:
            continue
        k = pool_keys[mine].float().repeat_interleave(group, dim=1)  # [n, H, D]
        v = pool_values[mine].float().repeat_interleave(group, dim=1)
        logits = torch.einsum("qhd,nhd->hqn", query[rows].float(), k) * scale
        lse[:, rows] = torch.logsumexp(logits, dim=-1)
        out[rows] = torch.einsum("hqn,nhd->qhd", torch.softmax(logits, dim=-1), v)
    if local is None:
        return out, lse
    local_out, local_lse = local[0].float(), local[1].float()
    top = torch.maximum(lse, local_lse)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w_mem, w_loc = torch.exp(lse - top), torch.exp(local_lse - top)
    total = w_mem + w_loc
    merged = (w_mem.T[..., None] * out + w_loc.T[..., None] * local_out) / total.T[..., None]
    merged = torch.where(total.T[..., None] > 0, merged, torch.zeros_like(merged))
    return merged, torch.log(total) + top


def kernel_supported(query: torch.Tensor, pool_keys: torch.Tensor) -> bool:
    return (HAS_TRITON and (pool_keys.is_cuda or INTERPRET)
            and query.dtype in KERNEL_DTYPES and pool_keys.dtype in KERNEL_DTYPES)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def memory_attention(
    query: torch.Tensor,
    pool_keys: torch.Tensor,
    pool_values: torch.Tensor,
    batch: MemoryBatch,
    scale: float,
    local: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
    out_rows: torch.Tensor | None = None,
    out_lse: torch.Tensor | None = None,
    block_n: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Memory attention of `query` [T, H, D] (merged with `local` = (out [T, H, D], lse [H, T])
    when given). The result goes to `out` — [T, H, D], or, with `out_rows` [T], rows
    out_rows[i] of a bigger [N, H, D] tensor (e.g. the layer's output) — and the LSE to
    `out_lse` [H, T] if given. Returns (out, out_lse)."""
    if not kernel_supported(query, pool_keys):
        merged, lse = memory_attention_reference(query, pool_keys, pool_values, batch, scale,
                                                 local)
        target = out if out is not None else torch.empty_like(merged)
        if out_rows is None:
            target.copy_(merged)
        else:
            target.index_copy_(0, out_rows.long(), merged.to(target.dtype))
        if out_lse is not None:
            out_lse.copy_(lse)
        return target, out_lse
    num_rows, num_heads, head_dim = query.shape
    num_kv = pool_keys.shape[1]
    if num_heads % num_kv:
        raise ValueError(f"{num_heads} query heads do not share {num_kv} KV heads evenly")
    group = num_heads // num_kv
    if out is None:
        out = torch.empty((num_rows, num_heads, head_dim), dtype=query.dtype,
                          device=query.device)
    if out_rows is None:
        out_rows_arg, has_rows = batch.slots, False  # any int tensor; unused
    else:
        out_rows_arg, has_rows = out_rows, True
    if local is not None:
        local_out, local_lse = local
    else:
        local_out, local_lse = query, query  # unused
    lse_arg = out_lse if out_lse is not None else query
    group_pad = _pow2(group)
    block_m = batch.block_m
    # tl.dot wants >= 16 rows: pad a decode tile's heads with masked rows.
    rows_pad = max(16, _pow2(block_m * group_pad))
    head_pad = _pow2(head_dim)
    grid = (batch.tiles.shape[0], num_kv)
    counts = batch.counts if batch.counts is not None else batch.tiles  # unused if None
    _memory_attention_kernel[grid](
        query, pool_keys, pool_values, batch.slots, batch.tiles, counts,
        local_out, local_lse, out, out_rows_arg, lse_arg,
        query.stride(0), query.stride(1),
        pool_keys.stride(0), pool_keys.stride(1),
        pool_values.stride(0), pool_values.stride(1),
        local_out.stride(0), local_out.stride(1),
        local_lse.stride(0), local_lse.stride(1) if local_lse.dim() > 1 else 1,
        out.stride(0), out.stride(1),
        lse_arg.stride(0), lse_arg.stride(1) if lse_arg.dim() > 1 else 1,
        scale,
        HEAD_DIM=head_dim, HEAD_PAD=head_pad, GROUP=group, GROUP_PAD=group_pad,
        BLOCK_M=block_m, ROWS=rows_pad, BLOCK_N=block_n,
        HAS_LOCAL=local is not None, HAS_ROWS=has_rows, HAS_LSE=out_lse is not None,
        HAS_COUNTS=batch.counts is not None, UPCAST=INTERPRET or query.dtype == torch.float32,
        num_warps=4 if rows_pad <= 16 else 8, num_stages=2,
    )
    return out, out_lse


if HAS_TRITON:

    # The LSE tensors' head strides are the step's row count: not specialised (see
    # vllm_msa/attention/warmup.py).
    @triton.jit(do_not_specialize=["stride_llh", "stride_olh"])
    def _memory_attention_kernel(
        q_ptr, k_ptr, v_ptr, slots_ptr, tiles_ptr, counts_ptr,
        lo_ptr, llse_ptr, out_ptr, rows_ptr, olse_ptr,
        stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
        stride_lot, stride_loh, stride_llh, stride_llt,
        stride_ot, stride_oh, stride_olh, stride_olt,
        scale,
        HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr,
        BLOCK_N: tl.constexpr, HAS_LOCAL: tl.constexpr, HAS_ROWS: tl.constexpr,
        HAS_LSE: tl.constexpr, HAS_COUNTS: tl.constexpr, UPCAST: tl.constexpr,
    ):
        tile = tl.program_id(0)
        kv_head = tl.program_id(1)
        row0 = tl.load(tiles_ptr + tile * 5)
        num_tok = tl.load(tiles_ptr + tile * 5 + 1)
        slot_lo = tl.load(tiles_ptr + tile * 5 + 2)
        slot_hi = tl.load(tiles_ptr + tile * 5 + 3)
        if HAS_COUNTS:
            count_idx = tl.load(tiles_ptr + tile * 5 + 4)
            used = tl.load(counts_ptr + tl.maximum(count_idx, 0)).to(tl.int32)
            slot_hi = tl.where(count_idx >= 0, tl.minimum(slot_hi, slot_lo + used), slot_hi)

        r = tl.arange(0, ROWS)
        tok = r // GROUP_PAD  # token within the tile
        g = r % GROUP_PAD  # query head within the KV head's group
        row_ok = (tok < num_tok) & (g < GROUP) & (tok < BLOCK_M)
        head = kv_head * GROUP + g
        row = row0 + tok
        d = tl.arange(0, HEAD_PAD)
        d_ok = d < HEAD_DIM

        q = tl.load(q_ptr + row[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)

        m_i = tl.full((ROWS,), float("-inf"), tl.float32)
        l_i = tl.zeros((ROWS,), tl.float32)
        acc = tl.zeros((ROWS, HEAD_PAD), tl.float32)
        n = tl.arange(0, BLOCK_N)
        for start in range(slot_lo, slot_hi, BLOCK_N):
            n_ok = start + n < slot_hi
            slot = tl.load(slots_ptr + start + n, mask=n_ok, other=0).to(tl.int64)
            k = tl.load(k_ptr + slot[:, None] * stride_ks + kv_head * stride_kh + d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(v_ptr + slot[:, None] * stride_vs + kv_head * stride_vh + d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        has_mem = l_i > 0
        mem = acc / tl.where(has_mem, l_i, 1.0)[:, None]
        lse = tl.where(has_mem, m_i + tl.log(tl.where(has_mem, l_i, 1.0)), float("-inf"))
        if HAS_LOCAL:
            lo = tl.load(lo_ptr + row[:, None] * stride_lot + head[:, None] * stride_loh
                         + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                         other=0.0).to(tl.float32)
            llse = tl.load(llse_ptr + head * stride_llh + row * stride_llt, mask=row_ok,
                           other=float("-inf"))
            top = tl.maximum(lse, llse)
            top = tl.where(top == float("-inf"), 0.0, top)
            w_mem = tl.exp(lse - top)
            w_loc = tl.exp(llse - top)
            total = w_mem + w_loc
            safe = tl.where(total > 0, total, 1.0)
            mem = (w_mem[:, None] * mem + w_loc[:, None] * lo) / safe[:, None]
            lse = tl.where(total > 0, tl.log(safe) + top, float("-inf"))
        if HAS_ROWS:
            dst = tl.load(rows_ptr + row, mask=row_ok, other=0).to(tl.int64)
        else:
            dst = row.to(tl.int64)
        tl.store(out_ptr + dst[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 mem.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        if HAS_LSE:
            tl.store(olse_ptr + head * stride_olh + row * stride_olt, lse, mask=row_ok)
