"""Editing a bank while the real OpenAI server serves it (`serving/edits.py`).

One server over a copy of the sample bank, its admin key in VLLM_MSA_ADMIN_KEY, a 96-token
step budget (long added documents are prefilled, and captured, in several steps). An edit
answers only once the bank's next generation is on disk and every worker routes over it.
A removal: the next request never selects the document, and its first router layer's
ranking is exactly the previous one without it (scores bit for bit: a document's score
depends only on its own chunks). An add (POST) or replace (PUT): the documents are encoded
by the serving engine itself; what it stores matches the independent float64 stage 1
(tests/reference.py), and the next answer — selections, scores, tokens, logprobs — is the
float64 reference's over the new generation's documents. Questions sent during an edit see
the old generation or the new one, never a mix. Edits without the key, with a wrong one, on
unknown banks or documents, with malformed ids or bodies, too long or already present, are
refused with the reason, write nothing, and the server keeps serving. A restarted server
(with two data-parallel replicas) serves the latest generation, and an edit there switches
both replicas.
"""

from __future__ import annotations

import os
import shutil

import httpx
import pytest
import torch
from conftest import running_server
from msa_reference import reference_answer
from reference import ReferenceMSA
from test_serving import LOGPROB_TOL, SCORE_TOL, bank_docs, expected_prompt

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
    # Room for 64 tokens of adds: the first add outgrows it (the tier is copied once, with
    # room again), later ones append in place.
    with running_server(ckpt, {"banks": {"docs": str(bank)}, "reserve_tokens": 64},
                        root / "server.log",
                        "--max-num-batched-tokens", "96",
                        env={"VLLM_MSA_ADMIN_KEY": ADMIN}) as server:
        from transformers import AutoTokenizer

        yield {**server, "bank": bank, "ckpt": ckpt, "root": root,
               "tokenizer": AutoTokenizer.from_pretrained(str(ckpt))}


def ask(live, top_k: int, racing: bool = False) -> dict[str, dict] | None:
    """The question's selections, per router layer ({"doc_ids", "scores"}, best first).
    `racing` (a question sent during a removal): None where it was admitted after the
    removal, whose bank then holds fewer than `top_k` documents."""
    ids, _ = expected_prompt(live["tokenizer"], QUESTION)
    response = httpx.post(live["base"] + "/v1/completions", timeout=120, json={
        "model": str(live["ckpt"]), "prompt": ids, "max_tokens": 2, "temperature": 0,
        "vllm_xargs": {"msa_bank": "docs", "msa_top_k": top_k, "msa_return_selection": True}})
    if racing and response.status_code == 400 and "is larger than the bank" in response.text:
        return None
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
    after = ask(live, 23)
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
        asks = [pool.submit(ask, live, everything, True) for _ in range(8)]
        removal = pool.submit(delete, live, gone)
        answers = [a.result() for a in asks]
    assert removal.result().status_code == 200, removal.result().text
    seen = set()
    for answer in answers:
        if answer is None:
            continue  # admitted after the removal, for more documents than remain
        old = [gone in report["doc_ids"] for report in answer.values()]
        assert all(old) or not any(old), "a request saw two generations"
        want = ranking if old[0] else [(d, s) for d, s in ranking if d != gone]
        assert list(zip(answer[layer]["doc_ids"], answer[layer]["scores"], strict=True)) == want
        seen.add(old[0])
    after = ask(live, everything - 1)
    assert all(gone not in report["doc_ids"] for report in after.values())


# An added document the question is about, and one long enough for several chunks and
# several prefill steps of the 96-token budget.
MILL = "In the spring of 1821 the river Alder flooded the old mill and swept its wheel away."
LONG = " ".join(f"Entry {i}: the lighthouse keeper logged the weather, the ships and the "
                "oil burnt that night." for i in range(12))


def post(live, documents, key: str | None = ADMIN, bank: str = "docs") -> httpx.Response:
    headers = {} if key is None else {ADMIN_HEADER: key}
    return httpx.post(f"{live['base']}/v1/msa/banks/{bank}/documents", headers=headers,
                      json=documents, timeout=300)


def put(live, doc, body, key: str | None = ADMIN) -> httpx.Response:
    headers = {} if key is None else {ADMIN_HEADER: key}
    return httpx.put(f"{live['base']}/v1/msa/banks/docs/documents/{doc}", headers=headers,
                     json=body, timeout=300)


def answer(live, top_k: int) -> dict:
    ids, _ = expected_prompt(live["tokenizer"], QUESTION)
    response = httpx.post(live["base"] + "/v1/completions", timeout=120, json={
        "model": str(live["ckpt"]), "prompt": ids, "max_tokens": 3, "temperature": 0,
        "logprobs": 2, "return_tokens_as_token_ids": True,
        "vllm_xargs": {"msa_bank": "docs", "msa_top_k": top_k, "msa_return_selection": True}})
    assert response.status_code == 200, response.text
    return response.json()


