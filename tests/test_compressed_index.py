"""An 8-bit routing index (`compressed_index.py`) routed by `bounded_routing.py` selects exactly
what the full-precision index selects: the same ids, in the same order, with bit-identical
scores, for every reduce combination x dot/cosine x GQA/MQA/MHA, both 8-bit formats, shards,
and banks built to defeat the bounds (near-ties finer than the 8-bit step, exact ties broken
only by id, pairs whose 8-bit scores rank the other way round).

On CPU the torch path routes both; the kernels do under Triton's interpreter (the last test
re-runs this file there) and on a GPU.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_index_parallel import (
    assert_same,
    make_index,
    msa_params,
    route_sharded,
    shard_indexes,
)
from triton_interpreter import (
    DEVICE,
    INTERPRET,
    needs_kernel,
    parent_only,
    rerun_under_interpreter,
)
from vllm_msa.kernels.routing import chunk_scores_batched, route_batched

from vllm_msa.attention.bounded_routing import (
    CompressedRoutingIndex,
    bound_queries,
    chunk_bounds,
    document_bounds,
    fused_intervals,
    route_compressed,
    widened,
)
from vllm_msa.attention.compressed_index import compress
from vllm_msa.attention.routing import RoutingIndex, chunk_scores, document_scores

COMBOS = list(itertools.product(("mean", "max"), ("max", "mean", "last"), ("max", "mean")))
LAYOUTS = {"gqa": (4, 2), "mqa": (4, 1), "mha": (2, 2)}
SCORES = {"dot": "INFONCE_DECOUPLE", "cosine": "INFONCE"}


def compressed(index: RoutingIndex, dtype: str = "int8",
               shared_scale: bool | None = None) -> CompressedRoutingIndex:
    """`index` as serving keeps it with an 8-bit index: the exact keys read back by range."""
    keys = compress(index.routing_keys, dtype, shared_scale)

    def exact(ranges):
        return torch.cat([index.routing_keys[a:b] for a, b in ranges])

    return CompressedRoutingIndex.build(dataclasses.replace(index, routing_keys=keys.values),
                                        keys, exact, index.routing_keys.dtype)


def on_device(index: RoutingIndex, normalize: bool = False) -> RoutingIndex:
    keys = index.routing_keys
    if normalize:  # cosine: the runtime normalises the index at load
        keys = torch.nn.functional.normalize(keys.float(), dim=-1).to(keys.dtype)
    return RoutingIndex(keys.to(DEVICE), index.chunk_doc_index.to(DEVICE),
                        index.doc_ids.to(DEVICE))


def queries(num_tokens: int, heads: int, d: int, gen) -> torch.Tensor:
    return torch.randn(num_tokens, heads, d, generator=gen).to(DEVICE)


def routing_cases():
    """Every reduce combination x dot/cosine x layout x 8-bit format (under the slow
    interpreter: every combination once, GQA, int8, dot; cosine and the others on one)."""
    for combo, score, layout, dtype in itertools.product(COMBOS, SCORES, LAYOUTS,
                                                         ("int8", "fp8_e4m3")):
        if INTERPRET and (layout, dtype) != ("gqa", "int8") and not (
                combo == COMBOS[0] and score == "dot"):
            continue
        if INTERPRET and score == "cosine" and combo != COMBOS[0]:
            continue
        yield pytest.param(*combo, score, layout, dtype,
                           id="-".join((*combo, score, layout, dtype)))


def test_compressed_keys_bound_their_error():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(300, 3, 32, generator=gen) * torch.rand(300, 3, 1, generator=gen) * 9
    keys[7] = 0.0  # an all-zero chunk
    for dtype, want in (("int8", torch.int8), ("fp8_e4m3", torch.float8_e4m3fn)):
        for stored in (torch.float32, torch.bfloat16):
            exact = keys.to(stored)
            c = compress(exact, dtype)
            assert c.values.dtype == want and c.dtype_name == dtype
            err = (exact.double() - c.dequantized().double()).norm(dim=-1)
            assert bool((c.residual.double() >= err).all())
            norms = torch.maximum(exact.double().norm(dim=-1), c.dequantized().double().norm(
                dim=-1)).amax(-1)
            assert bool((c.magnitude.double() >= norms).all())
            assert float(c.residual[7].max()) == 0.0
            # The bound is the error, not a loose stand-in for it.
            rel = (c.residual.double() / exact.double().norm(dim=-1).clamp_min(1e-30))[8:]
            assert float(rel.max()) < (0.02 if dtype == "int8" else 0.08)
            # Heads of different sizes keep a scale each (one shared scale would round the
            # small ones away).
            assert not c.shared_scale
    # One scale per chunk: where the heads have one size, chosen by itself; forced, the
    # bounds still hold and the columns of the scale are equal.
    assert compress(torch.randn(50, 3, 32, generator=gen)).shared_scale
    shared = compress(keys, "int8", shared_scale=True)
    assert shared.shared_scale and bool((shared.scale == shared.scale[:, :1]).all())
    assert shared.scale.stride(1) == 0  # stored once per chunk
    assert shared.nbytes == 300 * (3 * 32 + 4 + 3 * 4 + 4)
    err = (keys.double() - shared.dequantized().double()).norm(dim=-1)
    assert bool((shared.residual.double() >= err).all())
    # Bounds stay float32 under a 16-bit default dtype (vLLM loads models under one).
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        c = compress(keys, "int8")
    finally:
        torch.set_default_dtype(default)
    assert {c.scale.dtype, c.residual.dtype, c.magnitude.dtype} == {torch.float32}


@pytest.mark.parametrize(("head", "query", "chunk", "score", "layout", "dtype"),
                         list(routing_cases()))
def test_selects_exactly_what_the_full_index_selects(head, query, chunk, score, layout,
                                                     dtype):
    heads, kv = LAYOUTS[layout]
    msa = msa_params(head, query, chunk, SCORES[score])
    gen = torch.Generator().manual_seed(hash((head, query, chunk, score, layout, dtype))
                                        % 2**31)
    full = on_device(make_index(torch.randint(1, 6, (60,), generator=gen).tolist(), kv, 16,
                                gen, duplicates=((3, 40), (5, 41))), score == "cosine")
    index = compressed(full, dtype)
    qr = queries(11, heads, 16, gen)
    cu, ks = [0, 4, 5, 11], [1, 7, 60]
    assert_same(route_compressed(qr, cu, index, msa, ks), route_batched(qr, cu, full, msa, ks))
    # The certified intervals hold every document's score as the torch path computes it.
    bq = bound_queries(qr, cu, kv, msa, None)
    lo, hi = document_bounds(index, msa, *widened(bq, index, *chunk_bounds(
        bq, index.keys, msa.query_reduce)))
    for r, (a, b) in enumerate(itertools.pairwise(cu)):
        exact = document_scores(chunk_scores(qr[a:b], full, msa), full, msa)
        assert bool((lo[r] <= exact).all()) and bool((exact <= hi[r]).all())


def near_tie_bank(kv: int, d: int, gen, spread: float, dtype=torch.float32) -> RoutingIndex:
    """Thirty copies of one document, each moved by `spread` (relative) in a random direction
    (far below the 8-bit step for small spreads: their 8-bit keys are mostly identical),
    four exact duplicates among them, and thirty unrelated documents."""
    base = torch.randn(3, kv, d, generator=gen)
    docs = [base + spread * base.abs().mean() * torch.randn(3, kv, d, generator=gen)
            for _ in range(30)]
    docs[7] = docs[3].clone()
    docs[12] = docs[3].clone()
    docs[20] = docs[25].clone()
    docs += [torch.randn(3, kv, d, generator=gen) for _ in range(30)]
    order = torch.randperm(60, generator=gen).tolist()
    keys = torch.cat([docs[i] for i in order])
    return RoutingIndex(keys.to(dtype), torch.arange(60).repeat_interleave(3),
                        torch.randperm(500, generator=gen)[:60])


def integer_scores(bq, keys, query: str) -> torch.Tensor:
    """Ŝ [R, C] in float64 as the int8 x int8 pass defines it: q̂ . k̂, with q̂ the two int8
    levels of the kernels' queries and k̂ the 8-bit keys times their scales."""
    ints = bq.integer
    step = ints.scale.double()[:, None, None]
    q = ints.hi.double() * step + ints.lo.double() * (step / 128)
    k = keys.dequantized().double()
    t, qh, d = q.shape
    kv = k.shape[1]
    per_token = torch.einsum("tkgd,ckd->tkgc", q.view(t, kv, qh // kv, d), k)
    per_token = per_token.amax(dim=(1, 2)) if bq.head_max else per_token.sum(dim=(1, 2))
    return torch.stack([per_token[a:b].mean(0) if query == "mean" else per_token[a:b].amax(0)
                        for a, b in itertools.pairwise(bq.cu)])


def bounds_kernel_cases():
    """Every path (int8 queries; int8 keys widened with one scale per chunk or per head; e4m3)
    x a third of the reduce combinations x bf16 / fp32 keys (under the slow interpreter: bf16,
    two combinations for the int8 queries and one for the others)."""
    paths = [("int8", True, True), ("int8", True, False), ("int8", False, False),
             ("fp8_e4m3", False, False)]
    for path in paths:
        combos = (COMBOS[::6] if path[2] else COMBOS[:1]) if INTERPRET else COMBOS[::3]
        for combo in combos:
            for keys_dtype in [torch.bfloat16] if INTERPRET else [torch.bfloat16, torch.float32]:
                yield pytest.param(*combo, *path, keys_dtype,
                                   id="-".join((*combo, *map(str, path), str(keys_dtype)[6:])))


@needs_kernel
@pytest.mark.parametrize(("head", "query", "chunk", "dtype", "shared", "integer", "keys_dtype"),
                         list(bounds_kernel_cases()))
def test_bounds_kernel_computes_the_brackets(head, query, chunk, dtype, shared, integer,
                                             keys_dtype):
    """The Triton bounded pass: its Ŝ against an independent computation (the torch path's
    for the 8-bit keys widened to the queries' dtype; q̂ . k̂ in float64 for int8 queries),
    and its widened brackets hold every chunk score the full-precision kernels compute."""
    msa = msa_params(head, query, chunk)
    gen = torch.Generator().manual_seed(11)
    full = on_device(make_index(torch.randint(1, 6, (50,), generator=gen).tolist(), 2, 32,
                                gen, dtype=keys_dtype))
    index = compressed(full, dtype, shared)
    assert index.keys.shared_scale == shared
    qr = queries(13, 8, 32, gen)
    cu = [0, 6, 7, 13]
    kernel = bound_queries(qr, cu, 2, msa, keys_dtype, integer=integer)
    assert (kernel.integer is not None) == integer
    lo, hi = chunk_bounds(kernel, index.keys, query)
    if integer:
        want = integer_scores(kernel, index.keys, query)
        assert torch.allclose(((lo.double() + hi.double()) / 2), want, rtol=1e-5, atol=1e-6)
        # The queries' two int8 levels are within their bound, and far inside the keys'.
        assert float(kernel.integer.error.max()) < 1e-3 * float(kernel.q.norm(dim=-1).max())
    else:
        torch_path = dataclasses.replace(kernel, kernel_q=None)
        for got, want in zip((lo, hi), chunk_bounds(torch_path, index.keys, query),
                             strict=True):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    lo, hi = widened(kernel, index, lo, hi)
    exact = chunk_scores_batched(qr, cu, full, msa)
    assert bool((lo <= exact).all()) and bool((exact <= hi).all())
    # The same intervals from one pass of the kernel (what serving runs).
    fused = fused_intervals(kernel, index, query)
    assert torch.allclose(fused[0], lo, rtol=1e-5, atol=1e-5)
    assert torch.allclose(fused[1], hi, rtol=1e-5, atol=1e-5)
    assert bool((fused[0] <= exact).all()) and bool((exact <= fused[1]).all())
    # Selections through each path are the full index's.
    ks = [1, 5, 50]
    assert_same(route_compressed(qr, cu, index, msa, ks, integer=integer),
                route_batched(qr, cu, full, msa, ks))


@needs_kernel
@pytest.mark.parametrize(("head", "query", "chunk"), COMBOS[::6] if INTERPRET else COMBOS[::3])
def test_query_bound_kernels_match_their_definition(head, query, chunk):
    """`kernels/routing_bounds.py` against `bound_queries` in torch: the int8 levels' error
    and size bounds hold (in float64) for the levels the kernel made, and n, Q_r and μ of
    each request are the torch path's."""
    from vllm_msa.kernels.routing_bounds import bound_rows, request_bounds

    from vllm_msa.attention.bounded_routing import gamma, query_error, query_norms

    msa = msa_params(head, query, chunk)
    gen = torch.Generator().manual_seed(23)
    full = on_device(make_index([3, 1, 4, 1, 5], 2, 32, gen, dtype=torch.bfloat16))
    index = compressed(full)
    qr = queries(13, 8, 32, gen) * torch.rand(13, 8, 1, generator=gen).to(DEVICE) * 5
    cu = [0, 6, 7, 13]
    bq = bound_queries(qr, cu, 2, msa, torch.bfloat16, integer=True)
    norms, ints = bound_rows(bq.kernel_q, True)
    q = bq.kernel_q.double()
    step = ints.scale.double()[:, None, None]
    hi, lo = ints.hi.double() * step, ints.lo.double() * (step / 128)
    assert bool((ints.lo.abs() <= 64).all())
    assert bool(((q - hi - lo).norm(dim=-1) <= ints.error.double()).all())
    assert bool((hi.norm(dim=-1) + lo.norm(dim=-1) <= ints.size.double()).all())
    assert torch.allclose(norms, q.norm(dim=-1).float(), rtol=1e-6)
    two_gamma = 2 * gamma(bq, index)
    n, extra = request_bounds(norms, ints, bq.cu, 2, bq.head_max, query == "mean", two_gamma)
    assert torch.allclose(n, query_norms(bq, 2, query), rtol=1e-5)
    # μ from the kernel's own (looser) error bounds, Q_r from its sizes: at least torch's.
    want = query_error(bq, 2, query) + two_gamma * bq.magnitude
    assert bool((extra >= want * (1 - 1e-6)).all()) and torch.allclose(extra, want, rtol=0.1)


@pytest.mark.parametrize("spread", [0.0, 1e-4] if INTERPRET else [0.0, 1e-6, 1e-4, 1e-2])
@pytest.mark.parametrize(("head", "query", "chunk"),
                         [COMBOS[0], COMBOS[7], *([] if INTERPRET else [COMBOS[10]])])
def test_near_ties_below_the_8bit_step(spread, head, query, chunk):
    msa = msa_params(head, query, chunk)
    gen = torch.Generator().manual_seed(int(spread * 1e6) + 17)
    full = on_device(near_tie_bank(2, 16, gen, spread))
    qr = queries(5, 4, 16, gen)
    qr[:] = qr[0]  # every token the same query: the copies' scores stay within the cluster
    # Aim the query at the cluster: it holds the top-k, and the k-th falls inside it.
    cluster = full.routing_keys[full.chunk_doc_index == 0]
    index = compressed(full)
    for k in (1, 4, 10, 29, 31):
        for q in (qr, qr + 3 * cluster[0].repeat_interleave(2, 0)[None]):
            assert_same(route_compressed(q, [0, 5], index, msa, [k]),
                        route_batched(q, [0, 5], full, msa, [k]))
    assert index.stats.candidates > index.stats.calls  # the near-ties were re-scored


def test_order_flipped_by_quantisation_is_restored():
    """Pairs of documents whose 8-bit scores rank them the other way round from their exact
    scores, placed at the k-th: only the re-score can order them."""
    msa = msa_params("mean", "max", "max")
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 16, generator=gen)
    keys, flipped = [], 0
    while flipped < 6:
        a, b = torch.randn(2, 1, 2, 16, generator=gen)
        b = a + 0.05 * b
        exact = [float((q[0] * k[0]).sum()) for k in (a, b)]
        approx = [float((q[0] * compress(k).dequantized()[0]).sum()) for k in (a, b)]
        if (exact[0] - exact[1]) * (approx[0] - approx[1]) < 0:
            keys += [a, b]
            flipped += 1
    full = RoutingIndex(torch.cat(keys), torch.arange(12), torch.arange(12))
    index = compressed(full)
    for k in range(1, 12):
        assert_same(route_compressed(q, [0, 1], index, msa, [k]),
                    route_batched(q, [0, 1], full, msa, [k]))


def test_a_bound_too_small_is_caught():
    """The same near-tie bank with the residual bound shrunk: the selection goes wrong, so
    the tests above can fail."""
    msa = msa_params("mean", "max", "max")
    gen = torch.Generator().manual_seed(3)
    full = near_tie_bank(2, 16, gen, 1e-2)
    qr = queries(3, 4, 16, gen).cpu()
    index = compressed(full)
    wrong = dataclasses.replace(index, keys=dataclasses.replace(
        index.keys, residual=index.keys.residual * 0, magnitude=index.keys.magnitude * 0))
    differs = 0
    for k in range(1, 30):
        want = route_batched(qr, [0, 3], full, msa, [k])[0].doc_ids.tolist()
        assert route_compressed(qr, [0, 3], index, msa, [k])[0].doc_ids.tolist() == want
        differs += route_compressed(qr, [0, 3], wrong, msa, [k])[0].doc_ids.tolist() != want
    assert differs


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("dtype", ["int8", "fp8_e4m3"])
def test_shards_select_like_the_whole_index(ranks, dtype):
    msa = msa_params("mean", "max", "max")
    gen = torch.Generator().manual_seed(ranks)
    whole = make_index([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 2, 2], 2, 16, gen,
                       duplicates=((1, 11), (2, 12)))
    qr, cu, ks = queries(6, 4, 16, gen), [0, 2, 6], [3, 9]
    want = route_batched(qr, cu, on_device(whole), msa, ks)
    shards = [compressed(s, dtype) for s in shard_indexes(whole, ranks, DEVICE)]
    for got in route_sharded(route_compressed, qr, cu, shards, msa, ks):
        assert_same(got, want)


@settings(max_examples=40 if not INTERPRET else 3, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), combo=st.sampled_from(COMBOS),
       grid=st.sampled_from([0.0, 0.25, 1.0]), k=st.integers(1, 12))
def test_fuzzed_banks_with_coarse_values(seed, combo, grid, k):
    """Keys on a coarse grid (many exact ties, 8-bit exact) plus a tiny perturbation."""
    msa = msa_params(*combo)
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 4, (14,), generator=gen).tolist()
    keys = torch.randint(-2, 3, (sum(counts), 2, 16), generator=gen).float()
    keys += grid * 1e-3 * torch.randn(keys.shape, generator=gen)
    full = on_device(RoutingIndex(keys, torch.arange(14).repeat_interleave(torch.tensor(counts)),
                                  torch.randperm(100, generator=gen)[:14]))
    qr = torch.randint(-1, 2, (3, 4, 16), generator=gen).float().to(DEVICE)
    assert_same(route_compressed(qr, [0, 3], compressed(full), msa, [k]),
                route_batched(qr, [0, 3], full, msa, [k]))


@parent_only
def test_kernels_under_triton_interpreter():
    rerun_under_interpreter(__file__)
