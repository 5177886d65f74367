"""MSA over HTTP: the real OpenAI server (`python -m vllm.entrypoints.openai.api_server`, as
`vllm serve` runs it) driven by a real client, compared with the independent reference.

The server (tests/conftest.py `server`, shared with tests/test_fuzz.py) serves a bank
("docs") and plain requests; its step budget is small (96 tokens) so concurrent requests must
share steps, which is where a routing span could be split. It also loads the scripted-outputs
logits processor (tests/scripted_outputs.py) for the Memory Interleave route; the 96-token
budget is what stops retrieval there when appended documents would make the routing span too
long for one step.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import HTTP_MAX_TOKENS, HTTP_STEP_BUDGET
from interleave_reference import simulate
from msa_reference import reference_answer
from reference import ReferenceMSA
from scripted_outputs import KEY
from test_serving import bank_docs, expected_prompt

pytestmark = pytest.mark.slow

LOGPROB_TOL = 1e-3
MAX_TOKENS = HTTP_MAX_TOKENS
STEP_BUDGET = HTTP_STEP_BUDGET
QUESTIONS = ["Which river flooded the old mill?", "Who repaired the lighthouse lamp?",
             "What did the baker sell?", "Where was the treaty signed?"]


def post(server, path, body, timeout=120):
    return httpx.post(server["base"] + path, json=body, timeout=timeout)


def completion(server, ids, **xargs):
    body = {"model": str(server["ckpt"]), "prompt": ids, "max_tokens": MAX_TOKENS,
            "temperature": 0, "logprobs": 1, "return_tokens_as_token_ids": True}
    if xargs:
        body["vllm_xargs"] = xargs
    return post(server, "/v1/completions", body)


def token_ids(choice) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]


def check_completion(response, expected, router_layers, with_selection=True):
    assert response.status_code == 200, response.text
    data = response.json()
    choice = data["choices"][0]
    assert token_ids(choice) == expected.tokens
    for step, (token, logprob) in enumerate(zip(expected.tokens,
                                                choice["logprobs"]["token_logprobs"],
                                                strict=True)):
        assert abs(logprob - expected.logprobs[step][token].item()) <= LOGPROB_TOL
    if with_selection:
        layers = data["kv_transfer_params"]["msa_selection"]["layers"]
        assert {int(k) for k in layers} == set(router_layers)
        for layer in router_layers:
            assert sorted(layers[str(layer)]["doc_ids"]) == expected.selections[layer]


def test_completions_with_bank_match_reference(server, tokenizer, reference):
    # Four concurrent requests with a 96-token step budget: steps are shared, spans stay whole.
    prompts = [expected_prompt(tokenizer, q) for q in QUESTIONS]
    with ThreadPoolExecutor(len(prompts)) as pool:
        responses = list(pool.map(lambda p: completion(
            server, p[0], msa_bank="docs", msa_return_selection=True), prompts))
    for (ids, span), response in zip(prompts, responses, strict=True):
        check_completion(response, reference(ids, span), reference.router_layers)


def test_plain_and_top_k_requests(server, tokenizer, reference):
    ids, span = expected_prompt(tokenizer, QUESTIONS[0])
    check_completion(completion(server, ids), reference(ids, span, memory=False),
                     reference.router_layers, with_selection=False)
    check_completion(completion(server, ids, msa_bank="docs", msa_top_k=2,
                                msa_return_selection="true"),
                     reference(ids, span, top_k=2), reference.router_layers)


def test_chat_completion_routes_on_last_user_message(server, tokenizer, reference):
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    # The span is the user content: after the template head, up to <|im_end|>.
    head = tokenizer.encode("<|im_start|>user\n", add_special_tokens=False)
    assert ids[: len(head)] == head
    span = (len(head), ids.index(tokenizer.convert_tokens_to_ids("<|im_end|>")))
    expected = reference(ids, span)
    body = {"model": str(server["ckpt"]), "messages": messages, "max_tokens": MAX_TOKENS,
            "temperature": 0, "logprobs": True,
            "vllm_xargs": {"msa_bank": "docs", "msa_return_selection": True}}
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    data = response.json()
    content = data["choices"][0]["logprobs"]["content"]
    for step, item in enumerate(content):
        token = expected.tokens[step]
        assert abs(item["logprob"] - expected.logprobs[step][token].item()) <= LOGPROB_TOL
    assert data["choices"][0]["message"]["content"] == tokenizer.decode(expected.tokens)
    layers = data["kv_transfer_params"]["msa_selection"]["layers"]
    for layer in reference.router_layers:
        assert sorted(layers[str(layer)]["doc_ids"]) == expected.selections[layer]


def test_routing_ranges_over_http(server, tokenizer, reference):
    """`msa_routing` over HTTP: vLLM's `vllm_xargs` schema takes flat lists of numbers, so
    the ranges travel as [start, end, ...] (or as a JSON string); both route like the span
    the front end finds itself."""
    ids, span = expected_prompt(tokenizer, QUESTIONS[1])
    expected = reference(ids, span)
    for routing in (list(span), json.dumps([list(span)])):
        check_completion(completion(server, ids, msa_bank="docs", msa_return_selection=True,
                                    msa_routing=routing), expected, reference.router_layers)


def engine_counts(server) -> tuple[float, float]:
    """(requests running, requests finished by stop or length) from vLLM's /metrics. A
    client's abort is neither: it ends a request without counting it as finished."""
    running = finished = 0.0
    for line in httpx.get(server["base"] + "/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            running += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:request_success_total") and (
                'finished_reason="length"' in line or 'finished_reason="stop"' in line):
            finished += float(line.rsplit(" ", 1)[1])
    return running, finished


