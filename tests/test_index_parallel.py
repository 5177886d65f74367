"""Memory Parallel's routing (vllm_msa/attention/index_parallel.py) without an engine: a bank's
index dealt into shards, each shard routed alone, the candidates exchanged and merged, must
select exactly what the whole index selects: the same ids in the same order with bit-equal
scores, ties between documents on different shards included. The engine tests (TP=2/4 ranks)
are in test_memory_parallel.py.

The torch path runs everywhere; the kernel path on the GPU, or on CPU under Triton's
interpreter (`test_kernel_under_triton_interpreter`).
"""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_interpreter import DEVICE, INTERPRET, needs_kernel, parent_only, rerun_under_interpreter
from vllm_msa.kernels.routing import route_batched, route_batched_keys

from vllm_msa.attention.index_parallel import IndexShard, shard_bounds
from vllm_msa.attention.routing import RoutingIndex
from vllm_msa.config import MSAParams

LAYOUTS = [(2, 4), (1, 4), (4, 4)]  # (KV heads, query heads): GQA, MQA, MHA
COMBOS = list(itertools.product(("mean", "max"), ("max", "mean", "last"), ("max", "mean")))


def seed(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def offsets_of(counts) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


# ---------------------------------------------------------------- dealing documents
@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=0, max_size=40), st.integers(1, 8))
def test_shards_hold_whole_documents_balanced_by_chunks(counts, ranks):
    offsets = offsets_of(counts)
    bounds = shard_bounds(offsets, ranks)
    assert bounds[0] == 0 and bounds[-1] == len(counts) and len(bounds) == ranks + 1
    assert (np.diff(bounds) >= 0).all()  # every document in exactly one shard, in bank order
    total, largest = offsets[-1], max(counts, default=0)
    for r in range(ranks):
        shard = IndexShard.of(offsets, r, ranks)
        assert shard.num_documents == bounds[r + 1] - bounds[r]
        # A boundary is the document start nearest to its target: off by at most half the
        # largest document at either end.
        assert shard.num_chunks <= total / ranks + largest


def test_one_huge_document_and_fewer_documents_than_ranks():
    offsets = offsets_of([1, 1, 100, 1, 1])
    assert [IndexShard.of(offsets, r, 2).num_chunks for r in range(2)] == [2, 102]
    assert shard_bounds(offsets_of([5, 5]), 4).tolist() == [0, 0, 1, 1, 2]  # empty shards
    assert shard_bounds(offsets_of([3, 3, 3, 3]), 2).tolist() == [0, 2, 4]


# ---------------------------------------------------------------- routing over shards
def make_index(counts, kv, d, gen, duplicates=(), dtype=torch.float32) -> RoutingIndex:
    """Random keys; `duplicates` (a, b): document b gets document a's keys (same chunk count),
    a tie that only the id can break."""
    counts = list(counts)
    for a, b in duplicates:
        counts[b] = counts[a]
    offsets = offsets_of(counts)
    keys = torch.randn(int(offsets[-1]), kv, d, generator=gen)
    for a, b in duplicates:
        keys[offsets[b]:offsets[b + 1]] = keys[offsets[a]:offsets[a + 1]]
    doc_ids = torch.randperm(1000, generator=gen)[:len(counts)]
    return RoutingIndex(keys.to(dtype),
                        torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)),
                        doc_ids)


def shard_indexes(index: RoutingIndex, ranks: int, device) -> list[RoutingIndex]:
    """Each rank's index, as `ServedBank.load` builds it (on `device`)."""
    offsets = torch.from_numpy(offsets_of(torch.bincount(
        index.chunk_doc_index, minlength=index.num_documents).numpy()))
    shards = []
    for r in range(ranks):
        shard = IndexShard.of(offsets.numpy(), r, ranks)
        shards.append(RoutingIndex.of_shard(
            index.routing_keys[shard.chunks].to(device), index.chunk_doc_index.to(device),
            index.doc_ids.to(device), offsets, shard))
    return shards


def route_sharded(route, qr, cu, shards, msa, ks):
    """Every shard routed as its rank would, with an all-gather simulated in one process:
    a first pass records each shard's candidates, a second hands every shard all of them."""
    candidates = []

    def record(keys):
        candidates.append(keys.clone())
        return keys

    for shard in shards:
        route(qr, cu, shard, msa, ks, exchange=record)
    gathered = torch.cat(candidates, dim=1)
    return [route(qr, cu, shard, msa, ks, exchange=lambda keys: gathered) for shard in shards]


