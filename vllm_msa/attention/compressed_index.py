"""A router layer's routing keys in 8 bits on the GPU, with what keeps routing over them exact.

The GPU holds, per chunk and KV head, 8-bit values and a float32 scale (k̂ = values * scale),
and two float32 bounds made from the full-precision keys k at load:

* `residual` >= ||k - k̂||_2: by Cauchy-Schwarz, |q . k - q . k̂| <= ||q|| * residual for any
  query q, which is what `bounded_routing.py` turns into a certified interval per document.
* `magnitude` >= max over KV heads of max(||k||, ||k̂||) (per chunk): the scale of every score
  of the chunk, which bounds the floating-point rounding of any way of computing them.

Both are computed in float64 and rounded up to float32, so they are upper bounds as stored.

Two 8-bit formats, same bytes (1 byte a value, plus 12 bytes per chunk and KV head):

* `int8`: symmetric, scale = amax / 127 per chunk and KV head. Its error is uniform over the
  head: about amax / 440 rms, ~5x smaller than e4m3's on Gaussian-like keys, and the exact
  re-scoring `bounded_routing.py` needs grows with the error (docs/compressed-banks.md has
  the measured rates). The default.
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


@dataclass(frozen=True)
class CompressedKeys:
    """One router layer's routing keys in 8 bits, with their certified error bounds."""

    values: torch.Tensor  # [C, KV, D] int8 or float8_e4m3fn
    scale: torch.Tensor  # [C, KV] float32: k̂ = values * scale
    residual: torch.Tensor  # [C, KV] float32, >= ||k - k̂||_2
    magnitude: torch.Tensor  # [C] float32, >= max_kv max(||k||_2, ||k̂||_2)

    @property
    def dtype_name(self) -> str:
        return "int8" if self.values.dtype == torch.int8 else "fp8_e4m3"

    @property
    def num_chunks(self) -> int:
        return self.values.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.values, self.scale, self.residual, self.magnitude))

    def dequantized(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """k̂ of chunks [start, stop) in float32: values * scale, rounded once."""
        stop = self.num_chunks if stop is None else stop
        return self.values[start:stop].float() * self.scale[start:stop, :, None]


def _round_up(x: torch.Tensor) -> torch.Tensor:
    """float64 -> float32, never below the float64 value."""
    y = x.float()
    return torch.where(y.double() < x, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def _quantize_int8(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = keys.float()
    amax = k.abs().amax(-1)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    values = torch.round(k / scale[..., None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return values, scale


def compress(keys: torch.Tensor, dtype: str = "int8") -> CompressedKeys:
    """`keys` [C, KV, D] (any float dtype, on any device) in `dtype` ("int8" | "fp8_e4m3"),
    with their bounds; on `keys`' device."""
    if dtype not in INDEX_DTYPES[1:]:
        raise ValueError(f"unknown index dtype {dtype!r}; choose one of "
                         f"{', '.join(INDEX_DTYPES[1:])}")
    chunks, kv, d = keys.shape
    device = keys.device
    values = torch.empty(chunks, kv, d, device=device,
                         dtype=torch.int8 if dtype == "int8" else FP8)
    # (explicit dtypes: vLLM loads the model under the model's default dtype)
    scale = torch.empty(chunks, kv, dtype=torch.float32, device=device)
    residual = torch.empty(chunks, kv, dtype=torch.float32, device=device)
    magnitude = torch.empty(chunks, dtype=torch.float32, device=device)
    out = CompressedKeys(values, scale, residual, magnitude)
    for start in range(0, chunks, TILE_CHUNKS):
        stop = min(chunks, start + TILE_CHUNKS)
        tile = keys[start:stop]
        v, s = _quantize_int8(tile) if dtype == "int8" else quantize(tile)
        values[start:stop], scale[start:stop] = v, s
        exact = tile.double()
        approx = out.dequantized(start, stop).double()  # the float32 k̂ routing computes with
        residual[start:stop] = _round_up((exact - approx).norm(dim=-1))
        norms = torch.maximum(exact.norm(dim=-1), approx.norm(dim=-1))
        magnitude[start:stop] = _round_up(norms.amax(-1))
    return out


@dataclass(frozen=True)
class IntegerQueries:
    """Routing queries as two int8 levels per row and head, q ≈ s_hi * hi + s_lo * lo (lo
    quantises what hi leaves), for the int8 x int8 tensor-core pass over an int8 index.

    Why: widening 8-bit keys to the queries' dtype costs more than reading them (conversions
    run at a fraction of the memory rate), while int8 products with int32 accumulation are
    exact integers, straight from the loaded bytes. The only error this adds is the queries'
    own, ||q - q̂|| (~2^-14 of ||q||, two levels of 7 bits), bounded by `error`."""

    hi: torch.Tensor  # [T, QH, D] int8
    lo: torch.Tensor  # [T, QH, D] int8
    scale: torch.Tensor  # [2, T, QH] float32: s_hi, s_lo
    error: torch.Tensor  # [T, QH] float32, >= ||q - q̂||_2
    size: torch.Tensor  # [T, QH] float32, >= ||s_hi * hi||_2 + ||s_lo * lo||_2


def integer_queries(q: torch.Tensor) -> IntegerQueries:
    """`q` [T, QH, D] (the kernels' prepared queries, any float dtype) as `IntegerQueries`,
    with the bounds computed in float64 and rounded up."""
    exact = q.double()
    hi, s_hi = _quantize_int8(q)
    part_hi = hi.double() * s_hi.double()[..., None]
    lo, s_lo = _quantize_int8(exact - part_hi)
    part_lo = lo.double() * s_lo.double()[..., None]
    return IntegerQueries(
        hi.contiguous(), lo.contiguous(), torch.stack([s_hi, s_lo]).float().contiguous(),
        _round_up((exact - part_hi - part_lo).norm(dim=-1)),
        _round_up(part_hi.norm(dim=-1) + part_lo.norm(dim=-1)))
