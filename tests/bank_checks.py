"""Comparing a built bank with the plain-torch reference (shared by the stage-1 tests)."""

from __future__ import annotations

import json
from pathlib import Path

from reference import ReferenceMSA, wrap_document


def read_docs(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def assert_bank_matches_reference(bank, ckpt, docs: list[dict], tokenizer, tol: float) -> int:
    """Every document's pooled routing keys, keys and values within `tol` (max abs error) of
    the reference, chunks in bank order with the right chunk -> document map. Returns how many
    documents end in a partial chunk."""
    ref = ReferenceMSA(ckpt)
    assert bank.doc_ids == [d["id"] for d in docs]
    offset = partial = 0
    for doc in docs:
        ids = tokenizer(wrap_document(doc["id"], doc["text"]), add_special_tokens=False)
        ids = ids["input_ids"]
        expected = ref.encode_document(ids)
        n = -(-len(ids) // ref.pooling)
        partial += len(ids) % ref.pooling != 0
        assert bank.chunk_doc_ids[offset : offset + n].tolist() == [doc["id"]] * n
        for layer in ref.router_layers:
            got = bank.layer(layer)
            for name in ("routing_keys", "keys", "values"):
                actual = getattr(got, name)[offset : offset + n].double()
                err = (actual - expected[layer][name]).abs().max().item()
                assert err <= tol, f"doc {doc['id']} layer {layer} {name}: max abs err {err}"
        offset += n
    assert offset == bank.num_chunks
    return partial
