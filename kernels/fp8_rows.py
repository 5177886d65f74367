"""Triton helpers that dequantise FP8 (e4m3) bank rows while copying them (`quant.py`).

An FP8 K̄/V̄ tier moves as bytes over PCIe (half of bf16) and is widened on the device, inside
the gather and staging kernels (`fetch.py`, `stage.py`), into the staging pool's model dtype:
memory attention reads the same dtype as from a full-precision bank. The e4m3 decode is done
with integer ops (sign, 4 exponent bits, 3 mantissa bits), exact, and identical under the
Triton interpreter and on the GPU; times the row-head's power-of-two scale, the value is
exactly what `quant.dequantize` gives, so every path stages bit-identical tensors.

Imported only by the kernel factories: importing `fetch.py` or `stage.py` needs no Triton.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def e4m3_to_f32(byte):
    """int32 holding an e4m3fn byte -> its float32 value (NaN is never stored in a bank)."""
    exponent = (byte >> 3) & 0xF
    mantissa = byte & 0x7
    # normal: (1 + m/8) 2^(e-7) = (8 + m) 2^(e-10); subnormal (e == 0): m 2^-9
    power = ((exponent + 117) << 23).to(tl.float32, bitcast=True)
    magnitude = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125,
                         (mantissa + 8).to(tl.float32) * power)
    return tl.where((byte & 0x80) != 0, -magnitude, magnitude)


@triton.jit
def copy_fp8_rows(src_k, src_v, scale_k, scale_v, dst_k, dst_v, src_row, dst_row, rows_ok,
                  HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """dst[dst_row] = src[src_row] * scale[src_row] for a block of rows (K and V).

    src_*: byte pointers to [*, HEADS, HEAD_DIM] e4m3 rows; scale_*: float32 [*, HEADS];
    dst_*: typed pointers to [*, HEADS, HEAD_DIM]; src_row/dst_row: int64 [BLOCK_R];
    rows_ok: which of them to copy."""
    d = tl.arange(0, D_PAD)
    mask = rows_ok[:, None] & (d < HEAD_DIM)[None, :]
    for h in tl.static_range(HEADS):
        s_off = (src_row * HEADS + h)[:, None] * HEAD_DIM + d[None, :]
        d_off = (dst_row * HEADS + h)[:, None] * HEAD_DIM + d[None, :]
        sk = tl.load(scale_k + src_row * HEADS + h, mask=rows_ok, other=0.0)
        sv = tl.load(scale_v + src_row * HEADS + h, mask=rows_ok, other=0.0)
        k = e4m3_to_f32(tl.load(src_k + s_off, mask=mask, other=0).to(tl.int32))
        v = e4m3_to_f32(tl.load(src_v + s_off, mask=mask, other=0).to(tl.int32))
        tl.store(dst_k + d_off, (k * sk[:, None]).to(dst_k.dtype.element_ty), mask=mask)
        tl.store(dst_v + d_off, (v * sv[:, None]).to(dst_v.dtype.element_ty), mask=mask)
