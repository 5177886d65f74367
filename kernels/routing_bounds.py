"""The bounded pass of 8-bit routing in Triton: every request's chunk-score brackets [lo, hi]
in one read of the compressed index (`vllm_msa.attention.bounded_routing`, whose docstring
proves the brackets; `chunk_bounds` there is the torch path and this kernel's reference).

Per tile of BLOCK_C chunks, KV head j and block of routing tokens: the 8-bit key tile is
widened to the queries' dtype (int8 and e4m3 values are exact in bfloat16, float16 and
float32), multiplied with `tl.dot` (fp32 accumulation), times the chunk's scale, and the
Cauchy-Schwarz term residual[c, j] * ||q[t, h]|| is added and subtracted; heads are summed
(head mean, queries folded as the exact kernel folds them) or maxed per bound, then tokens are
reduced into the requests they belong to, as `kernels.routing._chunk_scores_kernel` does.
Only lo and hi ([R, C] float32 each) are written.
"""

from __future__ import annotations

import torch
from vllm_msa.kernels.routing import (
    HAS_TRITON,
    INTERPRET,
    _int_tensor,
    _smaller,
    resolve_config,
)

if HAS_TRITON:
    import triton
    import triton.language as tl
    from vllm_msa.kernels.fp8_rows import e4m3_to_f32

    @triton.jit(do_not_specialize=["num_requests", "num_tokens"])
    def _chunk_bounds_kernel(
        q_ptr,  # [T, QH, D] prepared queries, in the exact kernel's dtype
        qn_ptr,  # [T, QH] fp32: their norms
        v_ptr,  # [C, KV, D] int8 values, or e4m3 bytes (uint8)
        scale_ptr,  # [C, KV] fp32
        rho_ptr,  # [C, KV] fp32: residual bounds
        cu_ptr,  # [R + 1] int32
        lo_ptr,  # [R, C] fp32
        hi_ptr,  # [R, C] fp32
        num_chunks,
        num_requests,
        num_tokens,
        stride_qt,
        stride_qh,
        stride_or,
        KV_HEADS: tl.constexpr,
        Q_PER_KV: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_T: tl.constexpr,
        HEAD_MAX: tl.constexpr,
        QUERY_MEAN: tl.constexpr,
        FP8: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_c = pid.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < num_chunks
        offs_d = tl.arange(0, HEAD_DIM)
        offs_t = tl.arange(0, BLOCK_T)
        lo_row = lo_ptr + offs_c
        hi_row = hi_ptr + offs_c
        r = tl.full([], 0, tl.int32)
        r_start = tl.load(cu_ptr)
        r_end = tl.load(cu_ptr + 1)
        if QUERY_MEAN:
            best_lo = tl.zeros([BLOCK_C], dtype=tl.float32)
            best_hi = tl.zeros([BLOCK_C], dtype=tl.float32)
        else:
            best_lo = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
            best_hi = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
        for t0 in range(0, num_tokens, BLOCK_T):
            toks = t0 + offs_t
            mask_t = toks < num_tokens
            if HEAD_MAX:
                lo = tl.full([BLOCK_C, BLOCK_T], float("-inf"), dtype=tl.float32)
                hi = tl.full([BLOCK_C, BLOCK_T], float("-inf"), dtype=tl.float32)
            else:
                acc = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.float32)
                err = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.float32)
            for j in range(KV_HEADS):
                row = offs_c * KV_HEADS + j
                raw = tl.load(v_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
                              mask=mask_c[:, None], other=0)
                if FP8:  # noqa: SIM108 (constexpr branches)
                    k = e4m3_to_f32(raw.to(tl.int32))
                else:
                    k = raw.to(tl.float32)
                if not UPCAST:
                    k = k.to(q_ptr.dtype.element_ty)  # exact: 8-bit values fit the dtype
                scale = tl.load(scale_ptr + row, mask=mask_c, other=0.0)
                rho = tl.load(rho_ptr + row, mask=mask_c, other=0.0)
                for g in tl.static_range(Q_PER_KV):
                    head = j * Q_PER_KV + g
                    q = tl.load(q_ptr + toks[:, None] * stride_qt + head * stride_qh
                                + offs_d[None, :], mask=mask_t[:, None], other=0.0)
                    if UPCAST:
                        q = q.to(tl.float32)
                    qn = tl.load(qn_ptr + toks * (KV_HEADS * Q_PER_KV) + head, mask=mask_t,
                                 other=0.0)
                    s = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale[:, None]
                    e = rho[:, None] * qn[None, :]
                    if HEAD_MAX:
                        lo = tl.maximum(lo, s - e)
                        hi = tl.maximum(hi, s + e)
                    else:
                        acc += s
                        err += e
            if not HEAD_MAX:
                lo = acc - err
                hi = acc + err
            t1 = t0 + BLOCK_T
            more = r < num_requests
            while more:
                cols = (toks >= r_start) & (toks < r_end)
                if QUERY_MEAN:
                    best_lo += tl.sum(tl.where(cols[None, :], lo, 0.0), axis=1)
                    best_hi += tl.sum(tl.where(cols[None, :], hi, 0.0), axis=1)
                else:
                    best_lo = tl.maximum(
                        best_lo, tl.max(tl.where(cols[None, :], lo, float("-inf")), axis=1))
                    best_hi = tl.maximum(
                        best_hi, tl.max(tl.where(cols[None, :], hi, float("-inf")), axis=1))
                done = r_end <= t1
                if done:
                    if QUERY_MEAN:
                        n = (tl.full([BLOCK_C], 0, tl.int32) + (r_end - r_start)).to(tl.float32)
                        best_lo = tl.math.div_rn(best_lo, n)
                        best_hi = tl.math.div_rn(best_hi, n)
                    tl.store(lo_row, best_lo, mask=mask_c)
                    tl.store(hi_row, best_hi, mask=mask_c)
                    lo_row += stride_or
                    hi_row += stride_or
                    r += 1
                    r_start = r_end
                    r_end = tl.load(cu_ptr + r + 1, mask=r < num_requests, other=0)
                    if QUERY_MEAN:
                        best_lo = tl.zeros([BLOCK_C], dtype=tl.float32)
                        best_hi = tl.zeros([BLOCK_C], dtype=tl.float32)
                    else:
                        best_lo = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
                        best_hi = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
                more = done & (r < num_requests) & (r_start < t1)


