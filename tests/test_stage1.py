"""Stage 1 through the real vLLM engine against the independent plain-torch reference."""

from __future__ import annotations

import json

import pytest
import torch
from bank_checks import assert_bank_matches_reference, read_docs
from conftest import ENGINE_DEFAULTS, SAMPLE_DOCS, shutdown_llm
from reference import TEMPLATE_HEAD_TEXT, ReferenceMSA, wrap_document

from vllm_msa.bank import BankError, MemoryBank
from vllm_msa.bank.build import build_bank, encoder_llm

pytestmark = pytest.mark.slow

TOL = 1e-4

VARIANTS = {
    # GQA (4 query heads, 2 KV heads), a subset of router layers, decoupled router, dot scores.
    "gqa-subset": {},
    # MQA, every layer a router layer, pooling 5 (partial last chunks), INFONCE normalisation.
    "mqa-all-infonce": {"layers": 3, "kv_heads": 1, "router_layers": "all", "pooling": 5,
                        "aux_loss_method": "INFONCE", "seed": 1},
    # No decoupled router: routing keys are the pooled K (L2-normalised under INFONCE).
    "no-decouple": {"router_layers": "1,3", "pooling": 3, "decouple_router": False,
                    "aux_loss_method": "INFONCE", "heads": 2, "kv_heads": 2, "seed": 2},
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def encoder(request, checkpoints):
    """One encoder engine per checkpoint variant, shared by that variant's tests."""
    ckpt = checkpoints(**VARIANTS[request.param])
    llm = encoder_llm(ckpt, **ENGINE_DEFAULTS)
    yield request.param, ckpt, llm
    shutdown_llm(llm)


@pytest.fixture(scope="module")
def built(encoder, tmp_path_factory):
    name, ckpt, llm = encoder
    out = tmp_path_factory.mktemp(name) / "bank"
    # A small segment size forces several segments, so concatenation is exercised.
    bank = build_bank(ckpt, SAMPLE_DOCS, out, llm=llm, segment_mb=0.02, progress=False)
    return {"ckpt": ckpt, "bank": bank, "out": out, "tokenizer": llm.get_tokenizer(),
            "ref": ReferenceMSA(ckpt)}


def _docs():
    return read_docs(SAMPLE_DOCS)


def test_pooled_kv_and_routing_keys_match_reference(built):
    bank = built["bank"]
    assert len(bank.manifest["segments"]) > 1
    partial = assert_bank_matches_reference(bank, built["ckpt"], _docs(), built["tokenizer"], TOL)
    assert partial > 0  # the last chunk of some documents is shorter than the pool size


def test_template_kv_matches_reference(built):
    bank, ref, tok = built["bank"], built["ref"], built["tokenizer"]
    ids = tok(TEMPLATE_HEAD_TEXT, add_special_tokens=False)["input_ids"]
    assert bank.template_ids == ids
    assert len(ids) == 3  # <|im_start|> user \n, as for Qwen3
    for layer, (k_ref, v_ref) in enumerate(ref.template_kv(ids)):
        k, v = bank.template_kv(layer)
        assert (k.double() - k_ref).abs().max().item() <= TOL
        assert (v.double() - v_ref).abs().max().item() <= TOL


def test_bank_api_and_counts(built):
    bank, tok = built["bank"], built["tokenizer"]
    docs = _docs()
    assert bank.doc_ids == [d["id"] for d in docs]
    assert bank.text(docs[5]["id"]) == docs[5]["text"]
    assert bank.router_layers == list(built["ref"].router_layers)
    assert bank.num_documents == len(docs)
    lengths = [len(tok(wrap_document(d["id"], d["text"]), add_special_tokens=False)["input_ids"])
               for d in docs]
    assert bank.num_tokens == sum(lengths)
    assert bank.doc_num_tokens.tolist() == lengths
    layer = bank.layer(bank.router_layers[-1])
    ref = built["ref"]
    shape = (bank.num_chunks, ref.kv_heads, ref.head_dim)
    assert layer.routing_keys.shape == layer.keys.shape == layer.values.shape == shape
    assert layer.keys.dtype == torch.float32
    assert bank.chunk_doc_ids.dtype == torch.int64
    with pytest.raises(KeyError, match="not a router layer"):
        bank.layer(ref.num_layers + 5)


def test_reopen_against_its_model_and_verify(built):
    bank = MemoryBank.open(built["out"], built["ckpt"], dtype="float32")
    assert bank.verify() == []


def test_rebuild_of_finished_bank_returns_it_without_an_engine(built):
    # No engine is started: the finished bank is recognised from its manifest.
    bank = build_bank(built["ckpt"], SAMPLE_DOCS, built["out"], progress=False)
    assert bank.manifest == built["bank"].manifest


def test_document_longer_than_the_engine_allows_is_refused(encoder, tmp_path):
    _, ckpt, llm = encoder
    docs = tmp_path / "docs.jsonl"
    long_text = "The quick brown fox jumps over the lazy dog. " * 200
    docs.write_text(json.dumps({"id": 0, "text": "short"}) + "\n"
                    + json.dumps({"id": 42, "text": long_text}) + "\n")
    with pytest.raises(BankError, match=r"document 42 has \d+ tokens, more than the engine's "
                                        r"max_model_len 1024"):
        build_bank(ckpt, docs, tmp_path / "bank", llm=llm, progress=False)
    with pytest.raises(BankError, match="unfinished bank build"):
        MemoryBank.open(tmp_path / "bank")
