"""Routing's selection stage (kernels/routing.py): the fused merge, where the last block of
each request to finish picks the request's best document keys from every block's candidates,
against `torch.topk` over the same candidates (bit for bit), with ties, several requests,
fewer documents than k, and calls in a row (the block counters must come back to zero).

Runs on the GPU, or on CPU under Triton's interpreter: without a GPU,
`test_kernel_under_triton_interpreter` reruns this file in a child process with
TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch
from test_routing_kernel import (
    cu_of,
    make_index,
    msa_params,
    planted,
    run_and_check,
    seed,
    with_keys,
)
from triton_interpreter import (
    DEVICE,
    needs_kernel,
    parent_only,
    rerun_under_interpreter,
)


class LaunchSpy:
    """Counts launches of a Triton kernel (`kernel[grid](...)`) and the grids used."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def chunk_scores_with_ties(num_requests: int, num_chunks: int, gen) -> torch.Tensor:
    """[R, C] fp32 scores drawn from few values (many documents tie), with +-0.0 and
    negatives (the key's sign handling)."""
    values = torch.tensor([-2.5, -0.0, 0.0, 0.25, 1.0, 3.0, 7.5])
    return values[torch.randint(0, len(values), (num_requests, num_chunks), generator=gen)]


@needs_kernel
@pytest.mark.parametrize(("chunk", "num_docs", "block_n", "top"),
                         [("max", 300, 64, 16), ("mean", 300, 64, 16), ("max", 37, 16, 1),
                          ("mean", 5, 16, 8), ("max", 600, 256, 64)])
def test_merge_equals_topk_over_candidates(chunk, num_docs, block_n, top):
    from vllm_msa.kernels import routing as rk

    gen = seed("merge", chunk, num_docs, block_n, top)
    index = with_keys(make_index(num_docs, 2, 16, gen, max_chunks=4), torch.float32, DEVICE)
    prep = rk.prepare_index(index)
    msa = msa_params(chunk=chunk)
    assert rk.merge_width(num_docs, top, block_n)
    for num_requests in (1, 3, 1, 5):  # in a row: each call finds its counters at zero
        scores = chunk_scores_with_ties(num_requests, index.routing_keys.shape[0], gen)
        scores = scores.to(DEVICE)
        candidates = rk.document_keys_batched(scores, prep, msa, top, block_n)
        merged = rk.document_keys_batched(scores, prep, msa, top, block_n, merge=True)
        k = min(top, num_docs)
        expected = torch.topk(candidates, k, dim=1, largest=True, sorted=True).values
        # Each block's candidates: its own top keys, largest first, fill values last.
        blocks = candidates.view(num_requests, -1, top)
        assert torch.equal(blocks, blocks.sort(dim=2, descending=True).values)
        assert merged.shape == (num_requests, top)
        assert torch.equal(merged[:, :k], expected)
        assert (rk._COUNTERS[scores.device] == 0).all()
        # And the keys are the documents' own: the same as every document's key, ranked.
        every = rk.document_keys_batched(scores, prep, msa)
        assert torch.equal(merged[:, :k], torch.topk(every, k, dim=1).values)


@needs_kernel
@pytest.mark.parametrize("chunk", ["max", "mean"])
def test_document_scores_of_long_documents(chunk):
    """Documents of 1-20 chunks (several chunk tiles per document, for tiles of 4, 8 and 16
    chunks) against the plain-torch document reduce: max exactly, mean within its fp32 sum's
    rounding (one 2^-24 step of the magnitudes per chunk and one for the division, in each of
    the two paths)."""
    from vllm_msa.kernels import routing as rk

    from vllm_msa.attention.routing import document_scores

    gen = seed("long documents", chunk)
    index = with_keys(make_index(300, 2, 16, gen, max_chunks=20), torch.float32, DEVICE)
    prep = rk.prepare_index(index)
    msa = msa_params(chunk=chunk)
    scores = torch.randn(2, index.routing_keys.shape[0], generator=gen).to(DEVICE)
    ids, got = rk.decode_keys(rk.document_keys_batched(scores, prep, msa), prep)
    tiles = {tile: rk.decode_keys(rk.document_keys_batched(scores, prep, msa,
                                                           chunk_tile=tile), prep)
             for tile in (4, 16)}  # other chunk tiles (the benchmark's sweep)
    for r in range(2):
        want = document_scores(scores[r], index, msa)
        by_id = dict(zip(index.doc_ids.tolist(), want.tolist(), strict=True))
        want = torch.tensor([by_id[i] for i in ids[r].tolist()], dtype=torch.float64)
        magnitude = document_scores(scores[r].abs(), index, msa).max().item()
        bound = 0.0 if chunk == "max" else 2 * (20 + 1) * 2.0**-24 * magnitude
        for tile_ids, tile_scores in [(ids, got), *tiles.values()]:
            assert torch.equal(tile_ids[r], ids[r])  # keys in bank order: the same documents
            assert ((tile_scores[r].cpu().double() - want).abs() <= bound).all()


@needs_kernel
@pytest.mark.parametrize(("head", "query", "chunk", "ks"),
                         [("mean", "max", "max", [5, 16, 9]), ("max", "last", "mean", [5, 3, 9])])