def msa_series(server) -> dict[str, float]:
    """The `vllm_msa_*` samples of vLLM's /metrics: {'name{labels}': value}, without the
    labels vLLM adds to every series (model_name, engine)."""
    samples = {}
    for line in httpx.get(server["base"] + "/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm_msa_"):
            key, value = line.rsplit(" ", 1)
            name, _, labels = key.partition("{")
            kept = [p for p in labels.rstrip("}").split(",")
                    if p and not p.startswith(("model_name=", "engine="))]
            samples[name + ("{" + ",".join(kept) + "}" if kept else "")] = float(value)
    return samples


def test_metrics_move_after_requests(server, tokenizer):
    """Every documented `vllm_msa_*` series (docs/metrics.md) is on /metrics, and the
    counters move after memory requests: the workers' figures reach the API server through
    vLLM's KV-connector stats."""
    from vllm_msa.serving.metrics import COUNTERS, GAUGES

    before = msa_series(server)
    ids = expected_prompt(tokenizer, QUESTIONS[0])[0]
    for bank in ("docs", "docs-int8"):
        assert completion(server, ids, msa_bank=bank).status_code == 200
    want = {'vllm_msa_memory_requests_total{bank="docs"}', 'vllm_msa_routing_seconds_count',
            'vllm_msa_documents_selected_total{bank="docs-int8"}',
            'vllm_msa_fetched_bytes_total{bank="docs"}',
            'vllm_msa_rescored_documents_total{bank="docs-int8",rank="0.0"}'}
    deadline = time.monotonic() + 30
    while True:
        after = msa_series(server)
        moved = {k for k in want if after.get(k, 0.0) > before.get(k, 0.0)}
        if moved == want or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert moved == want, (sorted(want - moved), after)
    names = {key.partition("{")[0] for key in after}
    assert {*COUNTERS, *GAUGES, "vllm_msa_routing_seconds_bucket"} <= names, names
    for bank in ("docs", "docs-int8"):
        assert after[f'vllm_msa_bank_gpu_index_bytes{{bank="{bank}",rank="0.0"}}'] > 0
        assert after[f'vllm_msa_bank_host_bytes{{bank="{bank}",rank="0.0"}}'] > 0
    assert (after['vllm_msa_bank_gpu_index_bytes{bank="docs-int8",rank="0.0"}']
            < after['vllm_msa_bank_gpu_index_bytes{bank="docs",rank="0.0"}'])


@pytest.mark.parametrize("interleave", [False, True])
def test_client_that_hangs_up_is_aborted(server, tokenizer, interleave):
    """A non-streamed /v1/msa/answer whose client disconnects stops its engine request (as
    vLLM's own routes do): it leaves the running requests at once and never finishes its
    900 forced tokens (~5 s of generation here)."""
    question = QUESTIONS[0]
    ids, _ = expected_prompt(tokenizer, question)
    filler = tokenizer.encode(" the mill", add_special_tokens=False)[0]
    body = {"bank": "docs", "question": question, "max_tokens": 900, "interleave": interleave,
            "max_retrieval_tokens": 900,
            "vllm_xargs": {KEY: {str(len(ids)): [filler] * 900}}}  # never an early stop
    _, finished = engine_counts(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server["base"] + "/v1/msa/answer", json=body, timeout=0.5)
    deadline = time.time() + 20
    while engine_counts(server)[0] > 0:
        assert time.time() < deadline, "the engine kept generating for a client that left"
        time.sleep(0.2)
    time.sleep(6)  # longer than the whole generation would take
    assert engine_counts(server) == (0, finished)
    assert httpx.get(server["base"] + "/health", timeout=5).status_code == 200


