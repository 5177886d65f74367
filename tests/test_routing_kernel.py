"""The fused, batched Triton routing kernel (kernels/routing.py) against the plain-torch
reference (`route` per request, computed on the CPU).

fp32 keys: the kernel multiplies in IEEE fp32, so its selections must equal the reference's
exactly and its scores agree within the fp32 part of the bound below. bf16 keys: the kernel
rounds the (prepared) queries to bf16 once, so scores move by up to the derived bf16 bound and
documents whose reference scores lie within their bounds of each other may swap; everything
else must match.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch
from vllm_msa.kernels.routing import (
    chunk_scores_batched,
    prepare_index,
    route_batched,
    route_batched_reference,
)

from vllm_msa.attention.routing import RoutingIndex, chunk_scores, document_scores
from vllm_msa.config import MSAParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COMBOS = list(itertools.product(("mean", "max"), ("max", "mean", "last"), ("max", "mean")))
BF16_UNIT_ROUNDOFF = 2.0**-8  # bf16 keeps 8 significant bits; round to nearest
FP32_STEP = 2.0**-23  # one fp32 accumulation step, round-to-nearest (2^-24) or truncation


def seed(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def msa_params(head="mean", query="max", chunk="max", aux="INFONCE_DECOUPLE") -> MSAParams:
    return MSAParams.from_dict({"head_reduce_method": head, "query_reduce_method": query,
                                "chunk_reduce_method": chunk, "aux_loss_method": aux,
                                "decouple_router": True}, num_layers=2)


def make_index(num_docs, kv, d, gen, max_chunks=5, keys=None) -> RoutingIndex:
    doc_ids = torch.randperm(10_000, generator=gen)[:num_docs]
    counts = torch.randint(1, max_chunks + 1, (num_docs,), generator=gen)
    if keys is None:
        keys = torch.randn(int(counts.sum()), kv, d, generator=gen)
    return RoutingIndex(routing_keys=keys,
                        chunk_doc_index=torch.repeat_interleave(torch.arange(num_docs), counts),
                        doc_ids=doc_ids)


def planted(num_docs, kv, heads, d, gen, max_chunks, token_counts):
    """An index and queries with structure: keys = noise + alpha_doc * v (v random per KV
    head, alpha_doc ~ N(0, 4)), queries = noise + v of their KV head. Scores then spread with
    alpha, so many top-k sets are separated from the rest by more than the bf16 bound (pure
    noise data would leave the bf16 check vacuous); the noise still makes every token, head
    and chunk matter."""
    index = make_index(num_docs, kv, d, gen, max_chunks)
    v = torch.randn(kv, d, generator=gen)
    alpha = 2 * torch.randn(num_docs, generator=gen)
    keys = index.routing_keys + alpha[index.chunk_doc_index][:, None, None] * v
    index = RoutingIndex(keys, index.chunk_doc_index, index.doc_ids)
    queries = [torch.randn(n, heads, d, generator=gen) + v.repeat_interleave(heads // kv, 0)
               for n in token_counts]
    return index, queries


def with_keys(index: RoutingIndex, dtype, device) -> RoutingIndex:
    return RoutingIndex(index.routing_keys.to(device=device, dtype=dtype),
                        index.chunk_doc_index.to(device), index.doc_ids.to(device))


def cu_of(counts) -> list[int]:
    return [0, *itertools.accumulate(counts)]


def error_bounds(q: torch.Tensor, index: RoutingIndex, msa: MSAParams, unit: float,
                 max_chunks: int) -> torch.Tensor:
    """Per document, a bound on |kernel score - reference score| for one request.

    Let q^ be the fp32 routing query after normalisation and scaling (what both paths
    multiply), k the stored keys (exact in fp32) and A(t, h, c) = sum_d |q^_thd| |k_c,kv(h),d|
    the absolute dot product, which bounds |s(t, h, c)| and every partial sum of it.
      - the kernel rounds its query operand to the keys' dtype once (for head mean after
        summing each group's heads / H, whose entries are bounded by sum_g |q^_g| / H): a
        relative error of at most u per entry, so at most u * A on a head's score (u = 2^-8
        for bf16 keys, 0 for fp32); products are exact in fp32 (bf16 x bf16 fits in 24 bits);
      - every fp32 accumulation step (the dot over head_dim and the folded heads: at most
        H * D terms; the head sum, H; the token sum, T; a document's chunk mean, its chunks;
        normalisation and scaling, about 2 D + a few) adds at most 2^-23 (truncating tensor
        cores; 2^-24 when rounding) of a partial sum bounded by A: n * 2^-23 * A to first
        order, for the kernel and as much again for the reference;
      - mean and max are 1-Lipschitz in the max-norm, so a head mean's error is at most the
        mean of the heads' bounds, a head max's the max, and the token and chunk reductions
        (max or mean) at most the largest bound among their inputs.
    So bound(doc) = (u + 2 n 2^-23) * max_{c in doc} max_t headreduce_h A(t, h, c), with t
    over the tokens the query reduce reads (only the last one for "last").
    """
    t, h, d = q.shape
    kv = index.routing_keys.shape[1]
    qa = q.double()
    if msa.normalize_routing:
        qa = torch.nn.functional.normalize(qa, p=2, dim=-1)
    qa = (qa * msa.routing_scale(d)).abs().view(t, kv, h // kv, d)
    ka = index.routing_keys.double().abs()
    a = torch.einsum("tkgd,ckd->tkgc", qa, ka).reshape(t, h, -1)
    a = a.mean(1) if msa.head_reduce == "mean" else a.amax(1)
    a = a[-1] if msa.query_reduce == "last" else a.amax(0)
    n = h * d + h + t + max_chunks + 2 * d + 16
    per_chunk = (unit + 2 * n * FP32_STEP) * a
    return torch.full((index.num_documents,), 0.0, dtype=torch.float64).scatter_reduce(
        0, index.chunk_doc_index, per_chunk, reduce="amax", include_self=False)


def check_selection(got, ref, ref_scores, bound, doc_ids, exact: bool) -> bool:
    """Compare one request's kernel selection with the reference's; returns whether the
    reference's top-k set is robust (separated from the rest by more than the bounds)."""
    gids, rids = got.doc_ids.cpu().tolist(), ref.doc_ids.tolist()
    gscores = got.scores.cpu().double()
    pos = {doc: i for i, doc in enumerate(doc_ids.tolist())}
    assert len(gids) == len(rids) == len(set(gids))
    # The kernel's own order: scores non-increasing, equal scores by ascending id.
    for p in range(len(gids) - 1):
        assert gscores[p] > gscores[p + 1] or (
            gscores[p] == gscores[p + 1] and gids[p] < gids[p + 1])
    s = ref_scores.double()
    for doc, score in zip(gids, gscores.tolist(), strict=True):
        assert abs(score - s[pos[doc]].item()) <= bound[pos[doc]].item(), doc
    if exact:
        assert gids == rids
    for a, b in zip(gids, rids, strict=True):  # swaps only within the error bounds
        if a != b:
            assert (s[pos[a]] - s[pos[b]]).abs() <= bound[pos[a]] + bound[pos[b]], (a, b)
    top = torch.tensor([pos[doc] for doc in rids])
    rest = torch.ones(len(doc_ids), dtype=torch.bool)
    rest[top] = False
    if not rest.any():
        return False  # every document selected: nothing to separate
    robust = bool((s[top] - bound[top]).min() > (s[rest] + bound[rest]).max())
    if robust:
        assert set(gids) == set(rids)
    return robust