def chunk_bounds_kernel(q: torch.Tensor, cu: list[int], head_max: bool, query_mean: bool,
                        values: torch.Tensor, scale: torch.Tensor, residual: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) [R, C] fp32 of the prepared queries `q` ([T, QH, D] in the exact kernel's
    dtype, rows of request r at cu[r]:cu[r + 1]) against 8-bit `values` [C, KV, D]."""
    num_chunks, kv, d = values.shape
    num_requests, num_tokens = len(cu) - 1, q.shape[0]
    lo = torch.empty(num_requests, num_chunks, dtype=torch.float32, device=values.device)
    hi = torch.empty_like(lo)
    if num_chunks == 0:
        return lo, hi
    q = q.contiguous()
    q_norm = q.float().norm(dim=-1).contiguous()
    fp8 = values.dtype != torch.int8
    v = values.view(torch.uint8) if fp8 else values
    cfg = resolve_config(None, q.dtype, head_max)
    while True:
        block_t = min(cfg.block_t, max(16, triton.next_power_of_2(num_tokens)))
        try:
            _chunk_bounds_kernel[(triton.cdiv(num_chunks, cfg.block_c),)](
                q, q_norm, v, scale, residual, _int_tensor(cu, values.device), lo, hi,
                num_chunks, num_requests, num_tokens, q.stride(0), q.stride(1), lo.stride(0),
                KV_HEADS=kv, Q_PER_KV=q.shape[1] // kv, HEAD_DIM=d, BLOCK_C=cfg.block_c,
                BLOCK_T=block_t, HEAD_MAX=head_max, QUERY_MEAN=query_mean, FP8=fp8,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                UPCAST=INTERPRET and q.dtype != torch.float32,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        except Exception as e:  # Triton's OutOfResources: smaller tiles
            smaller = _smaller(cfg)
            if type(e).__name__ != "OutOfResources" or smaller is None:
                raise
            cfg = smaller
            continue
        return lo, hi
