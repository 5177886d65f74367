"""Tensor parallelism: KV heads split across ranks (2 KV heads, TP 2) and replicated (1 KV
head, TP 2). Stage 1 gives the same bank as the reference, and serving over it (routing query
gathered across ranks, each rank attending to its own heads' memory) gives the reference's
selections and logprobs."""

from __future__ import annotations

import os

import pytest
from bank_checks import assert_bank_matches_reference, read_docs
from conftest import ENGINE_DEFAULTS, SAMPLE_DOCS, has_gpu, running_llm, shutdown_llm
from msa_reference import reference_answer
from reference import ReferenceMSA
from test_serving import (
    MAX_TOKENS,
    bank_docs,
    check_against_reference,
    expected_prompt,
    router_query_fold,
    sampling,
)

from vllm_msa.bank.build import build_bank, encoder_llm


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(has_gpu() and _gpus() < 2, reason="needs 2 GPUs (or a CPU-only machine)"),
]


@pytest.fixture
def one_core_per_cpu_worker():
    """vLLM's CPU backend binds each TP worker's threads to a NUMA node unless told which cores
    to use; a single-node machine needs the cores split by hand."""
    old = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    cores = sorted(os.sched_getaffinity(0))
    half = max(1, len(cores) // 2)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = (
        ",".join(map(str, cores[:half])) + "|" + ",".join(map(str, cores[half:] or cores[:1]))
    )
    yield
    if old is None:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    else:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["kv-split", "kv-replicated"])
def test_tp2_bank_matches_reference(kv_heads, checkpoints, tmp_path, one_core_per_cpu_worker):
    ckpt = checkpoints(kv_heads=kv_heads, seed=4)
    llm = encoder_llm(ckpt, **ENGINE_DEFAULTS, tensor_parallel_size=2)
    try:
        bank = build_bank(ckpt, SAMPLE_DOCS, tmp_path / "bank", llm=llm, progress=False)
        tokenizer = llm.get_tokenizer()
    finally:
        shutdown_llm(llm)
    assert_bank_matches_reference(bank, ckpt, read_docs(SAMPLE_DOCS), tokenizer, 1e-4)

    with running_llm(model=str(ckpt), enforce_eager=True, tensor_parallel_size=2,
                     additional_config={"msa": {"banks": {"docs": str(bank.path)}}}) as llm:
        ids, span = expected_prompt(tokenizer, "Which river flooded the old mill?")
        (output,) = llm.generate([{"prompt_token_ids": ids}],
                                 [sampling(msa_bank="docs", msa_return_selection=True)],
                                 use_tqdm=False)
        # Each rank folds its own KV heads' groups; replicated KV heads cannot be folded.
        assert llm.collective_rpc(router_query_fold) == [kv_heads == 2] * 2
    ref = ReferenceMSA(ckpt)
    expected = reference_answer(ref, ids, span, bank_docs(tokenizer, bank), top_k=4,
                                rope_offset_k=4, template_len=span[0], max_tokens=MAX_TOKENS)
    check_against_reference(output, expected, ref.router_layers)
