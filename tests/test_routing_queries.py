"""Routing's query preparation kernel (`prepare_queries`, kernels/routing.py) against the
spec's arithmetic in float64 (msa-spec §3: cosine routing L2-normalises each head's query,
every head's query is scaled, head_reduce "mean" divides by the number of heads, and with
head mean the heads that share a KV head are summed before the dot product, which is linear).

The kernel computes in fp32 and rounds once to the keys' dtype, so each element may differ
from the float64 value e by the output rounding, u |e| (u = 2^-8 bf16, 2^-24 fp32), plus the
fp32 arithmetic before it: at most (D + G + 8) fp32 steps of 2^-24 of the magnitudes summed,
A = post * sum_g |f(q_g)| (D for the norm's sum of squares, G for the group sum, a few for
the square root, division and the two products).

Runs on the GPU, or on CPU under Triton's interpreter: without a GPU,
`test_kernel_under_triton_interpreter` reruns this file in a child process with
TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch
from test_routing_kernel import msa_params, seed
from triton_interpreter import (
    DEVICE,
    INTERPRET,
    needs_kernel,
    parent_only,
    rerun_under_interpreter,
)

# Rounding to the output dtype: to nearest on the GPU; Triton's interpreter converts fp32 to
# bf16 by truncation (up to a whole unit in the last place), so under it bf16's u doubles.
UNIT = {torch.bfloat16: 2.0**-7 if INTERPRET else 2.0**-8, torch.float32: 2.0**-24}


def spec_queries(q: torch.Tensor, cu: list[int], kv: int, msa) -> torch.Tensor:
    """What the kernel should hold, in float64, written from the spec: [T', QH, D] and the
    magnitudes A of the same shape (see the module docstring)."""
    _, h, d = q.shape
    x = q.double()
    if msa.query_reduce == "last":
        x = x[[e - 1 for e in cu[1:]]]
    if msa.normalize_routing:
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    x = x * msa.routing_scale(d)
    if msa.head_reduce == "max":
        return x, x.abs()
    grouped = x.view(x.shape[0], kv, h // kv, d)
    return grouped.sum(2) / h, grouped.abs().sum(2) / h


@needs_kernel
@pytest.mark.parametrize("aux", ["INFONCE", "INFONCE_DECOUPLE"])  # cosine, dot (scaled)
@pytest.mark.parametrize(("head", "query"), [("mean", "max"), ("max", "max"), ("mean", "last"),
                                             ("max", "last")])
@pytest.mark.parametrize(("heads", "kv", "d"), [(8, 2, 32), (6, 2, 24), (4, 4, 16)])
@pytest.mark.parametrize(("in_dtype", "out_dtype"), [(torch.bfloat16, torch.bfloat16),
                                                     (torch.float32, torch.float32)])
def test_prepared_queries_match_the_spec(aux, head, query, heads, kv, d, in_dtype, out_dtype):
    from vllm_msa.kernels import routing as rk

    gen = seed("queries", aux, head, query, heads, kv, d, str(in_dtype))
    msa = msa_params(head, query, "max", aux)
    cu = [0, 5, 6, 13]
    # Heads of very different sizes (normalising must act per head), one of them all zero
    # (the 1e-12 clamp: a zero query stays zero instead of NaN).
    q = torch.randn(cu[-1], heads, d, generator=gen) * torch.logspace(-2, 2, heads)[:, None]
    q[4, 1] = 0.0
    q = q.to(in_dtype)
    got, new_cu, head_max = rk.prepare_queries(q.to(DEVICE), cu, kv, msa, out_dtype)
    want, magnitude = spec_queries(q, cu, kv, msa)
    assert head_max == (head == "max")
    assert new_cu == (list(range(len(cu))) if query == "last" else cu)
    assert got.dtype == out_dtype and got.is_contiguous() and got.shape == want.shape
    got = got.cpu().double()
    assert not got.isnan().any()
    bound = UNIT[out_dtype] * want.abs() * (1 + 2.0**-20) + (d + heads + 8) * 2.0**-24 * magnitude
    assert ((got - want).abs() <= bound).all(), (got - want).abs().max()
    # The torch ops it replaces compute the same function (within the same bound).
    old, _, _ = rk.prepare_queries_torch(q, cu, kv, msa, out_dtype)
    assert ((old.double() - want).abs() <= bound).all()


@needs_kernel
def test_strided_input():
    """Routing queries are a row subset of the projection's output: strided over tokens."""
    from vllm_msa.kernels import routing as rk

    msa = msa_params("mean", "max", "max", "INFONCE")
    q = torch.randn(10, 4, 2, 16, generator=seed("strided")).to(DEVICE)[:, :, 0]  # stride 32
    got, _, _ = rk.prepare_queries(q, [0, 10], 2, msa, torch.float32)
    want, _, _ = rk.prepare_queries(q.contiguous(), [0, 10], 2, msa, torch.float32)
    assert torch.equal(got, want)


@parent_only
def test_kernel_under_triton_interpreter():
    rerun_under_interpreter(__file__)