def test_route_batched_merges_and_matches_the_topk_path(head, query, chunk, ks, monkeypatch):
    """The whole call, merged (one launch fewer) and not (MAX_MERGE = 0: candidates +
    topk), gives the same keys; past MAX_MERGE the topk path runs. With the largest k below
    its power of two (9 of 16) the merged keys are a strided view; staging reads them by
    stride, and the selections decode the same."""
    from vllm_msa.kernels import routing as rk

    gen = seed("route merge", head, query, chunk)
    msa = msa_params(head, query, chunk)
    index = with_keys(make_index(200, 2, 32, gen, max_chunks=5), torch.bfloat16, DEVICE)
    prep = rk.prepare_index(index)
    config = rk.KernelConfig(block_c=16, block_t=32, num_warps=4, num_stages=2, block_n=32)
    counts = [7, 1, 12]
    q = torch.randn(sum(counts), 8, 32, generator=gen).to(device=DEVICE, dtype=torch.bfloat16)
    calls = []
    real = rk.document_keys_batched
    monkeypatch.setattr(rk, "document_keys_batched",
                        lambda *a, **kw: calls.append(kw.get("merge", False)) or real(*a, **kw))
    merged = rk.route_batched_keys(q, cu_of(counts), prep, msa, ks, config)
    monkeypatch.setattr(rk, "MAX_MERGE", 0)
    plain = rk.route_batched_keys(q, cu_of(counts), prep, msa, ks, config)
    assert calls == [True, False]
    assert torch.equal(merged.keys, plain.keys) and merged.ks == plain.ks == ks
    assert merged.keys.shape == (3, max(ks))
    for r in range(3):
        got, want = merged.selection(r), plain.selection(r)
        assert torch.equal(got.doc_ids, want.doc_ids) and torch.equal(got.scores, want.scores)


@needs_kernel
@pytest.mark.parametrize(("head", "query", "chunk", "aux", "dtype"),
                         [("mean", "max", "max", "INFONCE_DECOUPLE", torch.bfloat16),
                          ("max", "last", "mean", "INFONCE", torch.float32)])
def test_whole_call_matches_the_reference(head, query, chunk, aux, dtype):
    """Query preparation, scoring, the document stage and its merge together against the
    plain-torch reference with `test_routing_kernel`'s derived bounds (there on the GPU for
    every combination; here also under the interpreter, so CPU CI runs the chain)."""
    gen = seed("whole call", head, query, chunk, aux)
    msa = msa_params(head, query, chunk, aux)
    counts, ks = [9, 1, 20], [4, 16, 7]
    index, (q,) = planted(40, 2, 8, 32, gen, 5, [sum(counts)])
    robust = run_and_check(q, cu_of(counts), index, msa, ks, dtype, 5)
    assert dtype == torch.float32 or robust >= 1  # bf16: a selection beyond the bound


@needs_kernel
def test_merge_beyond_its_width_is_refused():
    from vllm_msa.kernels import routing as rk

    index = with_keys(make_index(100, 2, 16, seed("wide"), max_chunks=2), torch.float32, DEVICE)
    prep = rk.prepare_index(index)
    scores = torch.zeros(1, index.routing_keys.shape[0], device=DEVICE)
    assert rk.merge_width(100, 64, 1) == 0  # 100 blocks x 64 candidates > MAX_MERGE
    with pytest.raises(ValueError, match="merge"):
        rk.document_keys_batched(scores, prep, msa_params(), 64, 1, merge=True)


def test_document_block_keeps_the_merge():
    from vllm_msa.kernels import routing as rk

    if not rk.HAS_TRITON:
        pytest.skip("needs triton")
    assert rk.document_block(19_526, 16) == 256  # 10M MSA-4B tokens: 77 blocks
    assert rk.document_block(195_302, 16) == 1024  # 100M: 191 blocks x 16 fit, not 382 x 16
    assert rk.document_block(195_302, 64) == 1024  # none merges: the largest block
    assert rk.merge_width(195_302, 64, 1024) == 0


@needs_kernel
def test_launches(monkeypatch):
    """The merged call launches the document kernel once per call and no topk."""
    from vllm_msa.kernels import routing as rk

    spy = LaunchSpy(rk._document_keys_kernel)
    monkeypatch.setattr(rk, "_document_keys_kernel", spy)
    topk_calls = []
    real_topk = torch.topk
    monkeypatch.setattr(torch, "topk", lambda *a, **kw: topk_calls.append(1) or real_topk(*a, **kw))
    gen = seed("launches")
    index = with_keys(make_index(100, 2, 32, gen), torch.float32, DEVICE)
    q = torch.randn(4, 4, 32, generator=gen).to(DEVICE)
    rk.route_batched_keys(q, [0, 4], rk.prepare_index(index), msa_params(), 8,
                          rk.KernelConfig(block_c=16, block_t=16, num_warps=4, num_stages=2,
                                          block_n=16))
    assert spy.grids == [(7, 1)] and topk_calls == []


@parent_only
def test_kernel_under_triton_interpreter():
    rerun_under_interpreter(__file__)
