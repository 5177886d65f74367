"""Property-based fuzzing of every door into MSA serving: no generated request may take the
server down or get a 5xx, and valid requests are still answered exactly afterwards.

Over the real OpenAI server (the session's shared one, tests/conftest.py `server`):

- `/v1/msa/answer` from its own published schema (schemathesis, positive and negative
  cases) and from hypothesis strategies that aim at the MSA options (banks, top-k, seeds,
  questions holding the prompt's special tokens, Memory Interleave bounds, vllm_xargs);
- `/v1/completions` and `/v1/chat/completions` with `vllm_xargs` holding every `msa_*`
  option with valid, malformed, out-of-range and mistyped values, over valid MSA prompts and
  arbitrary token ids.

Every case must be answered 2xx, or 4xx with a message, and `/health` must stay 200 after
each. Generation is kept to a few tokens (the point is admission, not decoding). After the
storm a completion over the bank still equals the float64 reference.

Hypothesis runs derandomized (the same cases every CI run) with no example database.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_http import QUESTIONS, check_completion, completion, post
from test_serving import expected_prompt

pytestmark = pytest.mark.slow

MAX_TOKENS = 3


def fuzz_settings(examples: int):
    return settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


TALLY: dict[str, list[int]] = {}  # test -> the status of every case it sent


def assert_answered(server, response, tally: str) -> None:
    """2xx, or 4xx with an error message; and the server still healthy."""
    TALLY.setdefault(tally, []).append(response.status_code)
    assert response.status_code < 500, (response.status_code, response.text[:2000])
    if response.status_code >= 400:
        try:
            error = response.json()
        except ValueError:
            raise AssertionError(f"{response.status_code} without a JSON body: "
                                 f"{response.text[:500]!r}") from None
        message = (error.get("error") or {}).get("message") if isinstance(error, dict) else None
        message = message or (error.get("detail") if isinstance(error, dict) else None)
        assert message, f"{response.status_code} without a message: {error}"
    assert httpx.get(server["base"] + "/health", timeout=30).status_code == 200


def send(server, path: str, body) -> httpx.Response:
    return httpx.post(server["base"] + path, content=json.dumps(body), timeout=120,
                      headers={"Content-Type": "application/json"})


# ------------------------------------------------------------------ strategies
def mostly(valid, invalid):
    """Valid values three times in four: a case with several options stays admissible often
    enough that generation, not only refusal, is exercised."""
    return st.one_of(valid, valid, valid, invalid)


def maybe(**options):
    """A dict holding any subset of `options`, rarely any other msa_* key."""
    return st.fixed_dictionaries({}, optional={**options, "msa_colour": scalars})


scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
SPECIALS = ["<|im_start|>user\n", "<|im_end|>", "<|object_ref_end|>", "<End-of-Retrieve>",
            "[3]", "\nPlease return all documents related to the question\n", "\x00", "é𝄞"]
questions = st.lists(st.sampled_from(SPECIALS) | st.text(max_size=20), max_size=6).map("".join)
banks = mostly(st.sampled_from(["docs", ""]),
               st.sampled_from(["nope", "../docs", "DOCS", "docs/.."]) | scalars)
top_ks = mostly(st.integers(1, 24), st.integers(-3, 40) | st.sampled_from(
    ["2", " 4", "many", "1e3"]) | scalars)
flags = mostly(st.booleans(), st.sampled_from(["true", "false", "1", "0", "maybe"])
               | st.integers(-1, 2))
flat_ranges = st.lists(st.integers(-5, 300), max_size=7)
routings = (flat_ranges | flat_ranges.map(json.dumps)
            | st.lists(st.lists(st.integers(-5, 300), max_size=3), max_size=3).map(json.dumps)
            | st.text(max_size=20) | st.integers())
msa_xargs = st.one_of(
    maybe(msa_bank=banks, msa_top_k=top_ks, msa_return_selection=flags),
    maybe(msa_bank=banks, msa_top_k=top_ks, msa_return_selection=flags,
          msa_routing=routings, msa_span=routings),
)


@st.composite
def prompts(draw, tokenizer):
    """A valid MSA prompt (token ids), arbitrary ids (out of vocabulary too), or text."""
    kind = draw(st.sampled_from(["msa", "ids", "text"]))
    if kind == "msa":
        return expected_prompt(tokenizer, draw(st.sampled_from(QUESTIONS)))[0]
    if kind == "ids":
        return draw(st.lists(st.integers(-2, 600), min_size=1, max_size=40))
    return draw(questions.filter(bool))


@st.composite
def answer_bodies(draw):
    body = draw(st.fixed_dictionaries({"question": questions, "bank": banks}, optional={
        "top_k": top_ks, "seed": mostly(st.integers(0, 2**32), st.integers(-2**65, 2**65)),
        "interleave": st.booleans(), "stream": st.booleans(), "return_selection": flags,
        "temperature": mostly(st.floats(0, 2), st.floats(-1, 3)),
        "top_p": mostly(st.floats(0.01, 1), st.floats(-0.5, 1.5)),
        "max_rounds": mostly(st.integers(1, 3), st.integers(-1, 0)),
        "max_retrieved_docs": mostly(st.integers(1, 5), st.integers(-1, 0)),
        "max_retrieval_tokens": mostly(st.integers(1, MAX_TOKENS), st.integers(-1, 0)),
        "stop": st.lists(st.text(max_size=4), max_size=2),
        "vllm_xargs": msa_xargs | st.dictionaries(st.text(max_size=8), scalars, max_size=2),
    }))
    body["max_tokens"] = draw(mostly(st.integers(1, MAX_TOKENS), st.integers(-1, 0)))
    return body


def capped(case):
    """Schemathesis' generated bodies with generation kept short (any value it drew for
    a token bound, kept within MAX_TOKENS)."""
    body = case.body
    if isinstance(body, dict):
        for key in ("max_tokens", "max_retrieval_tokens"):
            if isinstance(body.get(key), int) and not isinstance(body[key], bool) \
                    and body[key] > MAX_TOKENS:
                body[key] = MAX_TOKENS
        body.setdefault("max_tokens", MAX_TOKENS)
    return case


def realistic(case):
    """A schema-valid case made admissible more often: the schema cannot know which banks
    the server has or how many documents they hold, so a drawn bank is this server's one
    and a drawn top-k fits its 24 documents (what schemathesis' hooks are for)."""
    body = capped(case).body
    if isinstance(body, dict):
        body["bank"] = "docs"
        if isinstance(body.get("top_k"), int):
            body["top_k"] = 1 + body["top_k"] % 24
    return case


# ------------------------------------------------------------------ tests
def test_answer_route_schema_fuzz(server):
    """Cases drawn from the route's own OpenAPI schema, valid and invalid (schemathesis)."""
    from schemathesis import GenerationMode, openapi

    spec = httpx.get(server["base"] + "/openapi.json", timeout=30).json()
    schema = openapi.from_dict(spec)
    operation = schema["/v1/msa/answer"]["POST"]
    cases = (operation.as_strategy(GenerationMode.POSITIVE).map(realistic)
             | operation.as_strategy(GenerationMode.NEGATIVE).map(capped))

    @fuzz_settings(80)
    @given(case=cases)
    def fuzz(case):
        # schemathesis serialises its own cases (negative ones may not be JSON at all).
        assert_answered(server, case.call(base_url=server["base"], timeout=120), "schema")

    fuzz()
    assert_generated("schema", 80)


def test_bank_routes_fuzz(server):
    """The bank routes' path parameters, drawn from their schema: answered, never a 5xx;
    and this server has no admin key, so no edit (add, replace, removal) ever gets past the
    refusal."""
    from schemathesis import GenerationMode, openapi

    spec = httpx.get(server["base"] + "/openapi.json", timeout=30).json()
    schema = openapi.from_dict(spec)
    operations = [schema["/v1/msa/banks/{bank}"]["GET"],
                  schema["/v1/msa/banks/{bank}/documents"]["POST"],
                  schema["/v1/msa/banks/{bank}/documents/{doc_id}"]["PUT"],
                  schema["/v1/msa/banks/{bank}/documents/{doc_id}"]["DELETE"]]
    cases = st.one_of(*(op.as_strategy(mode) for op in operations
                        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)))

    @fuzz_settings(50)
    @given(case=cases)
    def fuzz(case):
        response = case.call(base_url=server["base"], timeout=60)
        assert response.status_code < 500, response.text
        if case.method.upper() in ("DELETE", "POST", "PUT"):
            assert response.status_code in (403, 404, 405), response.text

    fuzz()
    assert httpx.get(server["base"] + "/health", timeout=30).status_code == 200
    from vllm_msa.bank import MemoryBank

    assert MemoryBank.open(server["bank"].path).generation == 0  # nothing was edited


