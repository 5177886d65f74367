"""Memory Interleave offline (`vllm_msa.interleave.answer` over the real `LLM`).

The tiny checkpoint's outputs are scripted through the real engine (tests/scripted_outputs.py
forces tokens; the logprobs stay the model's). Every step's prompt, routing ranges, appended
documents and outcome are compared with an independent implementation of the protocol
(tests/interleave_reference.py), and every step's selections and logprobs with the float64
MSA pipeline (tests/msa_reference.py) run on that step's prompt and routing ranges — which
checks that re-routing rounds route on exactly the question plus the latest retrieved texts.
"""

from __future__ import annotations

import pytest
from conftest import running_llm
from interleave_reference import simulate
from msa_reference import reference_answer
from reference import ReferenceMSA
from scripted_outputs import KEY, ScriptedOutputs
from test_serving import bank_docs

pytestmark = pytest.mark.slow

LOGPROB_TOL = 1e-3
TOP_K = 4
ROPE_OFFSET = 4
TEMPLATE_LEN = 3

# What the model "writes" at each step, per scenario (texts; special tokens stay single).
SCENARIOS = {
    # ids -> documents appended -> new round -> <End-of-Retrieve> -> question turn -> answer
    "one id": ("Which river flooded the old mill?", [
        "[3]<|object_ref_end|>", "<End-of-Retrieve>",
        "The answer to the question is: the Amazon<|im_end|>"]),
    # several ids (repeated, unknown) -> more ids after an append -> end -> answer
    "several ids": ("Who repaired the lighthouse lamp?", [
        "[7] and [2][999][2]<|object_ref_end|>", "[5]<|object_ref_end|>",
        "<End-of-Retrieve>", "The answer to the question is: Marie<|im_end|>"]),
    # only unknown ids -> a bare delimiter; the next round routes on the question alone
    "unknown ids": ("What did the baker sell?", [
        "[404][77777]<|object_ref_end|>", "<End-of-Retrieve>",
        "The answer to the question is: bread<|im_end|>"]),
    # an answer without retrieval
    "direct answer": ("Where was the treaty signed?", [
        "The answer to the question is: Paris<|im_end|>"]),
    # the model stops without an answer
    "no answer": ("Why is the sky blue?", ["light scatters<|im_end|>"]),
}


@pytest.fixture(scope="module")
def engine(checkpoints, default_banks):
    ckpt = checkpoints()
    banks = {name: str(b.path) for name, b in default_banks.items()}
    with running_llm(model=str(ckpt), enforce_eager=True, logits_processors=[ScriptedOutputs],
                     additional_config={"msa": {"banks": banks, "default_bank": "docs"}}
                     ) as llm:
        yield {"llm": llm, "ref": ReferenceMSA(ckpt), "bank": default_banks["docs"]}


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def scripted(tokenizer, question, outputs, bank, **limits):
    """The expected run, and sampling params that make the engine write `outputs`."""
    from vllm import SamplingParams

    texts = {d: bank.text(d) for d in bank.doc_ids}
    expected = simulate(tokenizer, question, texts, outputs, **limits)
    script = {str(len(step.prompt)): step.output for step in expected.steps}
    params = SamplingParams(temperature=0.0, logprobs=3, extra_args={KEY: script})
    return expected, params


def check_protocol(result, expected) -> None:
    assert result.error is None, result.error
    assert len(result.steps) == len(expected.steps)
    for got, want in zip(result.steps, expected.steps, strict=True):
        assert got.prompt_token_ids == want.prompt, (got.round, got.phase)
        assert [tuple(r) for r in got.routing] == want.routing, (got.round, got.phase)
        assert got.token_ids == want.output
        assert (got.round, got.phase, got.outcome) == (want.round, want.phase, want.outcome)
        assert got.doc_ids == want.doc_ids
        assert got.unknown_ids == want.unknown_ids
        assert got.dropped_ids == want.dropped_ids
    assert result.stopped_by == expected.stopped_by
    assert result.answer == expected.answer


def check_against_model(step, ref, docs) -> None:
    """The step's selections and logprobs equal the float64 pipeline on its prompt/ranges."""
    want = reference_answer(ref, step.prompt_token_ids, [tuple(r) for r in step.routing], docs,
                            top_k=TOP_K, rope_offset_k=ROPE_OFFSET, template_len=TEMPLATE_LEN,
                            max_tokens=len(step.token_ids), forced=step.token_ids)
    layers = step.selection["layers"]
    for layer in ref.router_layers:
        assert sorted(layers[str(layer)]["doc_ids"]) == want.selections[layer], layer
    for i, top in enumerate(step.logprobs):
        for token_id, logprob in top.items():
            assert abs(logprob.logprob - want.logprobs[i][token_id].item()) <= LOGPROB_TOL


