"""Engine features around MSA requests: preemption + recompute keeps the selection and the
output, abort frees the staging area, requests whose spans compete for a small step budget
are never split (chunked prefill)."""

from __future__ import annotations

import os

import pytest
from conftest import running_llm
from test_serving import assert_staging_released, expected_prompt, staging_in_use

pytestmark = pytest.mark.slow
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

QUESTIONS = ["Which river flooded the old mill?", "Who repaired the lighthouse lamp?",
             "What did the baker sell?", "Where was the treaty signed?"]


def preemptions(worker) -> int:
    from vllm_msa.attention.runtime import current_runtime

    return current_runtime().num_preempted


@pytest.fixture(scope="module")
def engine(checkpoints, default_banks):
    ckpt = checkpoints()
    bank = default_banks["docs"]
    # 12 blocks of 32 tokens: four requests of ~140 tokens cannot all fit, so some are
    # preempted and recomputed. A 64-token step budget makes concurrent prefills compete.
    with running_llm(model=str(ckpt), enforce_eager=True, max_model_len=256, block_size=32,
                     num_gpu_blocks_override=12, max_num_seqs=4, max_num_batched_tokens=64,
                     additional_config={"msa": {"banks": {"docs": str(bank.path)}}}) as llm:
        yield llm


def params(max_tokens: int, **extra):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=1,
                          ignore_eos=True, extra_args={"msa_bank": "docs", **extra})


def test_preemption_and_shared_steps_keep_outputs(engine):
    tokenizer = engine.get_tokenizer()
    prompts = [{"prompt_token_ids": expected_prompt(tokenizer, q)[0]} for q in QUESTIONS]
    sampling = params(85, msa_return_selection=True)
    together = engine.generate(prompts, [sampling] * len(prompts), use_tqdm=False)
    assert engine.collective_rpc(preemptions)[0] > 0, "the test did not cause preemption"
    for prompt, batched in zip(prompts, together, strict=True):
        (alone,) = engine.generate([prompt], [sampling], use_tqdm=False)
        assert alone.kv_transfer_params == batched.kv_transfer_params
        assert alone.outputs[0].token_ids == batched.outputs[0].token_ids
        for a, b in zip(alone.outputs[0].logprobs, batched.outputs[0].logprobs, strict=True):
            for token_id, logprob in a.items():
                assert abs(logprob.logprob - b[token_id].logprob) <= 1e-4
    assert_staging_released(engine)


def test_abort_frees_staging(engine):
    tokenizer = engine.get_tokenizer()
    core = engine.llm_engine
    prompt = {"prompt_token_ids": expected_prompt(tokenizer, QUESTIONS[0])[0]}
    core.add_request("to-abort", prompt, params(150))
    core.add_request("to-finish", prompt, params(3))
    for _ in range(4):
        core.step()
    assert engine.collective_rpc(staging_in_use)[0] > 0
    core.abort_request(["to-abort"])
    while core.has_unfinished_requests():
        core.step()
    assert_staging_released(engine)


def pool_slots(worker) -> int:
    from vllm_msa.attention.runtime import current_runtime

    return current_runtime().pool.num_slots


def test_default_staging_pool_holds_a_full_batch(engine, default_banks):
    """Without `staging_mib` the pool fits max_num_seqs (4) requests, each staging the top-k
    (4) largest documents in every router layer — computed here from the bank itself."""
    from vllm_msa.bank.reader import MemoryBank

    bank = MemoryBank.open(default_banks["docs"].path)
    largest = sorted(bank.doc_num_chunks.tolist(), reverse=True)[:4]
    layers = len(bank.model_info.router_layers)
    assert engine.collective_rpc(pool_slots) == [4 * layers * sum(largest)]


def test_python_api_options_fuzz(engine, checkpoints, default_banks):
    """`SamplingParams.extra_args` fuzzed (tests/test_fuzz.py's option strategies, plus the
    Python-only nested routing lists): every request is answered or refused with a
    ValueError naming the problem, never kills the engine, and a valid request is still
    answered exactly (float64 reference) afterwards."""
    from hypothesis import given
    from hypothesis import strategies as st
    from msa_reference import reference_answer
    from reference import ReferenceMSA
    from test_fuzz import fuzz_settings, msa_xargs
    from test_serving import bank_docs, check_against_reference, sampling
    from vllm import SamplingParams

    tokenizer = engine.get_tokenizer()
    ids, span = expected_prompt(tokenizer, QUESTIONS[0])
    nested = st.lists(st.lists(st.integers(-3, 200), min_size=2, max_size=2), max_size=3)
    options = msa_xargs | st.fixed_dictionaries({"msa_bank": st.just("docs"),
                                                 "msa_routing": nested})

    @fuzz_settings(80)
    @given(extra=options, memory_prompt=st.booleans())
    def fuzz(extra, memory_prompt):
        prompt = ids if memory_prompt else ids[5:]
        try:  # (vLLM itself refuses some values, e.g. integers past 64 bits, right here)
            params = SamplingParams(max_tokens=2, temperature=0.0, extra_args=extra or None)
            (out,) = engine.generate([{"prompt_token_ids": prompt}], [params], use_tqdm=False)
        except ValueError as e:
            assert str(e)
            return
        assert out.outputs[0].token_ids

    fuzz()
    ref = ReferenceMSA(checkpoints())
    expected = reference_answer(ref, ids, span, bank_docs(tokenizer, default_banks["docs"]),
                                top_k=4, rope_offset_k=4, template_len=span[0], max_tokens=6)
    (out,) = engine.generate([{"prompt_token_ids": ids}],
                             [sampling(msa_bank="docs", msa_return_selection=True)],
                             use_tqdm=False)
    check_against_reference(out, expected, ref.router_layers)
    assert_staging_released(engine)