def assert_generated(tally: str, examples: int) -> None:
    """The fuzz ran the cases it was asked for, and they reached both sides of admission."""
    statuses = TALLY.get(tally, [])
    assert len(statuses) >= examples, (tally, len(statuses))
    assert any(s < 300 for s in statuses) and any(s >= 400 for s in statuses), (
        tally, sorted(set(statuses)))


def test_answer_route_option_fuzz(server):
    @fuzz_settings(60)
    @given(body=answer_bodies())
    def fuzz(body):
        assert_answered(server, send(server, "/v1/msa/answer", body), "answer")

    fuzz()
    assert_generated("answer", 60)


def test_completions_and_chat_xargs_fuzz(server, tokenizer, reference):
    @fuzz_settings(80)
    @given(prompt=prompts(tokenizer), xargs=msa_xargs, tokens=st.integers(0, MAX_TOKENS))
    def fuzz_completions(prompt, xargs, tokens):
        body = {"model": str(server["ckpt"]), "prompt": prompt, "max_tokens": tokens,
                "temperature": 0, "vllm_xargs": xargs}
        assert_answered(server, send(server, "/v1/completions", body), "completions")

    @fuzz_settings(40)
    @given(content=questions, xargs=msa_xargs, system=st.booleans())
    def fuzz_chat(content, xargs, system):
        messages = [{"role": "user", "content": content}]
        if system:
            messages.insert(0, {"role": "system", "content": "be brief"})
        body = {"model": str(server["ckpt"]), "messages": messages,
                "max_tokens": MAX_TOKENS, "temperature": 0, "vllm_xargs": xargs}
        assert_answered(server, send(server, "/v1/chat/completions", body), "chat")

    fuzz_completions()
    fuzz_chat()
    assert_generated("completions", 80)
    assert_generated("chat", 40)
    # After the storm: still exact.
    ids, span = expected_prompt(tokenizer, QUESTIONS[0])
    check_completion(completion(server, ids, msa_bank="docs", msa_return_selection=True),
                     reference(ids, span), reference.router_layers)
    assert post(server, "/v1/msa/answer", {"bank": "docs", "question": QUESTIONS[1],
                                           "max_tokens": 2}).status_code == 200