def test_scripted_questions_in_one_batch(engine):
    from vllm_msa.interleave import answer

    llm, bank = engine["llm"], engine["bank"]
    tokenizer = llm.get_tokenizer()
    runs, params = [], []
    for question, texts in SCENARIOS.values():
        outputs = [encode(tokenizer, t) for t in texts]
        expected, sampling = scripted(tokenizer, question, outputs, bank)
        runs.append(expected)
        params.append(sampling)
    # Spy on the real engine: the questions' steps must be in flight together.
    core = llm.llm_engine
    in_flight = []
    step = core.step

    def counting_step():
        in_flight.append(core.get_num_unfinished_requests())
        return step()

    core.step = counting_step
    try:
        results = answer(llm, [q for q, _ in SCENARIOS.values()], sampling_params=params)
    finally:
        core.step = step
    assert max(in_flight) == len(SCENARIOS)
    docs = bank_docs(tokenizer, bank)
    for name, result, expected in zip(SCENARIOS, results, runs, strict=True):
        check_protocol(result, expected)
        for step_result in result.steps:
            check_against_model(step_result, engine["ref"], docs)
        assert result.finish_reason == "stop", name
    one, several, unknown, direct, silent = results
    assert one.answer == "the Amazon" and one.retrieved_doc_ids == [3]
    # Every appended block is "[n]. text\n" per distinct known id, ascending, then the
    # delimiter; the re-routing query is the question plus the latest block.
    assert several.steps[0].doc_ids == [2, 7] and several.steps[0].unknown_ids == [999]
    assert several.retrieved_doc_ids == [2, 7, 5]
    block = encode(tokenizer, f"[5]. {bank.text(5)}\n")
    last = several.steps[2]
    assert last.prompt_token_ids[last.routing[1][0]:last.routing[1][1]] == block
    assert len(unknown.steps[1].routing) == 1  # the question only
    assert direct.answer == "Paris" and len(direct.steps) == 1
    assert silent.answer is None and silent.text == "light scatters<|im_end|>"
    assert one.usage["completion_tokens"] == sum(len(s.token_ids) for s in one.steps)


@pytest.mark.parametrize(("limits", "texts", "stopped_by"), [
    ({"max_rounds": 2}, ["[1]<|object_ref_end|>", "[2]<|object_ref_end|>",
                         "The answer to the question is: x<|im_end|>"], "max_rounds"),
    ({"max_retrieved_docs": 2}, ["[1][2][3]<|object_ref_end|>", "[4]<|object_ref_end|>",
                                 "The answer to the question is: y<|im_end|>"],
     "max_retrieved_docs"),
    ({"max_retrieval_tokens": 4}, ["[1]", "The answer to the question is: z<|im_end|>"],
     "max_retrieval_tokens"),
    ({"max_tokens": 12}, ["[1]<|object_ref_end|>", "<End-of-Retrieve>"], "max_tokens"),
], ids=["max_rounds", "max_retrieved_docs", "max_retrieval_tokens", "max_tokens"])
def test_bounds(engine, limits, texts, stopped_by):
    from vllm_msa.interleave import answer

    llm, bank = engine["llm"], engine["bank"]
    tokenizer = llm.get_tokenizer()
    question = "Which mountain is the highest?"
    outputs = [encode(tokenizer, t) for t in texts]
    if "max_retrieval_tokens" in limits:  # the engine cuts a long retrieval step
        outputs[0] = encode(tokenizer, "[1] is probably it, maybe")[:4]
    if "max_tokens" in limits:  # the answer gets what is left of 12 tokens
        outputs.append(encode(tokenizer, "The answer to the question is: w<|im_end|>")
                       [: 12 - len(outputs[0]) - len(outputs[1])])
    translated = {"max_retrieved_docs": "max_docs"}
    expected, params = scripted(tokenizer, question, outputs, bank,
                                **{translated.get(k, k): v for k, v in limits.items()})
    (result,) = answer(llm, [question], sampling_params=params, **limits)
    check_protocol(result, expected)
    assert result.stopped_by == stopped_by
    if stopped_by == "max_tokens":
        assert result.finish_reason == "length" and result.usage["completion_tokens"] == 12


def test_bad_questions_and_options(engine):
    from vllm_msa.interleave import answer
    from vllm_msa.options import MSARequestError

    llm = engine["llm"]
    with pytest.raises(MSARequestError, match="unknown bank 'nope'"):
        answer(llm, ["q?"], bank="nope")
    with pytest.raises(MSARequestError, match="larger than"):
        answer(llm, ["q?"], bank="small", top_k=4)
    with pytest.raises(ValueError, match="max_rounds"):
        answer(llm, ["q?"], max_rounds=0)
    # A question the engine refuses fails alone; the others are answered.
    tokenizer = llm.get_tokenizer()
    outputs = [encode(tokenizer, "The answer to the question is: ok<|im_end|>")]
    _, params = scripted(tokenizer, "Fine?", outputs, engine["bank"])
    good, bad = answer(llm, ["Fine?", "long " * 1200], sampling_params=[params, params])
    assert good.answer == "ok" and good.error is None
    assert bad.error and bad.answer is None and not bad.steps
