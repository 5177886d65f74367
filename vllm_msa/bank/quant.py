"""FP8 (e4m3) bank tiers: one power-of-two scale per chunk and KV head.

A pooled K̄ or V̄ row [kv_heads, head_dim] is stored as `float8_e4m3fn` values plus, per KV
head, a float32 scale s = 2^e, the smallest power of two with amax / s <= 448 (e4m3's largest
finite value). Why this shape:

* Per chunk and KV head: one 64-token chunk of one head is the unit that routing selects and
  staging moves; its amax is local, so an outlier chunk costs precision only to itself. The
  scales add 4 bytes per head_dim values (3 % at head_dim 128).
* Powers of two: dividing by s and multiplying back are exact, so the only rounding is the
  e4m3 one, and the dequantised value (4 significant bits times 2^e) is exactly representable
  in bfloat16 and float32 (and in float16 inside its range): staging on the GPU, the torch
  path and `MemoryBank.layer()` produce bit-identical tensors, which the float64 reference
  reads.

Error (round to nearest even, no overflow since amax / s <= 448): for |x| / s >= 2^-6 (e4m3's
normal range) |x - x̂| <= 2^-4 |x|; below it the spacing is 2^-9, so |x - x̂| <= 2^-10 s.
Together: |x - x̂| <= max(2^-4 |x|, 2^-10 s). `quantisation_error` measures the realised one.

What it does to attention (`attention_drift_bound`), for one query q over memory entries i
(K̄/V̄ quantised) merged with any entries left exact (the template head, the request's own
tokens): each memory logit moves by at most e_i = c |q|·u_i, where c is the softmax scale
and u_i the elementwise bound above (Hölder). Every softmax weight is then multiplied by a
factor in [e^-2e, e^2e] (e = max e_i: numerator and normaliser each move by at most e^e), so
|Σ p̂_i v̂_i - Σ p_i v_i| <= Σ p̂_i |v̂_i - v_i| + Σ |p̂_i - p_i| |v_i|
                        <= max_i |v̂_i - v_i| + (e^2e - 1) max_j |v_j|,   per output element,
the last max over every entry j attended to, the exact ones included (their weights move
with the normaliser).
That bounds one router layer's memory attention; how a change there carries to the logits
goes through the rest of the network, so end-to-end drift is measured (docs/compressed-banks.md).
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_NAMES = {"fp8_e4m3": "float8_e4m3fn", "float8_e4m3fn": "float8_e4m3fn"}
SCALE_SUFFIX = ".scale"  # the scales of tensor `layer.L.keys` are `layer.L.keys.scale`
RELATIVE_BOUND = 2.0**-4  # |x - x̂| <= max(RELATIVE_BOUND |x|, ABSOLUTE_BOUND * scale)
ABSOLUTE_BOUND = 2.0**-10


def scales_of(x: torch.Tensor) -> torch.Tensor:
    """[rows, kv, hd] -> [rows, kv] float32: the power-of-two scale of each row and head."""
    amax = x.detach().abs().amax(-1).float()
    # frexp: amax / 448 = m * 2^e with m in [0.5, 1), so 2^e >= amax / 448 and is the
    # smallest such power of two (2^(e-1) < amax / 448 unless m == 0.5, where 2^(e-1) is it).
    mantissa, exponent = torch.frexp(amax / FP8_MAX)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    scale = torch.ldexp(torch.ones_like(amax), exponent)
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, kv, hd] (any float dtype) -> (float8_e4m3fn values, float32 scales [rows, kv])."""
    scale = scales_of(x)
    return (x.float() / scale[..., None]).to(FP8), scale


def dequantize(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `quantize`, in `dtype` (exact for bfloat16 and float32)."""
    return (values.float() * scale[..., None].float()).to(dtype)


def check_scales(scale: torch.Tensor) -> str | None:
    """Why `scale` cannot be a bank's scales (None: it can): each must be a finite positive
    power of two."""
    if scale.numel() == 0:
        return None
    s = scale.float()
    if not bool(torch.isfinite(s).all()):
        return "holds non-finite scales"
    if not bool((s > 0).all()):
        return "holds scales <= 0"
    if not bool((torch.frexp(s).mantissa == 0.5).all()):
        return "holds scales that are not powers of two"
    return None


def fp8_finite(values: torch.Tensor) -> bool:
    """Whether no e4m3fn value is NaN (it has no infinities): NaN is S.1111.111."""
    return values.numel() == 0 or int(
        (values.view(torch.uint8) & 0x7F).eq(0x7F).sum()) == 0


def quantisation_error(x: torch.Tensor) -> dict[str, float]:
    """The realised error of quantising `x` [rows, kv, hd]: max and RMS relative to the
    row-head's RMS, and the worst ratio to the bound above (<= 1 by construction)."""
    q, scale = quantize(x)
    xf = x.float()
    err = (dequantize(q, scale, torch.float32) - xf).abs()
    rms = xf.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)
    bound = torch.maximum(RELATIVE_BOUND * xf.abs(), ABSOLUTE_BOUND * scale[..., None])
    return {"max_relative_to_rms": float((err / rms).max()),
            "rms_relative_to_rms": float((err / rms).pow(2).mean().sqrt()),
            "worst_vs_bound": float((err / bound).max())}


def elementwise_bound(x_hat: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The largest |x - x̂| any x quantising to x̂ can have, from the stored values alone
    ([rows, kv, hd] dequantised, scales [rows, kv]): rounding to nearest moves x by at most
    half the spacing at x̂, 2^-4 |x̂| / (1 - 2^-4) in the normal range (|x| >= |x̂| (1 - 2^-4)),
    and 2^-10 s below it."""
    relative = RELATIVE_BOUND / (1 - RELATIVE_BOUND) * x_hat.abs()
    return torch.maximum(relative, ABSOLUTE_BOUND * scale[..., None].to(x_hat.dtype))


def attention_drift_bound(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          key_scale: torch.Tensor, value_scale: torch.Tensor,
                          softmax_scale: float, exact_values: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """Per query head and output element, the most attention's output can move because its
    memory K̄/V̄ were quantised (module docstring). q: [heads, hd]; keys, values: the
    dequantised memory [rows, kv, hd] with their scales [rows, kv]; exact_values: the values
    of the other entries attended to ([n, kv, hd]: template head, own tokens); query head h
    reads KV head h // (heads / kv). Returns [heads, hd]."""
    heads, kv = q.shape[0], keys.shape[1]
    group = heads // kv
    uk = elementwise_bound(keys, key_scale).repeat_interleave(group, 1)  # [rows, heads, hd]
    uv = elementwise_bound(values, value_scale).repeat_interleave(group, 1)
    v = values.repeat_interleave(group, 1)
    e = softmax_scale * torch.einsum("hd,rhd->rh", q.abs(), uk).amax(0)  # [heads]
    v_max = (v.abs() + uv).amax(0)  # the exact values are within uv of the stored ones
    if exact_values is not None and exact_values.numel():
        v_max = torch.maximum(v_max, exact_values.repeat_interleave(group, 1).abs().amax(0))
    return uv.amax(0) + torch.expm1(2 * e)[:, None] * v_max