def assert_reference_answer(live, top_k: int) -> dict:
    """The server's answer over the bank's current generation equals the float64
    reference's over that generation's live documents (their texts as stored)."""
    bank = MemoryBank.open(live["bank"])
    tokenizer = live["tokenizer"]
    ids, span = expected_prompt(tokenizer, QUESTION)
    got = answer(live, top_k)
    ref = ReferenceMSA(live["ckpt"])
    want = reference_answer(ref, ids, span, bank_docs(tokenizer, bank), top_k=top_k,
                            rope_offset_k=ref.cfg["msa_config"]["top_k_docs"],
                            template_len=span[0], max_tokens=3)
    choice = got["choices"][0]
    tokens = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
    assert tokens == want.tokens
    for step, top in enumerate(choice["logprobs"]["top_logprobs"]):
        for token, logprob in top.items():
            token_id = int(token.removeprefix("token_id:"))
            assert abs(logprob - want.logprobs[step][token_id].item()) <= LOGPROB_TOL
    layers = got["kv_transfer_params"]["msa_selection"]["layers"]
    for layer in ref.router_layers:
        report = layers[str(layer)]
        assert sorted(report["doc_ids"]) == want.selections[layer], layer
        scores = dict(zip(want.selections[layer], want.scores[layer], strict=True))
        for doc_id, score in zip(report["doc_ids"], report["scores"], strict=True):
            assert abs(score - scores[doc_id]) <= SCORE_TOL * max(1.0, abs(scores[doc_id]))
    return layers


def stored_rows(bank: MemoryBank, doc_id: int, layer: int) -> dict[str, torch.Tensor]:
    rows = bank.chunk_doc_ids == doc_id
    got = bank.layer(layer)
    return {name: getattr(got, name)[rows].double()
            for name in ("routing_keys", "keys", "values")}


def test_bad_adds_are_refused_and_write_nothing(live):
    generation = MemoryBank.open(live["bank"]).generation
    too_long = "word " * 2000
    for response, status in (
            (post(live, {"documents": [{"id": 200, "text": "x"}]}, key=None), 401),
            (post(live, {"documents": [{"id": 200, "text": "x"}]}, key="wrong"), 401),
            (post(live, {"documents": [{"id": 200, "text": "x"}]}, bank="nope"), 404),
            (post(live, {"documents": []}), 400),
            (post(live, {"docs": [{"id": 200, "text": "x"}]}), 400),
            (post(live, [{"id": 200, "text": "x"}]), 400),
            (post(live, {"documents": [{"id": -1, "text": "x"}]}), 400),
            (post(live, {"documents": [{"id": True, "text": "x"}]}), 400),
            (post(live, {"documents": [{"id": 200, "text": ""}]}), 400),
            (post(live, {"documents": [{"id": 200, "text": "x", "more": 1}]}), 400),
            (post(live, {"documents": [{"id": 200, "text": "a"}, {"id": 200, "text": "b"}]}),
             400),
            (post(live, {"documents": [{"id": 8, "text": "already there"}]}), 409),
            (post(live, {"documents": [{"id": 201, "text": too_long}]}), 400),
            (put(live, 200, {"text": "x"}, key=None), 401),
            (put(live, "x", {"text": "x"}), 400),
            (put(live, 200, {"id": 200, "text": "x"}), 400)):
        assert response.status_code == status, response.text
        assert response.json()["error"]["message"]
    assert "201" in post(live, {"documents": [{"id": 201, "text": too_long}]}).text
    assert MemoryBank.open(live["bank"]).generation == generation
    assert httpx.get(live["base"] + "/health", timeout=30).status_code == 200


