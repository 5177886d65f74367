"""Serving on a GPU with vLLM's default execution: torch.compile and piecewise CUDA graphs
(memory attention is a splitting op and runs eagerly), the GPU attention backend's paged cache
read directly. Same comparison as tests/test_serving.py (fp32, 1e-3)."""

from __future__ import annotations

import pytest
from conftest import running_llm
from msa_reference import reference_answer
from reference import ReferenceMSA
from test_serving import (
    MAX_TOKENS,
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