def test_streaming_equals_non_streaming(server, tokenizer):
    ids, _ = expected_prompt(tokenizer, QUESTIONS[2])
    full = completion(server, ids, msa_bank="docs").json()["choices"][0]["text"]
    body = {"model": str(server["ckpt"]), "prompt": ids, "max_tokens": MAX_TOKENS,
            "temperature": 0, "stream": True, "vllm_xargs": {"msa_bank": "docs"}}
    text = ""
    with httpx.stream("POST", server["base"] + "/v1/completions", json=body,
                      timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[len("data: "):])["choices"][0]["text"]
    assert text == full


def test_answer_route(server, tokenizer, reference):
    question = QUESTIONS[3]
    ids, span = expected_prompt(tokenizer, question)
    expected = reference(ids, span)
    response = post(server, "/v1/msa/answer", {"bank": "docs", "question": question,
                                               "max_tokens": MAX_TOKENS, "interleave": False,
                                               "return_selection": True})
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["text"] == tokenizer.decode(expected.tokens)
    assert data["usage"] == {"prompt_tokens": len(ids), "completion_tokens": MAX_TOKENS}
    for layer in reference.router_layers:
        report = data["selection"]["layers"][str(layer)]
        assert sorted(report["doc_ids"]) == expected.selections[layer]
        assert len(report["scores"]) == len(report["doc_ids"])
    # Without the flag, no selection.
    plain = post(server, "/v1/msa/answer", {"bank": "docs", "question": question,
                                            "max_tokens": 2, "interleave": False}).json()
    assert "selection" not in plain
    # A request routed and finished in the same step still reports its selection.
    one = post(server, "/v1/msa/answer", {"bank": "docs", "question": question,
                                          "max_tokens": 1, "interleave": False,
                                          "return_selection": True}).json()
    for layer in reference.router_layers:
        assert sorted(one["selection"]["layers"][str(layer)]["doc_ids"]) == \
            expected.selections[layer]


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/v1/msa/answer", {"bank": "nope", "question": "q?"}, "unknown bank 'nope'"),
    ("/v1/msa/answer", {"bank": "docs"}, "question"),
    ("/v1/msa/answer", {"bank": "docs", "question": "q?", "top_k": 99}, "larger than"),
    ("/v1/msa/answer", {"bank": "docs", "question": "q?", "colour": 1}, "colour"),
    ("/v1/msa/answer", {"bank": "docs", "question": "long " * 200}, "routing span ends"),
    ("/v1/msa/answer", [1, 2], "JSON object"),
    ("/v1/msa/answer", {"bank": "docs", "question": "q?", "stop": ["x"]}, "stop"),
    ("/v1/msa/answer", {"bank": "docs", "question": "q?", "vllm_xargs": {"msa_bank": "x"}},
     "vllm_xargs may not set msa_bank"),
    ("/v1/msa/answer", {"bank": "docs", "question": "q?", "interleave": False,
                        "stream": True}, "stream"),
    ("/v1/msa/answer", {"bank": "docs", "question": "q?", "max_rounds": 0}, "max_rounds"),
    ("/v1/msa/answer", {"bank": "docs", "question": "q?", "seed": 2**64}, "seed"),
    ("/v1/msa/answer", {"bank": "docs", "question": "q?", "seed": 2**64,
                        "interleave": False}, "seed"),
    # A prompt that already fills the model's context (1024): nothing can be generated.
    ("/v1/msa/answer", {"bank": "docs", "question": "word " * 1100},
     "the model's context is 1024"),
    ("completions", {"msa_bank": "nope"}, "unknown bank"),
    ("completions", {"msa_bank": "docs", "msa_top_k": "many"}, "msa_top_k"),
    ("completions", {"msa_bank": "docs", "msa_top_k": 0}, "msa_top_k"),
    ("completions", {"msa_bank": "docs", "msa_typo": 1}, "unknown MSA options"),
    ("completions", {"msa_top_k": 2}, "uses no bank"),
    ("completions", {"msa_bank": "docs", "msa_return_selection": "maybe"},
     "msa_return_selection"),
    ("raw-prompt", {"msa_bank": "docs"}, "template head"),
    ("completions", {"msa_bank": "docs", "msa_routing": "[[1, 5]]"}, "msa_routing"),
    ("completions", {"msa_bank": "docs", "msa_routing": "[[3, 9999]]"}, "msa_routing"),
])
def test_bad_requests_get_400_and_server_stays_up(server, tokenizer, path, body, message):
    if path in ("completions", "raw-prompt"):
        ids = (expected_prompt(tokenizer, QUESTIONS[0])[0] if path == "completions"
               else tokenizer.encode("no template here", add_special_tokens=False))
        response = post(server, "/v1/completions", {
            "model": str(server["ckpt"]), "prompt": ids, "max_tokens": 2,
            "vllm_xargs": body})
    else:
        response = post(server, path, body)
    assert response.status_code == 400, response.text
    assert message in response.text
    ok = post(server, "/v1/msa/answer", {"bank": "docs", "question": "Still there?",
                                         "max_tokens": 1})
    assert ok.status_code == 200, ok.text