def test_added_documents_are_encoded_by_the_engine_and_routed(live):
    everything = MemoryBank.open(live["bank"]).num_documents
    before = ask(live, everything)
    response = post(live, {"documents": [{"id": 100, "text": MILL}, {"id": 101, "text": LONG}]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["added"] == [100, 101] and body["replaced"] == []
    assert body["documents"] == everything + 2 and body["workers"] >= 1
    # Durable, and what the engine encoded is stage 1 (the float64 reference's, to the
    # engine's float32 rounding).
    bank = MemoryBank.open(live["bank"])
    assert bank.generation == body["generation"]
    assert bank.text(100) == MILL and bank.text(101) == LONG
    ref = ReferenceMSA(live["ckpt"])
    tokenizer = live["tokenizer"]
    long_ids = dict(bank_docs(tokenizer, bank))[101]
    assert len(long_ids) > 2 * 96  # (prefilled in three steps or more)
    for doc_id, ids in bank_docs(tokenizer, bank)[-2:]:
        expected = ref.encode_document(ids)
        for layer in ref.router_layers:
            for name, rows in stored_rows(bank, doc_id, layer).items():
                err = (rows - expected[layer][name]).abs().max().item()
                assert err <= 1e-4, (doc_id, layer, name, err)
    # Routable at once: the first layer ranks the old documents as before (bit for bit)
    # with the new ones among them; the whole answer is the reference's.
    after = assert_reference_answer(live, everything + 2)
    layer = min(before, key=int)
    ranked = list(zip(after[layer]["doc_ids"], after[layer]["scores"], strict=True))
    assert [(d, s) for d, s in ranked if d < 100] == list(
        zip(before[layer]["doc_ids"], before[layer]["scores"], strict=True))
    assert {100, 101} <= set(after[layer]["doc_ids"])
    assert_reference_answer(live, 4)
    info = httpx.get(f"{live['base']}/v1/msa/banks/docs", timeout=30).json()
    assert info["served_generations"] == [bank.generation]


def test_a_replaced_document_serves_its_new_text_only(live):
    text = "The old mill stood dry for a century; no river ever reached it."
    response = put(live, 100, {"text": text})
    assert response.status_code == 200, response.text
    assert response.json()["replaced"] == [100] and response.json()["added"] == []
    bank = MemoryBank.open(live["bank"])
    assert bank.text(100) == text and bank.doc_ids.count(100) == 1
    assert_reference_answer(live, bank.num_documents)  # (the reference knows only the new)
    # PUT of an id the bank does not hold adds it.
    response = put(live, 102, {"text": "A short note about the harbour."})
    assert response.status_code == 200 and response.json()["added"] == [102]


def test_questions_during_an_add_see_one_generation(live):
    from concurrent.futures import ThreadPoolExecutor

    everything = MemoryBank.open(live["bank"]).num_documents
    with ThreadPoolExecutor(9) as pool:
        asks = [pool.submit(ask, live, everything) for _ in range(8)]
        added = pool.submit(post, live, {"documents": [{"id": 103, "text": MILL + " Again."}]})
        answers = [a.result() for a in asks]
    assert added.result().status_code == 200, added.result().text
    for reply in answers:
        new = [103 in report["doc_ids"] for report in reply.values()]
        assert all(new) or not any(new), "a request saw two generations"
    assert all(103 in report["doc_ids"] for report in ask(live, everything + 1).values())


def test_the_edit_example_adds_and_removes(live):
    """examples/edit_server.py against the server: an add and a removal, each answered once
    applied; without the key it exits with the server's refusal."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "edit_server.py"

    def run(*args: str, key: str | None = ADMIN) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "VLLM_MSA_ADMIN_KEY"}
        if key:
            env["VLLM_MSA_ADMIN_KEY"] = key
        return subprocess.run([sys.executable, str(example), "--url", live["base"], "--bank",
                               "docs", *args], capture_output=True, text=True, env=env,
                              timeout=300)

    refused = run("remove", "--id", "100", key=None)
    assert refused.returncode != 0 and "401" in refused.stderr
    added = run("add", "--id", "105", "--text", "A note the example added.")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["added"] == [105]
    removed = run("remove", "--id", "105")
    assert removed.returncode == 0 and json.loads(removed.stdout)["removed"] == [105]
    shown = json.loads(run("show").stdout)
    assert shown["generation"] == MemoryBank.open(live["bank"]).generation


def test_a_restarted_server_serves_the_latest_generation_on_two_replicas(live):
    """A restart (here with two data-parallel replicas) loads the latest generation and
    answers as before; an edit there switches both replicas: every later answer, whichever
    replica serves it, is the reference's over the new generation."""
    from concurrent.futures import ThreadPoolExecutor

    bank = MemoryBank.open(live["bank"])
    served = answer(live, bank.num_documents)
    with running_server(live["ckpt"], {"banks": {"docs": str(live["bank"])}},
                        live["root"] / "restart.log", "--max-num-batched-tokens", "96",
                        "--data-parallel-size", "2",
                        env={"VLLM_MSA_ADMIN_KEY": ADMIN}) as again:
        replicas = {**live, "base": again["base"]}
        info = httpx.get(f"{again['base']}/v1/msa/banks/docs", timeout=30).json()
        assert info["generation"] == info["served_generations"][0] == bank.generation
        restarted = answer(replicas, bank.num_documents)
        assert restarted["choices"][0]["logprobs"]["tokens"] == \
            served["choices"][0]["logprobs"]["tokens"]
        assert restarted["kv_transfer_params"]["msa_selection"]["layers"] == \
            served["kv_transfer_params"]["msa_selection"]["layers"]
        removed = delete(replicas, 101)
        assert removed.status_code == 200 and removed.json()["workers"] == 2, removed.text
        added = post(replicas, {"documents": [{"id": 104, "text": MILL + " Once more."}]})
        assert added.status_code == 200 and added.json()["workers"] == 2, added.text
        info = httpx.get(f"{again['base']}/v1/msa/banks/docs", timeout=30).json()
        assert info["served_generations"] == [added.json()["generation"]]  # both replicas
        everything = MemoryBank.open(live["bank"]).num_documents
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: ask(replicas, everything), range(6)))
        for reply in answers:
            for report in reply.values():
                assert 104 in report["doc_ids"] and 101 not in report["doc_ids"]
        assert_reference_answer(replicas, 4)
