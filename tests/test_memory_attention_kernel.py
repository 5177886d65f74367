"""The memory-attention kernel (kernels/memory_attention.py) against an independent reference:
per request, one softmax over [memory keys ; local keys (causal)] in float64 (msa-spec §3:
merging local and memory attention by log-sum-exp is exactly that softmax).

The kernel runs on the GPU, or on CPU under Triton's interpreter: on a machine without a GPU,
`test_kernel_under_triton_interpreter` reruns this file in a child process with
TRITON_INTERPRET=1 (Triton picks the interpreter when a kernel is defined, so it cannot be
switched on inside a process that has already imported the kernel).

bf16 tolerance, derived: inputs are bf16 values the reference reads exactly; products and
sums accumulate in fp32 (errors ~2^-24 relative, negligible). The kernel rounds the softmax
weights p to bf16 before p·V (relative error <= u = 2^-8 each, so <= u·max|v| on the output)
and rounds the result to bf16 (<= u/2·|out|). Bound: u·max|v| + u/2·|out| + 1e-6.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from triton_interpreter import rerun_under_interpreter

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
BF16_U = 2.0**-8

needs_kernel = pytest.mark.skipif(not (HAS_CUDA or INTERPRET),
                                  reason="needs a GPU or TRITON_INTERPRET=1")


def gen(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def softmax_attention(q, keys, values, visible):
    """float64 attention of q [H, D] over keys/values [n, H, D] where `visible` [n] is true:
    (out [H, D], lse [H]); no visible key -> out 0, lse -inf."""
    logits = torch.einsum("hd,nhd->hn", q, keys)
    logits = logits.masked_fill(~visible[None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    weights = torch.exp(logits - lse[:, None]).nan_to_num(0.0)
    return torch.einsum("hn,nhd->hd", weights, values), lse


def make_case(*, requests, group, kv, head_dim, dtype, seed):
    """Random requests: query tokens, local K/V (causal), memory slots in a shared pool.

    `requests` = [(query tokens, local context before them, memory slots)]."""
    g = gen(seed, requests, group, kv, head_dim, str(dtype))
    heads = group * kv
    pool_size = sum(m for _, _, m in requests) + 7
    pool_k = torch.randn(pool_size, kv, head_dim, generator=g).to(dtype)
    pool_v = torch.randn(pool_size, kv, head_dim, generator=g).to(dtype)
    perm = torch.randperm(pool_size, generator=g)  # requests own scattered slots
    case = {"pool_k": pool_k, "pool_v": pool_v, "heads": heads, "reqs": [],
            "scale": head_dim**-0.5}
    used = 0
    cu_q, cu_s, slots = [0], [0], []
    for n_q, n_ctx, n_mem in requests:
        mine = perm[used:used + n_mem]
        used += n_mem
        total = n_ctx + n_q
        case["reqs"].append({
            "q": torch.randn(n_q, heads, head_dim, generator=g).to(dtype),
            "k": torch.randn(total, kv, head_dim, generator=g).to(dtype),
            "v": torch.randn(total, kv, head_dim, generator=g).to(dtype),
            "ctx": n_ctx, "slots": mine})
        slots.append(mine)
        cu_q.append(cu_q[-1] + n_q)
        cu_s.append(cu_s[-1] + n_mem)
    case["cu_q"], case["cu_s"] = cu_q, cu_s
    case["slots"] = torch.cat(slots).to(torch.int32)
    return case


def local_and_expected(case):
    """Per query row: local (out, lse) [causal over own context] and the expected merged
    output/LSE (one softmax over memory + local), all float64."""
    group = case["heads"] // case["pool_k"].shape[1]
    local_out, local_lse, want, want_lse = [], [], [], []
    for req in case["reqs"]:
        mem_k = case["pool_k"][req["slots"].long()].double().repeat_interleave(group, 1)
        mem_v = case["pool_v"][req["slots"].long()].double().repeat_interleave(group, 1)
        k = req["k"].double().repeat_interleave(group, 1)
        v = req["v"].double().repeat_interleave(group, 1)
        for i in range(req["q"].shape[0]):
            q = req["q"][i].double() * case["scale"]
            seen = torch.arange(k.shape[0]) <= req["ctx"] + i
            out, lse = softmax_attention(q, k, v, seen)
            local_out.append(out)
            local_lse.append(lse)
            both = torch.cat([torch.ones(mem_k.shape[0], dtype=torch.bool), seen])
            out, lse = softmax_attention(q, torch.cat([mem_k, k]), torch.cat([mem_v, v]), both)
            want.append(out)
            want_lse.append(lse)
    stack = lambda xs: torch.stack(xs) if xs else torch.zeros(0)  # noqa: E731
    return stack(local_out), stack(local_lse).T, stack(want), stack(want_lse).T


def memory_only_expected(case):
    group = case["heads"] // case["pool_k"].shape[1]
    outs, lses = [], []
    for req in case["reqs"]:
        mem_k = case["pool_k"][req["slots"].long()].double().repeat_interleave(group, 1)
        mem_v = case["pool_v"][req["slots"].long()].double().repeat_interleave(group, 1)
        for i in range(req["q"].shape[0]):
            visible = torch.ones(mem_k.shape[0], dtype=torch.bool)
            out, lse = softmax_attention(req["q"][i].double() * case["scale"], mem_k, mem_v,
                                         visible)
            outs.append(out)
            lses.append(lse)
    return torch.stack(outs), torch.stack(lses).T


def run_kernel(case, dtype, *, local=None, out=None, out_rows=None, with_lse=True):
    from vllm_msa.kernels.memory_attention import MemoryBatch, memory_attention

    query = torch.cat([r["q"] for r in case["reqs"]]).to(DEVICE)
    batch = MemoryBatch.build(case["cu_q"], case["cu_s"], case["slots"].to(DEVICE))
    lse = torch.empty(case["heads"], query.shape[0], device=DEVICE) if with_lse else None
    if local is not None:
        local = (local[0].to(DEVICE, dtype), local[1].float().to(DEVICE))
    result, lse = memory_attention(query, case["pool_k"].to(DEVICE), case["pool_v"].to(DEVICE),
                                   batch, case["scale"], local=local, out=out,
                                   out_rows=out_rows, out_lse=lse)
    return result, lse


def tolerance(case, want, dtype):
    if dtype == torch.float32:
        return 2e-5 * (1 + want.abs())
    max_v = max(case["pool_v"].float().abs().max(),
                max(r["v"].float().abs().max() for r in case["reqs"]))
    return BF16_U * max_v + BF16_U / 2 * want.abs() + 1e-6


SHAPES = [
    # (requests [(query tokens, context before, memory slots)], group, kv heads, head_dim)
    ([(1, 5, 12), (1, 0, 3), (1, 40, 70)], 4, 2, 64),  # decode, GQA 4
    ([(1, 9, 0), (1, 3, 130)], 2, 2, 128),  # a request with no memory
    ([(17, 0, 9), (3, 11, 66), (33, 2, 1)], 4, 2, 64),  # prefill tiles, partial tiles
    ([(5, 3, 20), (1, 0, 64)], 5, 1, 32),  # group of 5 (padded to 8)
    ([(2, 1, 7)], 1, 3, 48),  # MHA, head_dim not a power of two
]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_merged_matches_joint_softmax(shape, dtype):
    requests, group, kv, head_dim = SHAPES[shape]
    case = make_case(requests=requests, group=group, kv=kv, head_dim=head_dim, dtype=dtype,
                     seed=shape)
    local_out, local_lse, _, want_lse = local_and_expected(case)
    # The kernel receives the local output in the model dtype (as the paged pass yields it);
    # the expectation uses that same rounded value, so only the kernel's own error remains.
    local_rounded = local_out.to(dtype)
    want = merged_expectation(case, local_rounded.double(), local_lse)
    got, got_lse = run_kernel(case, dtype, local=(local_rounded, local_lse))
    got = got.double().cpu()
    assert got.shape == want.shape
    assert ((got - want).abs() <= tolerance(case, want, dtype)).all(), \
        (got - want).abs().max().item()
    finite = torch.isfinite(want_lse)
    assert torch.allclose(got_lse.double().cpu()[finite], want_lse[finite], rtol=1e-5,
                          atol=1e-5)


def merged_expectation(case, local_out, local_lse):
    """Joint-softmax result expressed with a given local output (which may be rounded): the
    memory part in float64, combined with the local part by its exact LSE weight."""
    mem_out, mem_lse = memory_only_expected(case)
    top = torch.maximum(mem_lse, local_lse)
    w_mem = torch.exp(mem_lse - top).nan_to_num(0.0)
    w_loc = torch.exp(local_lse - top).nan_to_num(0.0)
    return (w_mem.T[..., None] * mem_out.nan_to_num(0.0) + w_loc.T[..., None] * local_out) \
        / (w_mem + w_loc).T[..., None]


@needs_kernel
def test_merge_with_exact_local_is_the_joint_softmax():
    """With an fp32 local input the kernel's merge reproduces softmax over the union."""
    case = make_case(requests=[(3, 4, 10), (1, 20, 33)], group=4, kv=2, head_dim=64,
                     dtype=torch.float32, seed=99)
    local_out, local_lse, want, want_lse = local_and_expected(case)
    got, got_lse = run_kernel(case, torch.float32, local=(local_out.float(), local_lse))
    assert torch.allclose(got.double().cpu(), want, rtol=2e-5, atol=2e-5)
    assert torch.allclose(got_lse.double().cpu(), want_lse, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_memory_only(dtype):
    case = make_case(requests=[(1, 0, 90), (4, 0, 5), (1, 0, 0)], group=4, kv=2,
                     head_dim=64, dtype=dtype, seed=7)
    want, want_lse = memory_only_expected(case)
    got, got_lse = run_kernel(case, dtype)
    got = got.double().cpu()
    nomem = slice(5, 6)  # the request without memory: zeros and -inf
    assert (got[nomem] == 0).all() and torch.isinf(got_lse[:, nomem]).all()
    keep = slice(0, 5)
    assert ((got[keep] - want[keep]).abs() <= tolerance(case, want[keep], dtype)).all()
    assert torch.allclose(got_lse.double().cpu()[:, keep], want_lse[:, keep], rtol=1e-5,
                          atol=1e-5)


@needs_kernel
def test_scatters_into_output_rows_only():
    """With `out_rows` the result lands in those rows of a bigger output; others untouched."""
    dtype = torch.bfloat16
    case = make_case(requests=[(1, 3, 10), (2, 1, 4)], group=2, kv=2, head_dim=64,
                     dtype=dtype, seed=3)
    local_out, local_lse, _, _ = local_and_expected(case)
    local_rounded = local_out.to(dtype)
    want = merged_expectation(case, local_rounded.double(), local_lse)
    output = torch.full((9, case["heads"], 64), 7.0, dtype=dtype, device=DEVICE)
    rows = torch.tensor([6, 1, 4], device=DEVICE)
    run_kernel(case, dtype, local=(local_rounded, local_lse), out=output, out_rows=rows,
               with_lse=False)
    output = output.double().cpu()
    assert ((output[[6, 1, 4]] - want).abs() <= tolerance(case, want, dtype)).all()
    untouched = [i for i in range(9) if i not in (6, 1, 4)]
    assert (output[untouched] == 7.0).all()


def with_reservations(case, extra):
    """The batch as staging builds it: each request reserves `extra` more slots than it
    fills (they hold other pool rows: here, other requests' memory), and a device tensor says
    how many of its slots are filled."""
    from vllm_msa.kernels.memory_attention import MemoryBatch

    others = torch.randperm(case["pool_k"].shape[0], generator=gen("junk"))[:extra]
    cu, parts = [0], []
    for req in case["reqs"]:
        parts += [req["slots"], others]
        cu.append(cu[-1] + req["slots"].numel() + extra)
    counts = torch.tensor([r["slots"].numel() for r in case["reqs"]], device=DEVICE)
    return MemoryBatch.build(case["cu_q"], cu, torch.cat(parts).to(torch.int32).to(DEVICE),
                             counts=counts)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("requests", [[(1, 5, 6), (1, 2, 9), (1, 4, 1)],
                                      [(1, 5, 6), (20, 2, 9), (3, 4, 1)]],
                         ids=["decode", "prefill"])
def test_counts_limit_requests_to_their_filled_slots(requests, dtype):
    """Only the first counts[r] slots of a request's reservation are attended: the rest of
    it is never read, whatever it holds (staging reserves the worst case up front)."""
    from vllm_msa.kernels.memory_attention import memory_attention

    case = make_case(requests=requests, group=4, kv=2, head_dim=64, dtype=dtype, seed=11)
    local_out, local_lse, _, _ = local_and_expected(case)
    local_rounded = local_out.to(dtype)
    want = merged_expectation(case, local_rounded.double(), local_lse)
    query = torch.cat([r["q"] for r in case["reqs"]]).to(DEVICE)
    got, _ = memory_attention(query, case["pool_k"].to(DEVICE), case["pool_v"].to(DEVICE),
                              with_reservations(case, extra=5), case["scale"],
                              local=(local_rounded.to(DEVICE), local_lse.float().to(DEVICE)))
    got = got.double().cpu()
    assert ((got - want).abs() <= tolerance(case, want, dtype)).all(), \
        (got - want).abs().max().item()


def test_reference_honours_counts():
    from vllm_msa.kernels.memory_attention import memory_attention_reference

    case = make_case(requests=[(2, 5, 9), (1, 3, 4)], group=2, kv=2, head_dim=32,
                     dtype=torch.float32, seed=6)
    local_out, local_lse, want, _ = local_and_expected(case)
    batch = with_reservations(case, extra=3)
    got, _ = memory_attention_reference(torch.cat([r["q"] for r in case["reqs"]]).to(DEVICE),
                                        case["pool_k"].to(DEVICE), case["pool_v"].to(DEVICE),
                                        batch, case["scale"],
                                        local=(local_out.float().to(DEVICE),
                                               local_lse.float().to(DEVICE)))
    assert torch.allclose(got.double().cpu(), want, rtol=1e-5, atol=1e-5)


def test_reference_matches_joint_softmax():
    """The module's own torch fallback (used where Triton cannot run) is also exact."""
    from vllm_msa.kernels.memory_attention import MemoryBatch, memory_attention_reference

    case = make_case(requests=[(2, 5, 9), (1, 0, 0)], group=2, kv=2, head_dim=32,
                     dtype=torch.float32, seed=5)
    local_out, local_lse, want, _ = local_and_expected(case)
    batch = MemoryBatch.build(case["cu_q"], case["cu_s"], case["slots"])
    got, _ = memory_attention_reference(torch.cat([r["q"] for r in case["reqs"]]),
                                        case["pool_k"], case["pool_v"], batch, case["scale"],
                                        local=(local_out.float(), local_lse.float()))
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(HAS_CUDA or INTERPRET, reason="the kernel runs directly here")
def test_kernel_under_triton_interpreter():
    rerun_under_interpreter(__file__)


def test_tile_tables_are_shared_only_for_the_same_layout():
    """The router layers of a step share tile tables (one upload per step, not per layer):
    the same layout gets the cached table, another layout its own."""
    from vllm_msa.kernels.memory_attention import MemoryBatch

    cache: dict = {}
    slots = torch.arange(12)
    counts = torch.tensor([3, 2])
    first = MemoryBatch.build([0, 20, 21], [0, 6, 12], slots, counts=counts, cache=cache)
    again = MemoryBatch.build([0, 20, 21], [0, 6, 12], slots + 1, counts=counts, cache=cache)
    assert again.tiles is first.tiles and torch.equal(again.slots, slots + 1)
    fresh = MemoryBatch.build([0, 20, 21], [0, 6, 12], slots, counts=counts)
    assert torch.equal(first.tiles, fresh.tiles) and first.block_m == fresh.block_m == 16
    other = MemoryBatch.build([0, 1, 2], [0, 6, 12], slots, counts=counts, cache=cache)
    assert other.tiles.tolist() == [[0, 1, 0, 6, 0], [1, 1, 6, 12, 1]] and other.block_m == 1