def msa_params(head, query, chunk, aux="INFONCE_DECOUPLE") -> MSAParams:
    return MSAParams.from_dict({"head_reduce_method": head, "query_reduce_method": query,
                                "chunk_reduce_method": chunk, "aux_loss_method": aux,
                                "decouple_router": True}, num_layers=2)


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.doc_ids.tolist() == w.doc_ids.tolist()
        assert torch.equal(g.scores.cpu(), w.scores.cpu())  # bit for bit


def cases():
    """Uneven banks: odd counts, one document larger than all others, fewer than ranks."""
    yield "odd", [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], 3, ()
    yield "huge", [2, 1, 40, 1, 2, 3, 1], 2, ()
    yield "few", [2, 3], 4, ()
    # Ties straddling shards: documents 1 and 8 (and 2 and 9) are identical; 4 ranks put
    # them on different shards.
    yield "ties", [2, 2, 2, 2, 2, 2, 2, 2, 2, 2], 4, ((1, 8), (2, 9))


def routed_selections(keys_path: bool):
    if keys_path:
        def route(qr, cu, index, msa, ks, exchange=None):
            routed = route_batched_keys(qr, cu, index, msa, ks, exchange=exchange)
            assert routed is not None, "the kernel did not run"
            return [routed.selection(r) for r in range(len(routed.ks))]
        return route
    return route_batched


def routing_cases():
    """Every reduce combination x dot/cosine on both paths (under the slow interpreter only
    the kernels, and cosine, a query normalisation before them, on one combination)."""
    for path, combo, score in itertools.product(("torch", "kernel"), COMBOS, ("dot", "cosine")):
        if INTERPRET and (path == "torch" or (score == "cosine" and combo != COMBOS[0])):
            continue  # (CPU tensors take the kernels under the interpreter: no torch path)
        marks = [needs_kernel] if path == "kernel" else []
        yield pytest.param(path, *combo, score, marks=marks, id="-".join((path, *combo, score)))


@pytest.mark.parametrize(("path", "head", "query", "chunk", "score"), list(routing_cases()))
def test_sharded_routing_selects_what_the_whole_index_selects(path, head, query, chunk, score):
    device = DEVICE if path == "kernel" else "cpu"
    msa = msa_params(head, query, chunk, "INFONCE" if score == "cosine" else "INFONCE_DECOUPLE")
    route = routed_selections(path == "kernel")
    slow = INTERPRET and path == "kernel"  # the interpreter: one layout, two banks per combo
    turn = COMBOS.index((head, query, chunk))
    for i, (name, counts, ranks, duplicates) in enumerate(cases()):
        if slow and not duplicates and i != turn % 3:
            continue
        layouts = [LAYOUTS[turn % len(LAYOUTS)]] if slow else LAYOUTS
        for kv, heads in layouts:
            gen = seed(name, kv, heads, head, query, chunk, score)
            index = make_index(counts, kv, 16, gen, duplicates)
            if msa.normalize_routing:
                index = RoutingIndex(torch.nn.functional.normalize(index.routing_keys, dim=-1),
                                     index.chunk_doc_index, index.doc_ids)
            qr = torch.randn(9, heads, 16, generator=gen)
            cu, ks = [0, 4, 5, 9], [3, len(counts) + 2, 1]  # k beyond the bank, k = 1
            whole = route(qr.to(device), cu, RoutingIndex(
                index.routing_keys.to(device), index.chunk_doc_index.to(device),
                index.doc_ids.to(device)), msa, ks)
            for got in route_sharded(route, qr.to(device), cu,
                                     shard_indexes(index, ranks, device), msa, ks):
                assert_same(got, whole)
            if duplicates:  # the tie is real, and inside the selection: the smaller id first
                ids = whole[1].doc_ids.tolist()
                for a, b in duplicates:
                    first, second = sorted((int(index.doc_ids[a]), int(index.doc_ids[b])))
                    assert ids.index(first) < ids.index(second)


@parent_only
def test_kernel_under_triton_interpreter():
    rerun_under_interpreter(__file__)

