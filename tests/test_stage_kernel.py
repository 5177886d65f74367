"""The staging kernel (kernels/stage.py) against the host's chunk lists: for random banks
(sparse, shuffled document ids; documents of 1-9 chunks) and random top-k keys, the pool rows
a request reserved hold exactly `host[ServedBank.chunk_indices(its documents)]`, in that order,
and counts[r] is their number. Slots past that stay untouched.

Runs on the GPU, or on CPU under Triton's interpreter: without a GPU,
`test_kernel_under_triton_interpreter` reruns this file in a child process with
TRITON_INTERPRET=1 (as tests/test_memory_attention_kernel.py does)."""

from __future__ import annotations

import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from triton_interpreter import rerun_under_interpreter

from vllm_msa.attention.index_parallel import IndexShard
from vllm_msa.attention.tiers import ServedBank

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_kernel = pytest.mark.skipif(not (HAS_CUDA or INTERPRET),
                                  reason="needs a GPU or TRITON_INTERPRET=1")


def random_bank(rng: random.Random, num_docs: int) -> ServedBank:
    doc_ids = rng.sample(range(10 * num_docs), num_docs)
    offsets = np.concatenate([[0], np.cumsum([rng.randint(1, 9) for _ in doc_ids])])
    return ServedBank(name="b", bank=SimpleNamespace(doc_ids=doc_ids), index={}, host_keys={},
                      host_values={}, doc_position={d: i for i, d in enumerate(doc_ids)},
                      chunk_offsets=offsets.tolist(), shard=IndexShard.whole(offsets))


def routing_tables(bank: ServedBank) -> tuple[torch.Tensor, torch.Tensor, dict[int, int]]:
    """What the routing kernel's prepared index holds, written from its definition: a
    document's tie-break is N - 1 - (rank of its id); positions maps tie-break -> bank
    position; doc_start is the chunk offsets by position."""
    ids = bank.bank.doc_ids
    n = len(ids)
    rank = {d: i for i, d in enumerate(sorted(ids))}
    tie = {d: n - 1 - rank[d] for d in ids}
    positions = torch.empty(n, dtype=torch.int64)
    for d in ids:
        positions[tie[d]] = bank.doc_position[d]
    return positions, torch.tensor(bank.chunk_offsets, dtype=torch.int64), tie


def sort_key(score: float, tiebreak: int) -> int:
    """The routing kernel's key layout: score bits above, tie-break below (only the low half
    matters for staging; the scores here just shuffle the order)."""
    bits = int(np.float32(score).view(np.int32))
    return (bits << 32) | tiebreak


@needs_kernel
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("seed", range(6))
def test_staged_rows_are_the_documents_chunks(seed, fp8):
    """With an FP8 host tier the rows are dequantised on the way: the pool holds exactly
    `quant.dequantize` of the chunks (head_dim 24 exercises the kernel's padded columns)."""
    from vllm_msa.kernels.stage import stage_routed

    from vllm_msa.bank.quant import dequantize, quantize

    rng = random.Random(seed)
    bank = random_bank(rng, num_docs=rng.randint(5, 60))
    positions, doc_start, tie = routing_tables(bank)
    k_top = rng.randint(1, min(5, len(tie)))
    ks = [rng.randint(1, k_top) for _ in range(rng.randint(1, 6))]  # mixed per-request k
    lists = [rng.sample(bank.bank.doc_ids, k_top) for _ in ks]
    keys = torch.tensor([[sort_key(rng.random(), tie[d]) for d in lst] for lst in lists])
    chunks, kv, hd = bank.chunk_offsets[-1], 2, 24 if fp8 and seed % 2 else 16
    src_k = torch.randn(chunks, kv, hd, dtype=torch.bfloat16)
    src_v = torch.randn(chunks, kv, hd, dtype=torch.bfloat16)
    scales = None
    if fp8:
        (src_k, scale_k), (src_v, scale_v) = quantize(src_k * 3), quantize(src_v / 5)
        scales = (scale_k.to(DEVICE), scale_v.to(DEVICE))
        want_k = dequantize(src_k, scale_k, torch.bfloat16)
        want_v = dequantize(src_v, scale_v, torch.bfloat16)
    else:
        want_k, want_v = src_k, src_v
    width = bank.worst_case_chunks(k_top)
    pool_size = len(ks) * width + 5
    table = torch.randperm(pool_size)[:len(ks) * width].view(len(ks), width)
    dst_k = torch.full((pool_size, kv, hd), 7.0, dtype=torch.bfloat16, device=DEVICE)
    dst_v = torch.full_like(dst_k, 7.0)
    counts = torch.full((len(ks),), -1, dtype=torch.int64, device=DEVICE)
    sizes = np.diff(bank.chunk_offsets)
    keys = keys.to(DEVICE)
    if seed % 2:  # routing hands up a strided view when k is below its power of two
        wide = torch.full((len(ks), k_top + 3), -1, dtype=torch.int64, device=DEVICE)
        wide[:, :k_top] = keys
        keys = wide[:, :k_top]
    stage_routed(src_k.to(DEVICE), src_v.to(DEVICE), dst_k, dst_v, keys,
                 torch.tensor(ks, dtype=torch.int32, device=DEVICE), positions.to(DEVICE),
                 doc_start.to(DEVICE), table.to(DEVICE), counts, int(sizes.max()), scales)
    written = set()
    for r, (lst, k) in enumerate(zip(lists, ks, strict=True)):
        want = bank.chunk_indices(lst[:k])  # the first k keys: the request's own top-k
        assert counts[r].item() == want.numel()
        slots = table[r, :want.numel()]
        assert torch.equal(dst_k.cpu()[slots], want_k[want])
        assert torch.equal(dst_v.cpu()[slots], want_v[want])
        written.update(slots.tolist())
    untouched = [s for s in range(pool_size) if s not in written]
    assert (dst_k.cpu()[untouched] == 7.0).all() and (dst_v.cpu()[untouched] == 7.0).all()


@pytest.mark.skipif(HAS_CUDA or INTERPRET, reason="the kernel runs directly here")
def test_kernel_under_triton_interpreter():
    rerun_under_interpreter(__file__)
