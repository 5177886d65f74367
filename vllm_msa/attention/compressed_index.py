"""A router layer's routing keys in 8 bits on the GPU, with what keeps routing over them exact.

The GPU holds 8-bit values with float32 scales (k̂ = values * scale, per chunk and KV head,
or per chunk: below), and float32 bounds made from the full-precision keys k at load:

* `residual` >= ||k - k̂||_2: by Cauchy-Schwarz, |q . k - q . k̂| <= ||q|| * residual for any
  query q, which is what `bounded_routing.py` turns into a certified interval per document.
* `magnitude` >= max over KV heads of max(||k||, ||k̂||) (per chunk): the scale of every score
  of the chunk, which bounds the floating-point rounding of any way of computing them.

Both are computed in float64 and rounded up to float32, so they are upper bounds as stored.

Two 8-bit formats (1 byte a value, plus 8 bytes per chunk and KV head, or 4 where int8
shares a scale per chunk, and 4 per chunk):

* `int8`: symmetric, scale = amax / 127 per chunk and KV head, or per chunk over all its KV
  heads where they have about the same range (`shares_scale_cheaply`; stored once per chunk
  and seen as [C, KV] with equal columns). Its error is uniform: about amax / 440 rms,
  ~5x smaller than e4m3's on Gaussian-like keys, and the exact re-scoring
  `bounded_routing.py` needs grows with the error (docs/compressed-banks.md has the measured
  rates). One scale per chunk is what lets the kernel sum every KV head's int8 products in
  the tensor cores' accumulators (`IntegerQueries`). The default.
* `fp8_e4m3`: the format of the FP8 K̄/V̄ tier (`vllm_msa.bank.quant`), 3 mantissa bits: a
  relative error of up to 2^-4 per value.

The full-precision keys stay where the bank keeps them (the bank files, memory-mapped; a
virtual bank regenerates them): only the few documents whose interval straddles the k-th
score are read back, at routing time (`ExactKeys`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..bank.format import INDEX_DTYPES
from ..bank.quant import FP8, quantize

INT8_MAX = 127.0
TILE_CHUNKS = 1 << 15  # chunks compressed at a time (float64 temporaries stay ~100s of MiB)

# The exact (full-precision, as stored) routing keys of chunk ranges [start, stop) of this
# index, concatenated: [chunks, num_kv_heads, head_dim], any device.
ExactKeys = Callable[[list[tuple[int, int]]], torch.Tensor]


@dataclass(frozen=True)
class BankExactKeys:
    """`ExactKeys` from a bank's files (memory-mapped; a virtual bank regenerates them), for
    an index whose first chunk is the bank's chunk `first` (a shard's)."""

    bank: Any  # vllm_msa.bank.reader.MemoryBank
    layer: int
    first: int = 0
    device: Any = None  # where a virtual bank generates them (a bank of files: the host)

    def __call__(self, ranges: list[tuple[int, int]]) -> torch.Tensor:
        return self.bank.read_ranges(self.layer, "routing_keys",
                                     [(a + self.first, b + self.first) for a, b in ranges],
                                     device=self.device)


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes `t` holds of its own: a broadcast dimension (stride 0) stores one element."""
    count = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        count *= size if stride else 1
    return count * t.element_size()