def run_and_check(q, cu, index_cpu, msa, ks, dtype, max_chunks) -> int:
    """route_batched on DEVICE vs the CPU reference for every request; returns how many
    (k < N) selections were robustly separated."""
    index = with_keys(index_cpu, dtype, DEVICE)
    ref_index = with_keys(index_cpu, dtype, "cpu")
    q_dev = q.to(device=DEVICE, dtype=dtype)
    q_ref = q.to(dtype)
    q_before = q_dev.clone()
    got = route_batched(q_dev, torch.tensor(cu, dtype=torch.int32), index, msa, ks)
    assert torch.equal(q_dev, q_before)  # the inputs are left alone
    ref = route_batched_reference(q_ref, cu, ref_index, msa, ks)
    chunks = chunk_scores_batched(q_dev, cu, prepare_index(index), msa).cpu()
    assert len(got) == len(ref) == len(cu) - 1
    unit = BF16_UNIT_ROUNDOFF if dtype == torch.bfloat16 else 0.0
    robust = 0
    for r, (a, b) in enumerate(itertools.pairwise(cu)):
        qr = q_ref[a:b].float()
        ref_chunks = chunk_scores(qr, ref_index, msa)
        ref_docs = document_scores(ref_chunks, ref_index, msa)
        bound = error_bounds(qr, ref_index, msa, unit, max_chunks)
        # Chunk scores (every element written: torch.empty output, NaN would fail).
        chunk_bound = bound[ref_index.chunk_doc_index]  # the chunk's doc bound covers it
        assert ((chunks[r].double() - ref_chunks.double()).abs() <= chunk_bound).all()
        robust += check_selection(got[r], ref[r], ref_docs, bound, index_cpu.doc_ids,
                                  exact=dtype == torch.float32)
    return robust


pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(("head", "query", "chunk"), COMBOS)
@pytest.mark.parametrize("aux", ["INFONCE_DECOUPLE", "INFONCE"])  # dot (scaled), cosine
@pytest.mark.parametrize(("heads", "kv"), [(8, 8), (8, 2)])  # GQA groups of 1 and 4
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(head, query, chunk, aux, heads, kv, dtype):
    gen = seed(head, query, chunk, aux, heads, kv)
    msa = msa_params(head, query, chunk, aux)
    d, max_chunks = 64, 5
    cases = (([40], [16]), ([7, 1, 20, 33, 70], [1, 5, 16, 64, 3]))
    index, queries = planted(60, kv, heads, d, gen, max_chunks, [sum(c) for c, _ in cases])
    robust = 0
    for (counts, ks), q in zip(cases, queries, strict=True):
        robust += run_and_check(q, cu_of(counts), index, msa, ks, dtype, max_chunks)
    if dtype == torch.bfloat16:
        assert robust >= 1, "no bf16 selection was separated beyond the bound: vacuous test"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("head", "query", "chunk"), [("mean", "max", "max"),
                                                      ("max", "mean", "mean")])
def test_documents_of_one_chunk(dtype, head, query, chunk):
    gen = seed("one-chunk", head, query, chunk)
    msa = msa_params(head, query, chunk)
    index = make_index(150, 2, 32, gen, max_chunks=1)
    assert index.routing_keys.shape[0] == 150
    q = torch.randn(30, 8, 32, generator=gen)
    # k = 100 > 64: keys of every document and one topk (smaller k: per-block candidates)
    run_and_check(q, [0, 12, 30], index, msa, [10, 100], dtype, 1)


