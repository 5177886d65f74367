"""The persistent routing-score kernel (`KernelConfig(persistent=...)`, for steps whose routing
tokens fit one block: the memory-bound case) against the tiled kernel and the plain-torch
reference: the same chunk scores bit for bit, the same selections. Programs stride over more
tiles than there are programs, unevenly, with a partial last tile.

Runs on the GPU, or on CPU under Triton's interpreter: without a GPU,
`test_kernel_under_triton_interpreter` reruns this file in a child process with
TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch
from test_routing_kernel import cu_of, make_index, msa_params, seed, with_keys
from triton_interpreter import (
    DEVICE,
    needs_kernel,
    parent_only,
    rerun_under_interpreter,
)

TILES = dict(block_c=16, block_t=32, num_warps=4, num_stages=2)


class LaunchSpy:
    """Counts launches of a Triton kernel (`kernel[grid](...)`) and the grids used."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@needs_kernel
@pytest.mark.parametrize(("head", "query", "chunk", "dtype"),  # each reduce once, each dtype twice
                         [("mean", "max", "max", torch.bfloat16),
                          ("max", "mean", "mean", torch.float32),
                          ("mean", "last", "max", torch.float32),
                          ("max", "max", "mean", torch.bfloat16)])
def test_persistent_matches_tiled_and_reference(head, query, chunk, dtype, monkeypatch):
    from vllm_msa.kernels import routing as rk

    spy = LaunchSpy(rk._chunk_scores_persistent_kernel)
    monkeypatch.setattr(rk, "_chunk_scores_persistent_kernel", spy)
    monkeypatch.setattr(rk, "_num_sms", lambda device: 3)  # 3 programs, on any device
    gen = seed("persistent", head, query, chunk, str(dtype))
    msa = msa_params(head, query, chunk)
    # ~300 chunks in tiles of 16 over 3 programs: each takes several tiles, unevenly, and
    # the last tile is partial.
    index_cpu = make_index(100, 2, 32, gen, max_chunks=5)
    block = TILES["block_c"]
    while (index_cpu.routing_keys.shape[0] % block == 0
           or -(-index_cpu.routing_keys.shape[0] // block) % 3 == 0):
        index_cpu = make_index(100, 2, 32, gen, max_chunks=5)
    index = with_keys(index_cpu, dtype, DEVICE)
    prep = rk.prepare_index(index)
    for counts, ks in (([13], [16]), ([5, 1, 9], [3, 16, 7]), ([3, 4, 2, 6], [1, 2, 8, 16])):
        q = torch.randn(sum(counts), 8, 32, generator=gen).to(DEVICE, dtype)
        cu = cu_of(counts)
        launches = len(spy.grids)
        tiled = rk.chunk_scores_batched(q, cu, prep, msa, rk.KernelConfig(**TILES))
        assert len(spy.grids) == launches  # the tiled kernel, as configured
        persistent = rk.chunk_scores_batched(q, cu, prep, msa,
                                             rk.KernelConfig(**TILES, persistent=1))
        assert len(spy.grids) == launches + 1
        assert spy.grids[-1] == (3,)
        assert torch.equal(tiled, persistent)
        got = rk.route_batched(q, cu, prep, msa, ks, config=rk.KernelConfig(**TILES,
                                                                             persistent=1))
        ref = rk.route_batched_reference(q.cpu(), cu, with_keys(index_cpu, dtype, "cpu"), msa,
                                         ks)
        for g, r in zip(got, ref, strict=True):
            if dtype == torch.float32:  # IEEE products and sums: the reference's selection
                assert g.doc_ids.tolist() == r.doc_ids.tolist()
            else:  # bf16 rounding may swap near-ties; test_routing_kernel bounds that
                assert len(set(g.doc_ids.tolist()) & set(r.doc_ids.tolist())) >= len(r.doc_ids) - 2


@needs_kernel
def test_persistent_falls_back_where_it_does_not_apply(monkeypatch):
    """More routing tokens than one block, or more requests than the variant unrolls: the
    tiled kernel runs, with the same result as without the option."""
    from vllm_msa.kernels import routing as rk

    spy = LaunchSpy(rk._chunk_scores_persistent_kernel)
    monkeypatch.setattr(rk, "_chunk_scores_persistent_kernel", spy)
    gen = seed("persistent-fallback")
    msa = msa_params()
    prep = rk.prepare_index(with_keys(make_index(100, 2, 32, gen), torch.float32, DEVICE))
    for counts in ([40], [2] * (rk.MAX_PERSISTENT_REQUESTS + 1)):
        q = torch.randn(sum(counts), 8, 32, generator=gen).to(DEVICE)
        with_option = rk.chunk_scores_batched(q, cu_of(counts), prep, msa,
                                              rk.KernelConfig(**TILES, persistent=2))
        without = rk.chunk_scores_batched(q, cu_of(counts), prep, msa, rk.KernelConfig(**TILES))
        assert torch.equal(with_option, without)
    assert spy.grids == []


@parent_only
def test_kernel_under_triton_interpreter():
    rerun_under_interpreter(__file__)
