"""The query side of the bounded pass over an 8-bit index (`attention/bounded_routing.py`) in
two launches, instead of the few dozen small torch ops that cost more GPU time, at one
question, than the chunk-score kernel's read of the index.

1. `_bound_rows_kernel`, one program per prepared query row (`routing.prepare_queries`):
   each head's norm ||q||, and with int8 queries the two levels
   (`compressed_index.IntegerQueries`): s = amax / 127 over the row, hi = round(q / s),
   lo = round((q - s hi) / (s / 128)), and bounds of ||q - q̂|| and of ||s hi|| +
   ||s lo / 128||. In float32: the error bound adds sqrt(D) s 2^-14 to the computed norm
   (the float32 residuals are within ~2^-17 s of the real ones per value) and both are
   scaled by 1 + 2^-16 (the norms' own rounding), so they hold in real arithmetic.
2. `_bound_requests_kernel`, one program per request: n [R, KV] (the norms per KV head,
   reduced over the request's rows like the scores: mean with the token mean and head
   mean, else max), and extra [R] = μ_r + 2 γ Q_r, the factor of each chunk's magnitude in
   its interval (module docstring of `bounded_routing`).
"""

from __future__ import annotations

import torch
from vllm_msa.kernels.routing import HAS_TRITON, INTERPRET

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _bound_rows_kernel(
        q_ptr,  # [T, QH, D] any float dtype, contiguous
        norm_ptr,  # out [T, QH] fp32: ||q||
        hi_ptr,  # out [T, QH, D] int8 (INTEGER)
        lo_ptr,  # out [T, QH, D] int8 (INTEGER)
        scale_ptr,  # out [T] fp32 (INTEGER)
        err_ptr,  # out [T, QH] fp32 >= ||q - q̂|| (INTEGER)
        size_ptr,  # out [T, QH] fp32 >= ||s hi|| + ||s lo / 128|| (INTEGER)
        QH: tl.constexpr,
        D: tl.constexpr,
        QH_P2: tl.constexpr,
        D_P2: tl.constexpr,
        INTEGER: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        offs_h = tl.arange(0, QH_P2)
        offs_d = tl.arange(0, D_P2)
        mask = (offs_h[:, None] < QH) & (offs_d[None, :] < D)
        at = t * QH * D + offs_h[:, None] * D + offs_d[None, :]
        x = tl.load(q_ptr + at, mask=mask, other=0.0).to(tl.float32)
        heads = offs_h < QH
        tl.store(norm_ptr + t * QH + offs_h, tl.sqrt_rn(tl.sum(x * x, axis=1)), mask=heads)
        if INTEGER:
            amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
            s = tl.where(amax > 0, amax / 127.0, 1.0)
            hi = tl.minimum(tl.maximum(tl.floor(x / s + 0.5), -127.0), 127.0)
            part_hi = s * hi
            step = s * (1.0 / 128.0)
            lo = tl.minimum(tl.maximum(tl.floor((x - part_hi) / step + 0.5), -64.0), 64.0)
            part_lo = step * lo
            e = x - part_hi - part_lo
            grow = 1.0 + 1.0 / 65536.0
            err = tl.sqrt_rn(tl.sum(e * e, axis=1)) * grow + (D ** 0.5) * s * (1.0 / 16384.0)
            size = (tl.sqrt_rn(tl.sum(part_hi * part_hi, axis=1))
                    + tl.sqrt_rn(tl.sum(part_lo * part_lo, axis=1))) * grow
            tl.store(hi_ptr + at, hi.to(tl.int8), mask=mask)
            tl.store(lo_ptr + at, lo.to(tl.int8), mask=mask)
            tl.store(scale_ptr + t, s)
            tl.store(err_ptr + t * QH + offs_h, err, mask=heads)
            tl.store(size_ptr + t * QH + offs_h, size, mask=heads)

    @triton.jit
    def _bound_requests_kernel(
        norm_ptr,  # [T, QH] fp32
        err_ptr,  # [T, QH] fp32 (INTEGER)
        size_ptr,  # [T, QH] fp32 (INTEGER)
        cu_ptr,  # [R + 1] int32: request r's rows
        n_ptr,  # out [R, KV] fp32
        extra_ptr,  # out [R] fp32
        two_gamma,  # fp32
        KV: tl.constexpr,
        GROUP: tl.constexpr,  # heads per KV head in a row (1: head mean, folded)
        KV_P2: tl.constexpr,
        GROUP_P2: tl.constexpr,
        HEAD_MAX: tl.constexpr,
        TOKEN_MEAN: tl.constexpr,  # n and μ averaged over the rows (else their max)
        INTEGER: tl.constexpr,
    ):
        r = tl.program_id(0)
        start = tl.load(cu_ptr + r)
        end = tl.load(cu_ptr + r + 1)
        offs_k = tl.arange(0, KV_P2)
        offs_g = tl.arange(0, GROUP_P2)
        mask = (offs_k[:, None] < KV) & (offs_g[None, :] < GROUP)
        at = offs_k[:, None] * GROUP + offs_g[None, :]
        n = tl.zeros([KV_P2], dtype=tl.float32)
        mu = tl.zeros([KV_P2], dtype=tl.float32)
        size = tl.zeros([], dtype=tl.float32)  # Q_r
        for t in range(start, end):
            row = t * (KV * GROUP) + at  # (rows x heads of one step: far below 2^31)
            norms = tl.load(norm_ptr + row, mask=mask, other=0.0)
            big = norms
            if INTEGER:
                errs = tl.load(err_ptr + row, mask=mask, other=0.0)
                big = tl.maximum(norms, tl.load(size_ptr + row, mask=mask, other=0.0))
                if TOKEN_MEAN:
                    mu += tl.max(errs, axis=1)
                else:
                    mu = tl.maximum(mu, tl.max(errs, axis=1))
            if TOKEN_MEAN:
                n += tl.max(norms, axis=1)
            else:
                n = tl.maximum(n, tl.max(norms, axis=1))
            if HEAD_MAX:
                size = tl.maximum(size, tl.max(tl.max(big, axis=1), axis=0))
            else:
                size = tl.maximum(size, tl.sum(tl.sum(big, axis=1), axis=0))
        if TOKEN_MEAN:
            count = (end - start).to(tl.float32)
            n = n / count
            mu = mu / count
        tl.store(n_ptr + r * KV + offs_k, n, mask=offs_k < KV)
        mu_r = tl.max(mu, axis=0) if HEAD_MAX else tl.sum(mu, axis=0)
        tl.store(extra_ptr + r, mu_r + two_gamma * size)


def bound_rows_supported(q: torch.Tensor) -> bool:
    return HAS_TRITON and (q.is_cuda or INTERPRET)


def bound_rows(q: torch.Tensor, integer: bool):
    """(norms [T, QH] fp32, `IntegerQueries` or None) of prepared queries `q` [T, QH, D]."""
    from vllm_msa.attention.compressed_index import IntegerQueries

    t, qh, d = q.shape
    q = q.contiguous()
    f32 = dict(dtype=torch.float32, device=q.device)
    norms = torch.empty(t, qh, **f32)
    if integer:
        hi = torch.empty(t, qh, d, dtype=torch.int8, device=q.device)
        lo = torch.empty_like(hi)
        scale, err, size = torch.empty(t, **f32), torch.empty(t, qh, **f32), torch.empty(
            t, qh, **f32)
    else:
        hi = lo = scale = err = size = norms
    if t:
        _bound_rows_kernel[(t,)](q, norms, hi, lo, scale, err, size, QH=qh, D=d,
                                 QH_P2=triton.next_power_of_2(qh),
                                 D_P2=triton.next_power_of_2(d), INTEGER=integer,
                                 num_warps=4)
    return norms, (IntegerQueries(hi, lo, scale, err, size) if integer else None)


def request_bounds(norms: torch.Tensor, ints, cu: list[int], num_kv_heads: int,
                   head_max: bool, token_mean: bool, two_gamma: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(n [R, KV], extra [R]) from `bound_rows`' outputs, for the rows `cu` of each request."""
    from vllm_msa.kernels.routing import _int_tensor

    qh = norms.shape[1]
    group = qh // num_kv_heads
    num_requests = len(cu) - 1
    n = torch.empty(num_requests, num_kv_heads, dtype=torch.float32, device=norms.device)
    extra = torch.empty(num_requests, dtype=torch.float32, device=norms.device)
    if num_requests:
        _bound_requests_kernel[(num_requests,)](
            norms, norms if ints is None else ints.error, norms if ints is None else ints.size,
            _int_tensor(cu, norms.device), n, extra, two_gamma, KV=num_kv_heads, GROUP=group,
            KV_P2=triton.next_power_of_2(num_kv_heads),
            GROUP_P2=triton.next_power_of_2(group), HEAD_MAX=head_max,
            TOKEN_MEAN=token_mean and not head_max, INTEGER=ints is not None, num_warps=1)
    return n, extra