@pytest.mark.parametrize("head", ["mean", "max"])
def test_msa_4b_shape(head):
    """The MSA-4B shape (32 query heads, 8 KV heads, head_dim 128, bf16) with the default
    tiles: they must build (or be shrunk to fit) and agree with the reference."""
    gen = seed("msa-4b", head)
    msa = msa_params(head=head)
    cases = (([48, 40, 56], [16, 16, 16]),)
    index, queries = planted(120, 8, 32, 128, gen, 10, [sum(c) for c, _ in cases])
    for (counts, ks), q in zip(cases, queries, strict=True):
        run_and_check(q, cu_of(counts), index, msa, ks, torch.bfloat16, 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fewer_documents_than_k(dtype):
    gen = seed("few", str(dtype))
    msa = msa_params()
    index = make_index(3, 2, 32, gen, max_chunks=3)
    q = torch.randn(9, 4, 32, generator=gen)
    got = route_batched(q.to(DEVICE, dtype), [0, 4, 9],
                        with_keys(index, dtype, DEVICE), msa, [16, 3])
    ref = route_batched_reference(q.to(dtype), [0, 4, 9], with_keys(index, dtype, "cpu"),
                                  msa, [16, 3])
    for g, r in zip(got, ref, strict=True):
        assert len(g.doc_ids) == 3
        assert sorted(g.doc_ids.tolist()) == sorted(index.doc_ids.tolist())
        if dtype == torch.float32:
            assert g.doc_ids.tolist() == r.doc_ids.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", ["max", "mean"])
def test_ties_go_to_the_smaller_document_id(dtype, chunk):
    msa = msa_params(chunk=chunk)
    # Documents 9, 3, 7, 5 in bank order; 9, 3 and 5 have identical keys (tied scores).
    key = torch.ones(1, 1, 16)
    small = RoutingIndex(torch.cat([key, key, -key, key]), torch.arange(4),
                         torch.tensor([9, 3, 7, 5]))
    got = route_batched(torch.ones(2, 1, 16, device=DEVICE, dtype=dtype), [0, 2],
                        with_keys(small, dtype, DEVICE), msa, 3)
    assert got[0].doc_ids.tolist() == [3, 5, 9]

    # 300 documents of 1-4 chunks; the second half repeats the first half's keys (same chunk
    # counts), so each pair ties, across chunk tiles and programs. Small integer queries and
    # keys with head_dim 16 (scale 1/4) make every partial sum exact in fp32 whatever the
    # summation order (and bf16 holds the inputs exactly), so the kernel and the reference
    # compute bit-identical scores: twins and any other equal scores must come out in
    # ascending id order in both, and the selections must be identical.
    gen = seed("ties", chunk, str(dtype))
    half = 150
    counts = torch.randint(1, 5, (half,), generator=gen).repeat(2)
    base = torch.randint(-2, 3, (int(counts[:half].sum()), 2, 16), generator=gen).float()
    index = RoutingIndex(torch.cat([base, base]),
                         torch.repeat_interleave(torch.arange(2 * half), counts),
                         torch.randperm(100_000, generator=gen)[: 2 * half])
    q = torch.randint(-2, 3, (25, 8, 16), generator=gen).float()
    cu, ks = [0, 1, 10, 25], [20, 7, 40]
    got = route_batched(q.to(DEVICE, dtype), cu, with_keys(index, dtype, DEVICE), msa, ks)
    ref = route_batched_reference(q, cu, index, msa, ks)
    ids = index.doc_ids.tolist()
    twin = dict(zip(ids, ids[half:] + ids[:half], strict=True))
    pairs = 0
    for g, r in zip(got, ref, strict=True):
        gids, scores = g.doc_ids.cpu().tolist(), g.scores.cpu().tolist()
        assert gids == r.doc_ids.tolist()
        assert scores == r.scores.tolist()
        for p in range(len(gids) - 1):
            assert scores[p] > scores[p + 1] or (
                scores[p] == scores[p + 1] and gids[p] < gids[p + 1])
        pairs += sum(twin[doc] in gids for doc in gids) // 2
    assert pairs >= 10  # the twins were actually selected together


def test_top_k_as_tensor_and_empty_request_refused():
    gen = seed("misc")
    msa = msa_params()
    index = with_keys(make_index(20, 2, 32, gen), torch.float32, DEVICE)
    q = torch.randn(6, 4, 32, generator=gen).to(DEVICE)
    got = route_batched(q, torch.tensor([0, 2, 6], dtype=torch.int32), index, msa,
                        torch.tensor([2, 5]))
    assert [len(s.doc_ids) for s in got] == [2, 5]
    with pytest.raises(ValueError, match="at least one routing-span token"):
        route_batched(q, [0, 0, 6], index, msa, 2)
