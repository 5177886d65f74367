"""Routing (msa-spec §3) against a naive implementation written from the spec: full score
tensor, explicit per-document loops, Python sort on (-score, id)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vllm_msa.attention.routing import RoutingIndex, chunk_scores, route
from vllm_msa.config import MSAParams


def naive_route(qr, keys, chunk_docs, doc_ids, msa: MSAParams, k: int):
    t, h, d = qr.shape
    kv = keys.shape[1]
    q = qr.double()
    keys = keys.double()
    if msa.aux_loss_method == "INFONCE":
        q = q / q.norm(dim=-1, keepdim=True)
    cosine = msa.aux_loss_method == "INFONCE" and msa.decouple_router
    scale = 1.0 if cosine else 1 / math.sqrt(d)
    s = torch.empty(t, h, keys.shape[0], dtype=torch.float64)
    for head in range(h):
        s[:, head] = q[:, head] @ keys[:, head // (h // kv)].T * scale
    s = s.mean(1) if msa.head_reduce == "mean" else s.max(1).values
    s = {"max": lambda x: x.max(0).values, "mean": lambda x: x.mean(0),
         "last": lambda x: x[-1]}[msa.query_reduce](s)
    per_doc = {}
    for c, doc in enumerate(chunk_docs):
        per_doc.setdefault(doc, []).append(s[c].item())
    score = {doc: (max(v) if msa.chunk_reduce == "max" else sum(v) / len(v))
             for doc, v in per_doc.items()}
    ranked = sorted(doc_ids, key=lambda doc: (-score[doc], doc))[:k]
    return ranked, [score[doc] for doc in ranked]


def make_index(num_docs, kv, d, gen, max_chunks=5):
    doc_ids = torch.randperm(1000, generator=gen)[:num_docs].tolist()
    counts = torch.randint(1, max_chunks + 1, (num_docs,), generator=gen).tolist()
    chunk_docs = [doc for doc, n in zip(doc_ids, counts, strict=True) for _ in range(n)]
    keys = torch.randn(len(chunk_docs), kv, d, generator=gen)
    index = RoutingIndex(
        routing_keys=keys,
        chunk_doc_index=torch.repeat_interleave(torch.arange(num_docs), torch.tensor(counts)),
        doc_ids=torch.tensor(doc_ids),
    )
    return index, keys, chunk_docs, doc_ids


COMBOS = list(itertools.product(("mean", "max"), ("max", "mean", "last"), ("max", "mean")))


@pytest.mark.parametrize(("head", "query", "chunk"), COMBOS)
@pytest.mark.parametrize("aux", ["INFONCE_DECOUPLE", "INFONCE"])
@pytest.mark.parametrize(("heads", "kv"), [(4, 2), (4, 1), (2, 2)])
def test_route_matches_naive(head, query, chunk, aux, heads, kv):
    gen = torch.Generator().manual_seed(hash((head, query, chunk, aux, heads, kv)) % 2**31)
    msa = MSAParams.from_dict({"head_reduce_method": head, "query_reduce_method": query,
                               "chunk_reduce_method": chunk, "aux_loss_method": aux,
                               "decouple_router": True}, num_layers=2)
    index, keys, chunk_docs, doc_ids = make_index(40, kv, 16, gen)
    qr = torch.randn(7, heads, 16, generator=gen)
    for k in (1, 5, 40, 64):  # 64 > documents: all of them, no error
        got = route(qr, index, msa, k, tile_chunks=13)
        ids, scores = naive_route(qr, keys, chunk_docs, doc_ids, msa, k)
        assert got.doc_ids.tolist() == ids
        assert torch.allclose(got.scores.double(), torch.tensor(scores, dtype=torch.float64),
                              atol=1e-5)


@pytest.mark.parametrize(("query", "chunk"), [("max", "max"), ("mean", "mean"), ("last", "max")])
@pytest.mark.parametrize(("heads", "kv"), [(8, 2), (4, 1), (2, 2)])
def test_folded_router_query_routes_like_every_head(query, chunk, heads, kv):
    """`folds_router_query`'s premise, on the naive routing written from the spec: with dot
    scores and the head mean, projecting each KV head's group-mean weight gives every
    chunk's score (so the same documents), and the runtime folds exactly then."""
    from vllm_msa.attention.router import folds_router_query

    gen = torch.Generator().manual_seed(hash((query, chunk, heads, kv)) % 2**31)
    msa = MSAParams.from_dict({"head_reduce_method": "mean", "query_reduce_method": query,
                               "chunk_reduce_method": chunk,
                               "aux_loss_method": "INFONCE_DECOUPLE", "decouple_router": True},
                              num_layers=2)
    _, keys, chunk_docs, doc_ids = make_index(40, kv, 16, gen)
    hidden = torch.randn(7, 24, generator=gen, dtype=torch.float64)
    weight = torch.randn(heads * 16, 24, generator=gen, dtype=torch.float64)
    every = (hidden @ weight.T).view(7, heads, 16)
    folded_weight = weight.view(kv, heads // kv, 16, 24).mean(1).reshape(kv * 16, 24)
    folded = (hidden @ folded_weight.T).view(7, kv, 16)
    keys = keys.double()
    for k in (3, 40):
        want = naive_route(every, keys, chunk_docs, doc_ids, msa, k)
        got = naive_route(folded, keys, chunk_docs, doc_ids, msa, k)
        assert got[0] == want[0]
        assert torch.allclose(torch.tensor(got[1]), torch.tensor(want[1]), rtol=1e-12)
    assert folds_router_query(msa, heads, kv, tp_size=1)
    for other in ({"head_reduce_method": "max"}, {"aux_loss_method": "INFONCE"},
                  {"decouple_router": False}):
        raw = {"head_reduce_method": "mean", "aux_loss_method": "INFONCE_DECOUPLE",
               "decouple_router": True, **other}
        assert not folds_router_query(MSAParams.from_dict(raw, num_layers=2), heads, kv, 1)
    assert folds_router_query(msa, heads, kv, tp_size=kv) and (
        not folds_router_query(msa, heads, kv, tp_size=2 * kv))


def test_single_run_of_spans():
    from vllm_msa.attention.router import single_run

    assert single_run([(3, 9)]) == slice(3, 9)
    assert single_run([(3, 9), (9, 12), (12, 13)]) == slice(3, 13)
    assert single_run([(3, 9), (10, 12)]) is None
    assert single_run([(3, 9), (2, 3)]) is None
    assert single_run([]) is None


def test_ties_go_to_the_smaller_document_id():
    msa = MSAParams.from_dict({}, num_layers=1)
    key = torch.ones(1, 1, 8)
    # Documents 9, 3, 7, 5 in bank order; 9, 3 and 5 have identical keys (tied scores).
    keys = torch.cat([key, key, -key, key])
    index = RoutingIndex(keys, torch.arange(4), torch.tensor([9, 3, 7, 5]))
    got = route(torch.ones(2, 1, 8), index, msa, top_k=3)
    assert got.doc_ids.tolist() == [3, 5, 9]


def test_scale_is_what_the_spec_reports():
    q = torch.tensor([[[3.0, 4.0]]])
    index = RoutingIndex(torch.tensor([[[1.0, 0.0]]]), torch.tensor([0]), torch.tensor([0]))
    dot = MSAParams.from_dict({"aux_loss_method": "INFONCE_DECOUPLE", "decouple_router": True},
                              num_layers=1)
    cosine = MSAParams.from_dict({"aux_loss_method": "INFONCE", "decouple_router": True},
                                 num_layers=1)
    assert chunk_scores(q, index, dot).item() == pytest.approx(3.0 / math.sqrt(2))
    assert chunk_scores(q, index, cosine).item() == pytest.approx(0.6)


def test_empty_routing_span_is_refused():
    msa = MSAParams.from_dict({}, num_layers=1)
    index = RoutingIndex(torch.ones(1, 1, 4), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="at least one routing-span token"):
        route(torch.ones(0, 1, 4), index, msa, 1)


def test_index_from_a_bank(checkpoints, tmp_path):
    from test_bank_format import encoded_docs, template, write_bank

    from vllm_msa.bank import MemoryBank, ModelInfo

    info = ModelInfo.from_checkpoint(checkpoints(), "float32")
    write_bank(tmp_path / "bank", info, encoded_docs(info), template(info))
    bank = MemoryBank.open(tmp_path / "bank")
    layer = bank.router_layers[0]
    index = RoutingIndex.from_bank(bank, layer)
    assert torch.equal(index.doc_ids[index.chunk_doc_index], bank.chunk_doc_ids)
    assert torch.equal(index.routing_keys, bank.layer(layer).routing_keys)
    msa = MSAParams.from_hf_config(type("C", (), {"msa_config": {}, "num_hidden_layers": 4})())
    qr = torch.randn(3, 4, info.head_dim)
    got = route(qr, index, msa, top_k=2)
    chunk_docs = bank.chunk_doc_ids.tolist()
    ids, _ = naive_route(qr, index.routing_keys, chunk_docs, bank.doc_ids, msa, 2)
    assert got.doc_ids.tolist() == ids


@pytest.mark.parametrize("rank_of_two", [None, 0, 1])
def test_served_bank_keeps_one_copy(checkpoints, tmp_path, rank_of_two):
    """Serving a bank holds each layer's K̄/V̄ once (the reader keeps no copy of its own) and
    one chunk -> document map for all router layers; what it holds equals the bank, for all
    KV heads and for each tensor-parallel rank's share."""
    from test_bank_format import encoded_docs, template, write_bank

    from vllm_msa.attention.tiers import ServedBank, local_kv_heads
    from vllm_msa.bank import MemoryBank, ModelInfo

    info = ModelInfo.from_checkpoint(checkpoints(), "float32")
    write_bank(tmp_path / "bank", info, encoded_docs(info), template(info))
    bank = MemoryBank.open(tmp_path / "bank")
    heads = (slice(0, info.num_kv_heads) if rank_of_two is None
             else local_kv_heads(info.num_kv_heads, rank_of_two, 2))
    served = ServedBank.load("b", bank, torch.device("cpu"), heads)
    assert served.name == "b"
    assert bank._layers == {}  # nothing cached by the reader
    first, *rest = (served.index[layer] for layer in bank.router_layers)
    assert all(i.chunk_doc_index is first.chunk_doc_index for i in rest)
    fresh = MemoryBank.open(tmp_path / "bank")
    for layer in bank.router_layers:
        want = fresh.layer(layer)
        assert torch.equal(served.host_keys[layer], want.keys[:, heads])
        assert torch.equal(served.host_values[layer], want.values[:, heads])
        assert torch.equal(served.index[layer].routing_keys, want.routing_keys)
        assert torch.equal(first.doc_ids[served.index[layer].chunk_doc_index],
                           fresh.chunk_doc_ids)