# -- Memory Interleave -------------------------------------------------------------------------
INTERLEAVE = {
    # unknown ids -> a bare delimiter -> round 2 routes on the question alone -> answer
    "unknown ids": ("Which river flooded the old mill?", [
        "[404]<|object_ref_end|>", "<End-of-Retrieve>",
        "The answer to the question is: the Amazon<|im_end|>"]),
    # a known id: its text would end the routing span beyond the 96-token step budget, so
    # retrieval stops and the model answers
    "context": ("Who repaired the lighthouse lamp?", [
        "[3]<|object_ref_end|>", "The answer to the question is: Marie<|im_end|>"]),
    "direct answer": ("Where was the treaty signed?", [
        "The answer to the question is: Paris<|im_end|>"]),
}


def interleave_body(server, tokenizer, question, texts, **extra):
    bank = server["bank"]
    outputs = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    expected = simulate(tokenizer, question, {d: bank.text(d) for d in bank.doc_ids}, outputs,
                        budget=STEP_BUDGET, max_len=1024)
    script = {str(len(step.prompt)): step.output for step in expected.steps}
    body = {"bank": "docs", "question": question, "return_selection": True,
            "vllm_xargs": {KEY: script}, **extra}
    return body, expected


def check_interleave(data, expected, tokenizer) -> None:
    assert data["error"] is None, data["error"]
    assert len(data["steps"]) == len(expected.steps)
    for got, want in zip(data["steps"], expected.steps, strict=True):
        assert got["prompt_tokens"] == len(want.prompt)
        assert [tuple(r) for r in got["routing"]] == want.routing
        assert got["text"] == tokenizer.decode(want.output, skip_special_tokens=False)
        assert (got["round"], got["phase"], got["outcome"]) == \
            (want.round, want.phase, want.outcome)
        assert (got["doc_ids"], got["unknown_ids"], got["dropped_ids"]) == \
            (want.doc_ids, want.unknown_ids, want.dropped_ids)
    assert data["stopped_by"] == expected.stopped_by
    assert data["answer"] == expected.answer


def test_interleave_route_concurrent(server, tokenizer):
    cases = [interleave_body(server, tokenizer, q, t) for q, t in INTERLEAVE.values()]
    with ThreadPoolExecutor(len(cases)) as pool:
        responses = list(pool.map(lambda c: post(server, "/v1/msa/answer", c[0]), cases))
    for response, (_, expected) in zip(responses, cases, strict=True):
        assert response.status_code == 200, response.text
        check_interleave(response.json(), expected, tokenizer)
    unknown, context, direct = (r.json() for r in responses)
    assert unknown["steps"][0]["unknown_ids"] == [404]
    assert context["stopped_by"] == "context" and context["retrieved_doc_ids"] == []
    assert direct["answer"] == "Paris" and direct["rounds"] == 1
    # The re-routing round routes on the question alone: the float64 pipeline, given the same
    # prompt and that one range, selects the same documents.
    ref = ReferenceMSA(server["ckpt"])
    step = cases[0][1].steps[1]
    want = reference_answer(ref, step.prompt, step.routing, bank_docs(tokenizer, server["bank"]),
                            top_k=4, rope_offset_k=4, template_len=3, max_tokens=0)
    layers = unknown["steps"][1]["selection"]["layers"]
    for layer in ref.router_layers:
        assert sorted(layers[str(layer)]["doc_ids"]) == want.selections[layer]


def test_interleave_streaming(server, tokenizer):
    question, texts = INTERLEAVE["unknown ids"]
    body, expected = interleave_body(server, tokenizer, question, texts, stream=True)
    events = []
    with httpx.stream("POST", server["base"] + "/v1/msa/answer", json=body,
                      timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    result = events[-1]
    assert result["type"] == "result"
    check_interleave(result, expected, tokenizer)
    # Steps are announced as they finish, in order, each after its own text deltas.
    steps = [e for e in events if e["type"] == "step"]
    assert [(s["round"], s["phase"]) for s in steps] == \
        [(s.round, s.phase) for s in expected.steps]
    text, announced = "", 0
    for event in events[:-1]:
        if event["type"] == "delta":
            text += event["text"]
        else:
            assert event == {"type": "step", **result["steps"][announced]}
            assert text == event["text"]
            text, announced = "", announced + 1
    unstreamed = post(server, "/v1/msa/answer", {**body, "stream": False}).json()
    assert {k: v for k, v in unstreamed.items() if k != "id"} == \
        {k: v for k, v in result.items() if k not in ("id", "type")}
