"""Removing documents from a bank while the real OpenAI server serves it (`serving/edits.py`).

One server over a copy of the sample bank, its admin key in VLLM_MSA_ADMIN_KEY. A removal
answers only once the bank's next generation is on disk and every worker routes over it:
the next request never selects the document, and its first router layer's ranking is
exactly the previous one without it (scores bit for bit: a document's score depends only on
its own chunks).
Edits without the key, with a wrong one, on unknown banks or documents, or with a malformed
id are refused with the reason, and the server keeps serving.
"""

from __future__ import annotations

import shutil

import httpx
import pytest
from conftest import running_server
from test_serving import expected_prompt

from vllm_msa.bank import MemoryBank
from vllm_msa.serving.edits import ADMIN_HEADER, BankEditor

pytestmark = pytest.mark.slow

ADMIN = "test-admin-key-0123456789"
QUESTION = "Which river flooded the old mill?"


@pytest.fixture(scope="module")
def live(checkpoints, default_banks, tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    bank = root / "docs"
    shutil.copytree(default_banks["docs"].path, bank)
    ckpt = checkpoints()
    with running_server(ckpt, {"banks": {"docs": str(bank)}}, root / "server.log",
                        env={"VLLM_MSA_ADMIN_KEY": ADMIN}) as server:
        from transformers import AutoTokenizer

        yield {**server, "bank": bank, "ckpt": ckpt,
               "tokenizer": AutoTokenizer.from_pretrained(str(ckpt))}


def ask(live, top_k: int) -> dict[str, dict]:
    """The question's selections, per router layer ({"doc_ids", "scores"}, best first)."""
    ids, _ = expected_prompt(live["tokenizer"], QUESTION)
    response = httpx.post(live["base"] + "/v1/completions", timeout=120, json={
        "model": str(live["ckpt"]), "prompt": ids, "max_tokens": 2, "temperature": 0,
        "vllm_xargs": {"msa_bank": "docs", "msa_top_k": top_k, "msa_return_selection": True}})
    assert response.status_code == 200, response.text
    return response.json()["kv_transfer_params"]["msa_selection"]["layers"]


def delete(live, doc, key: str | None = ADMIN, bank: str = "docs") -> httpx.Response:
    headers = {} if key is None else {ADMIN_HEADER: key}
    return httpx.delete(f"{live['base']}/v1/msa/banks/{bank}/documents/{doc}",
                        headers=headers, timeout=120)


def test_bad_edits_are_refused_and_the_server_keeps_serving(live):
    for response, status in ((delete(live, 3, key=None), 401), (delete(live, 3, "wrong"), 401),
                             (delete(live, 3, bank="nope"), 404), (delete(live, "x"), 400),
                             (delete(live, "-1"), 400), (delete(live, 999), 404)):
        assert response.status_code == status, response.text
        assert response.json()["error"]["message"]
    assert MemoryBank.open(live["bank"]).generation == 0  # nothing was written
    assert httpx.get(live["base"] + "/health", timeout=30).status_code == 200


def test_removed_document_is_never_selected_again(live):
    before = ask(live, 24)
    first = next(iter(before.values()))["doc_ids"]
    gone = first[0]  # the best document of the first router layer
    response = delete(live, gone)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["removed"] == [gone] and body["documents"] == 23 and body["workers"] >= 1
    # Durable: the bank on disk is the new generation, without the document.
    bank = MemoryBank.open(live["bank"])
    assert bank.generation == body["generation"] == 1 and gone not in bank.doc_ids
    # The first router layer's ranking is the previous one without it, scores bit for bit
    # (later layers' queries see the memory the earlier layers selected, which changed);
    # no layer selects it, every layer selects every other document.
    after = ask(live, 24)
    layer = min(before, key=int)
    keep = [(d, s) for d, s in zip(before[layer]["doc_ids"], before[layer]["scores"],
                                   strict=True) if d != gone]
    assert list(zip(after[layer]["doc_ids"], after[layer]["scores"], strict=True)) == keep
    for report in after.values():
        assert sorted(report["doc_ids"]) == sorted(bank.doc_ids)
    top = ask(live, 4)
    assert top[layer]["doc_ids"] == after[layer]["doc_ids"][:4]
    assert not any(gone in report["doc_ids"] for report in top.values())
    # Removed already: refused, nothing written.
    assert delete(live, gone).status_code == 404
    info = httpx.get(f"{live['base']}/v1/msa/banks/docs", timeout=30).json()
    assert info["generation"] == 1 and info["served_generations"] == [1]
    assert info["documents"] == 23 and info["removed"]["documents"] == 1
    listed = httpx.get(f"{live['base']}/v1/msa/banks", timeout=30).json()["banks"]
    assert [b["bank"] for b in listed] == ["docs"]


def test_edits_without_a_configured_key_are_disabled():
    from starlette.requests import Request

    request = Request({"type": "http", "headers": [(ADMIN_HEADER.lower().encode(), b"x")]})
    refused = BankEditor(None, {}, None).refusal(request)
    assert refused.status_code == 403 and b"VLLM_MSA_ADMIN_KEY" in refused.body
    editor = BankEditor(None, {}, ADMIN)
    assert editor.refusal(request).status_code == 401
    ok = Request({"type": "http", "headers": [(ADMIN_HEADER.lower().encode(), ADMIN.encode())]})
    assert editor.refusal(ok) is None


def test_questions_during_a_removal_see_one_generation(live):
    """Questions sent while a removal runs: each routes over the old generation or the new
    one in every router layer, never a mix, and its first layer ranks as that generation's
    reference (the ranking before, with or without the document)."""
    from concurrent.futures import ThreadPoolExecutor

    bank = MemoryBank.open(live["bank"])
    everything = len(bank.doc_ids)
    before = ask(live, everything)
    layer = min(before, key=int)
    ranking = list(zip(before[layer]["doc_ids"], before[layer]["scores"], strict=True))
    gone = ranking[-1][0]  # (another one than the first test's)
    with ThreadPoolExecutor(9) as pool:
        asks = [pool.submit(ask, live, everything) for _ in range(8)]
        removal = pool.submit(delete, live, gone)
        answers = [a.result() for a in asks]
    assert removal.result().status_code == 200, removal.result().text
    seen = set()
    for answer in answers:
        old = [gone in report["doc_ids"] for report in answer.values()]
        assert all(old) or not any(old), "a request saw two generations"
        want = ranking if old[0] else [(d, s) for d, s in ranking if d != gone]
        assert list(zip(answer[layer]["doc_ids"], answer[layer]["scores"], strict=True)) == want
        seen.add(old[0])
    after = ask(live, everything)
    assert all(gone not in report["doc_ids"] for report in after.values())
