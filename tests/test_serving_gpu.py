"""Serving on a GPU with vLLM's default execution: torch.compile and piecewise CUDA graphs
(memory attention is a splitting op and runs eagerly), the GPU attention backend's paged cache
read directly. Same comparison as tests/test_serving.py (fp32, 1e-3)."""

from __future__ import annotations

import pytest
from conftest import build_banks, running_llm
from msa_reference import reference_answer
from reference import ReferenceMSA
from test_serving import (
    MAX_TOKENS,
    NUM_LOGPROBS,
    assert_staging_released,
    bank_docs,
    check_against_reference,
    expected_prompt,
    sampling,
)

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

QUESTIONS = ["Which river flooded the old mill?", "Who repaired the lighthouse lamp?",
             "What did the baker sell?"]


def test_compiled_graphs_match_reference(checkpoints, default_banks):
    ckpt = checkpoints()
    bank = default_banks["docs"]
    ref = ReferenceMSA(ckpt)
    with running_llm(model=str(ckpt), additional_config={
            "msa": {"banks": {"docs": str(bank.path)}}}) as llm:
        tokenizer = llm.get_tokenizer()
        prompts = [expected_prompt(tokenizer, q) for q in QUESTIONS]
        # Memory requests, and a plain one, batched: prefill and CUDA-graph decode steps mix.
        requests = [({"prompt_token_ids": ids}, sampling(msa_bank="docs",
                                                          msa_return_selection=True))
                    for ids, _ in prompts]
        requests.append(({"prompt_token_ids": prompts[0][0]}, sampling()))
        outputs = llm.generate([r[0] for r in requests], [r[1] for r in requests],
                               use_tqdm=False)
        docs = bank_docs(tokenizer, bank)
        cases = [(ids, span, docs) for ids, span in prompts] + [(*prompts[0], None)]
        for (ids, span, memory), output in zip(cases, outputs, strict=True):
            expected = reference_answer(ref, ids, span, memory, top_k=4, rope_offset_k=4,
                                        template_len=span[0], max_tokens=MAX_TOKENS)
            check_against_reference(output, expected, ref.router_layers)
        assert_staging_released(llm)


def worker_attention(worker, mode: str | None = None) -> int:
    """In the worker: optionally force the attention path ("torch" / "fused"); return how
    many router-layer calls the fused path has served so far."""
    import os

    from vllm_msa.attention.runtime import current_runtime

    if mode is not None:
        os.environ["VLLM_MSA_ATTENTION"] = mode
    return current_runtime().fused.calls


def test_bf16_fused_attention_matches_torch_path(checkpoints, tmp_path_factory):
    """bf16 on flash-attention, vLLM's default execution: memory requests take the fused path
    (flash-attention with LSE + the Triton memory kernel); the same requests through the
    plain-torch path, in the same engine, give the same tokens and logprobs.

    Tolerance, derived in the same run: both paths read identical bf16 inputs (cache, staged
    bank, queries) and differ only in where they round (the fused path rounds the local
    output and the softmax weights to bf16 once per router layer; the torch path keeps fp32
    until the output). That is less rounding than one bf16 forward pass does in total, so the
    plain request's own bf16 error against the float64 reference (same engine, same tokens)
    bounds it. Tokens must agree up to a position whose top-2 logprobs are closer than that.
    """
    ckpt = checkpoints()
    bank = build_banks(ckpt, tmp_path_factory.mktemp("bf16-banks"), dtype="bfloat16")["docs"]
    ref = ReferenceMSA(ckpt)
    with running_llm(model=str(ckpt), dtype="bfloat16", enable_prefix_caching=False,
                     additional_config={"msa": {"banks": {"docs": str(bank.path)}}}) as llm:
        tokenizer = llm.get_tokenizer()
        prompts = [expected_prompt(tokenizer, q) for q in QUESTIONS]
        memory = [({"prompt_token_ids": ids}, sampling(msa_bank="docs"))
                  for ids, _ in prompts]
        plain = ({"prompt_token_ids": prompts[0][0]}, sampling())

        def generate(requests):
            return llm.generate([r[0] for r in requests], [r[1] for r in requests],
                                use_tqdm=False)

        before = llm.collective_rpc(worker_attention)[0]
        fused = generate([*memory, plain])
        assert llm.collective_rpc(worker_attention)[0] > before, "fused path did not run"
        llm.collective_rpc(worker_attention, args=("torch",))
        try:
            calls = llm.collective_rpc(worker_attention)[0]
            torch_path = generate(memory)
            assert llm.collective_rpc(worker_attention)[0] == calls
        finally:
            llm.collective_rpc(worker_attention, args=("fused",))

        # This engine's bf16 error: the plain request vs float64 on its own tokens.
        plain_out = fused[-1].outputs[0]
        expected = reference_answer(ref, prompts[0][0], prompts[0][1], None, top_k=4,
                                    rope_offset_k=4, template_len=prompts[0][1][0],
                                    max_tokens=len(plain_out.token_ids),
                                    forced=list(plain_out.token_ids))
        tol = max(abs(lp.logprob - expected.logprobs[step][token_id].item())
                  for step, top in enumerate(plain_out.logprobs) for token_id, lp in top.items())
        assert 0 < tol < 0.5, tol  # a real bf16 engine: some error, not garbage

        compared = 0
        for a, b in zip(fused[:-1], torch_path, strict=True):
            for step, (ta, tb) in enumerate(zip(a.outputs[0].token_ids, b.outputs[0].token_ids,
                                                strict=True)):
                top_a, top_b = a.outputs[0].logprobs[step], b.outputs[0].logprobs[step]
                for token_id in top_a.keys() & top_b.keys():
                    assert abs(top_a[token_id].logprob - top_b[token_id].logprob) <= tol, \
                        (step, token_id, tol)
                    compared += 1
                if ta != tb:  # allowed only at a near-tie, and the sequences part there
                    best = sorted((lp.logprob for lp in top_a.values()), reverse=True)
                    assert best[0] - best[1] <= 2 * tol, (step, best[:2], tol)
                    break
        assert compared >= len(memory) * NUM_LOGPROBS