@dataclass(frozen=True)
class CompressedKeys:
    """One router layer's routing keys in 8 bits, with their certified error bounds."""

    values: torch.Tensor  # [C, KV, D] int8 or float8_e4m3fn
    # [C, KV] float32: k̂ = values * scale (with `shared_scale`, a [C] column broadcast)
    scale: torch.Tensor
    residual: torch.Tensor  # [C, KV] float32, >= ||k - k̂||_2
    magnitude: torch.Tensor  # [C] float32, >= max_kv max(||k||_2, ||k̂||_2)
    # int8 only: one scale per chunk, shared by its KV heads, which the int8 x int8 kernel
    # pass needs (`IntegerQueries`).
    shared_scale: bool = False

    @property
    def dtype_name(self) -> str:
        return "int8" if self.values.dtype == torch.int8 else "fp8_e4m3"

    @property
    def num_chunks(self) -> int:
        return self.values.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(stored_bytes(t) for t in (self.values, self.scale, self.residual,
                                             self.magnitude))

    def dequantized(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """k̂ of chunks [start, stop) in float32: values * scale, rounded once."""
        stop = self.num_chunks if stop is None else stop
        return self.values[start:stop].float() * self.scale[start:stop, :, None]


def _round_up(x: torch.Tensor) -> torch.Tensor:
    """float64 -> float32, never below the float64 value."""
    y = x.float()
    return torch.where(y.double() < x, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def _quantize_int8(x: torch.Tensor, dims: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale (amax / 127) per slice over the last `dims` dims."""
    k = x.float()
    amax = k.abs().amax(dim=tuple(range(-dims, 0)))
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    values = torch.round(k / scale[(...,) + (None,) * dims]).clamp_(-INT8_MAX, INT8_MAX)
    return values.to(torch.int8), scale


# int8 shares one scale per chunk when that grows the error bounds by at most this factor
# (the mean over chunks of max_kv amax / mean_kv amax: 1.1 for Gaussian-like heads of one
# size; cosine routing normalises every head).
SHARED_SCALE_GROWTH = 1.25


def shares_scale_cheaply(keys: torch.Tensor) -> bool:
    """Whether one int8 scale per chunk costs `keys` [C, KV, D] little precision: its KV heads
    have about the same range, chunk by chunk."""
    if keys.shape[0] == 0 or keys.shape[1] == 1:
        return True
    growth = torch.zeros((), dtype=torch.float64, device=keys.device)
    for start in range(0, keys.shape[0], TILE_CHUNKS):
        amax = keys[start:start + TILE_CHUNKS].float().abs().amax(-1)  # [c, KV]
        ratio = amax.amax(-1) / amax.mean(-1).clamp_min(torch.finfo(torch.float32).tiny)
        growth += torch.where(amax.amax(-1) > 0, ratio, 1.0).double().sum()
    return float(growth) / keys.shape[0] <= SHARED_SCALE_GROWTH


def compress(keys: torch.Tensor, dtype: str = "int8",
             shared_scale: bool | None = None) -> CompressedKeys:
    """`keys` [C, KV, D] (any float dtype, on any device) in `dtype` ("int8" | "fp8_e4m3"),
    with their bounds; on `keys`' device. `shared_scale` (int8): one scale per chunk (None:
    where `shares_scale_cheaply`)."""
    if dtype not in INDEX_DTYPES[1:]:
        raise ValueError(f"unknown index dtype {dtype!r}; choose one of "
                         f"{', '.join(INDEX_DTYPES[1:])}")
    chunks, kv, d = keys.shape
    device = keys.device
    values = torch.empty(chunks, kv, d, device=device,
                         dtype=torch.int8 if dtype == "int8" else FP8)
    # (explicit dtypes: vLLM loads the model under the model's default dtype)
    residual = torch.empty(chunks, kv, dtype=torch.float32, device=device)
    magnitude = torch.empty(chunks, dtype=torch.float32, device=device)
    if dtype != "int8":
        shared_scale = False
    elif shared_scale is None:
        shared_scale = shares_scale_cheaply(keys)
    scale = (torch.empty(chunks, dtype=torch.float32, device=device)[:, None].expand(-1, kv)
             if shared_scale else torch.empty(chunks, kv, dtype=torch.float32, device=device))
    out = CompressedKeys(values, scale, residual, magnitude, shared_scale)
    for start in range(0, chunks, TILE_CHUNKS):
        stop = min(chunks, start + TILE_CHUNKS)
        tile = keys[start:stop]
        if shared_scale:  # one scale per chunk, shared by its KV heads
            v, s = _quantize_int8(tile, dims=2)
            scale[start:stop, 0] = s  # (the one stored column)
        else:
            v, s = _quantize_int8(tile) if dtype == "int8" else quantize(tile)
            scale[start:stop] = s
        values[start:stop] = v
        exact = tile.double()
        approx = out.dequantized(start, stop).double()  # the float32 k̂ routing computes with
        residual[start:stop] = _round_up((exact - approx).norm(dim=-1))
        norms = torch.maximum(exact.norm(dim=-1), approx.norm(dim=-1))
        magnitude[start:stop] = _round_up(norms.amax(-1))
    return out


@dataclass(frozen=True)
class IntegerQueries:
    """Routing queries as two int8 levels with one scale per token (shared by its heads),
    q ≈ s (hi + lo / 128), lo quantising what hi leaves, for the int8 x int8 tensor-core pass
    over an int8 index.

    Why: widening 8-bit keys to the queries' dtype, or scaling each KV head's products,
    costs more than reading the keys (conversions run at a fraction of the memory rate).
    With the keys' scale per chunk and the queries' per token, every KV head's products sum
    in the tensor cores' int32 accumulators, exactly, and one multiply per score applies
    both scales. The only new error is the queries' own, ||q - q̂||, at most s / 256 per
    value (two levels of 7 bits), bounded by `error`."""

    hi: torch.Tensor  # [T, QH, D] int8
    lo: torch.Tensor  # [T, QH, D] int8, in [-64, 64]
    scale: torch.Tensor  # [T] float32: s
    error: torch.Tensor  # [T, QH] float32, >= ||q - q̂||_2
    size: torch.Tensor  # [T, QH] float32, >= ||s * hi||_2 + ||s / 128 * lo||_2


LOW_LEVEL = 128.0  # hi's step / lo's step (a power of two: s / 128 is exact)


def integer_queries(q: torch.Tensor) -> IntegerQueries:
    """`q` [T, QH, D] (the kernels' prepared queries, any float dtype) as `IntegerQueries`,
    with the bounds computed in float64 and rounded up."""
    exact = q.double()
    hi, scale = _quantize_int8(q, dims=2)
    step = scale.double()[:, None, None]
    part_hi = hi.double() * step
    # |q - s hi| <= s / 2 per value: lo = round(that / (s / 128)) is within [-64, 64].
    lo = torch.round((exact - part_hi) / (step / LOW_LEVEL)).clamp_(-64, 64).to(torch.int8)
    part_lo = lo.double() * (step / LOW_LEVEL)
    return IntegerQueries(
        hi.contiguous(), lo.contiguous(), scale.float().contiguous(),
        _round_up((exact - part_hi - part_lo).norm(dim=-1)),
        _round_up(part_hi.norm(dim=-1) + part_lo.norm(dim=-1)))
