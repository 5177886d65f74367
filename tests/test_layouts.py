"""Every attention layout serves, through every attention path, against the float64 reference.

Layouts: multi-head (as many KV heads as query heads), grouped-query and multi-query
attention, with decoupled and non-decoupled routers and pooling sizes that do and do not
divide the documents. Each layout's engine runs through the paths a request can take:

- the pool: the request's selected documents staged in the device staging pool;
- staging overflow: the pool is shrunk (in the worker, before any request) so that most
  requests of a batch do not fit and are staged privately;
- preemption: a KV cache of 12 blocks cannot hold four 130-token requests, so some are
  preempted, recomputed and re-staged from their kept selection;
- on a GPU, the fused path (flash-attention + the Triton memory kernel) for steps whose
  requests are all in the pool, the plain-torch loop for the others; on CPU the torch loop.

Every head, query and chunk reduce runs at least once per layout. Reduce methods only change
routing, so one engine serves several: between batches, with no request in flight, the
worker's routing parameters are switched to the next combination (what the checkpoint's
`msa_config` would have set; tests/test_serving.py starts an engine per combination from the
checkpoint itself).
"""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import build_banks, running_llm
from msa_reference import reference_answer
from reference import ReferenceMSA
from test_serving import (
    assert_staging_released,
    bank_docs,
    check_against_reference,
    expected_prompt,
)

pytestmark = pytest.mark.slow
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

QUESTIONS = ["Which river flooded the old mill?", "Who repaired the lighthouse lamp?",
             "What did the baker sell?", "Where was the treaty signed?"]
LONG_TOKENS = 80  # four prompts of ~50 tokens + 80 > the 12 x 32-token KV cache: preemption
SHORT_TOKENS = 6
NO_DECOUPLE = {"decouple_router": False, "aux_loss_method": "INFONCE"}

LAYOUTS = {
    "mha": {"spec": {"kv_heads": 4, "pooling": 5, "seed": 3},
            "combos": [("mean", "max", "max"), ("max", "last", "mean"),
                       ("mean", "mean", "max")]},
    "gqa": {"spec": {}, "combos": [("max", "last", "mean")]},
    # Served with verify off, over a bank whose (unserved) template K/V has a flipped byte.
    "mqa-no-decouple": {"spec": {"kv_heads": 1, **NO_DECOUPLE, "pooling": 2, "seed": 5},
                        "combos": [("mean", "max", "max"), ("max", "last", "mean"),
                                   ("max", "mean", "mean"), ("mean", "last", "max")]},
}


def set_reduces(worker, head: str, query: str, chunk: str) -> bool:
    """In the worker, with no request in flight: route with these reduce methods from now on
    (the folded router query stays only where it is still exact); returns whether it folds."""
    import dataclasses

    from vllm_msa.attention.router import folds_router_query, routing_params
    from vllm_msa.attention.runtime import current_runtime

    runtime = current_runtime()
    assert not runtime.requests
    msa = dataclasses.replace(runtime.msa, head_reduce=head, query_reduce=query,
                              chunk_reduce=chunk)
    runtime.routing = routing_params(msa, runtime.serving.score)
    runtime.fold_router_query = runtime.fold_router_query and folds_router_query(
        runtime.routing, runtime.num_heads, runtime.num_kv_heads, runtime.tp_size)
    return runtime.fold_router_query


def shrink_pool(worker, slots: int) -> int:
    """In the worker, before any request: a staging pool of `slots` slots."""
    from vllm_msa.attention.runtime import current_runtime
    from vllm_msa.attention.staging import StagingPool

    runtime = current_runtime()
    assert not runtime.requests and runtime.graphs is None
    old = runtime.pool.keys
    runtime.pool = StagingPool(slots, old.shape[1], old.shape[2], old.dtype, old.device)
    return runtime.pool.num_slots


def path_counts(worker) -> dict[str, int]:
    from vllm_msa.attention.runtime import current_runtime

    runtime = current_runtime()
    return {"overflows": runtime.pool.overflows, "preempted": runtime.num_preempted,
            "fused": runtime.fused.calls}


def tamper_template(bank_path, out) -> None:
    """A copy of the bank whose template file has one flipped bit in its last tensor (a
    template-head K/V, which serving never reads: routing and attention are unchanged)."""
    shutil.copytree(bank_path, out)
    template = out / "template.safetensors"
    data = bytearray(template.read_bytes())
    data[-3] ^= 0x10
    template.write_bytes(bytes(data))


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, checkpoints, default_banks, tmp_path_factory):
    name = request.param
    spec = LAYOUTS[name]["spec"]
    ckpt = checkpoints(**spec)
    if name == "gqa":
        bank = default_banks["docs"]
    else:
        bank = build_banks(ckpt, tmp_path_factory.mktemp(name))["docs"]
    msa = {"banks": {"docs": str(bank.path)}, "default_bank": "docs"}
    served_path = bank.path
    if name == "mqa-no-decouple":
        served_path = tmp_path_factory.mktemp("tampered") / "docs"
        tamper_template(bank.path, served_path)
        msa = {**msa, "banks": {"docs": str(served_path)}, "verify": False}
    # 12 blocks of 32 tokens, four sequences at most and 64 tokens a step (lifecycle tests).
    with running_llm(model=str(ckpt), enforce_eager=True, max_model_len=256, block_size=32,
                     num_gpu_blocks_override=12, max_num_seqs=4, max_num_batched_tokens=64,
                     additional_config={"msa": msa}) as llm:
        yield {"name": name, "spec": spec, "ckpt": ckpt, "bank": bank, "llm": llm,
               "served_path": served_path}


def params(max_tokens: int, **extra):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=5, ignore_eos=True,
                          extra_args=extra or None)


def worst_case_chunks(bank, top_k: int) -> int:
    return sum(sorted(bank.doc_num_chunks.tolist(), reverse=True)[:top_k])


def test_layout_serves_every_path(layout):
    llm, bank = layout["llm"], layout["bank"]
    ref = ReferenceMSA(layout["ckpt"])
    pooling = ref.pooling
    remainders = {n % pooling for n in bank.doc_num_tokens.tolist()}
    assert 0 in remainders and len(remainders) > 1, "want documents P divides and does not"
    assert ref.kv_heads == {"mha": 4, "gqa": 2}.get(
        layout["name"], 1) and ref.heads == 4
    tokenizer = llm.get_tokenizer()
    docs = bank_docs(tokenizer, bank)
    prompts = [expected_prompt(tokenizer, q) for q in QUESTIONS]
    # Room for a bit more than two requests' worst case in one router layer: the rest of
    # each batch stages privately.
    slots = 5 * worst_case_chunks(bank, 4) // 2
    assert llm.collective_rpc(shrink_pool, args=(slots,)) == [slots]
    for i, (head, query, chunk) in enumerate(LAYOUTS[layout["name"]]["combos"]):
        llm.collective_rpc(set_reduces, args=(head, query, chunk))
        max_tokens = LONG_TOKENS if i == 0 else SHORT_TOKENS
        requests = [({"prompt_token_ids": ids}, params(max_tokens, msa_return_selection=True))
                    for ids, _ in prompts]
        if i == 0:  # opting out of the default bank: plain Qwen3 beside memory requests
            requests.append(({"prompt_token_ids": prompts[0][0]},
                             params(max_tokens, msa_bank="")))
        before = llm.collective_rpc(path_counts)[0]
        outputs = llm.generate([r[0] for r in requests], [r[1] for r in requests],
                               use_tqdm=False)
        after = llm.collective_rpc(path_counts)[0]
        for j, output in enumerate(outputs):
            ids, span = prompts[j % len(prompts)]
            memory = docs if j < len(prompts) else None
            expected = reference_answer(
                ref, ids, span, memory, top_k=4, rope_offset_k=4, template_len=span[0],
                max_tokens=max_tokens, head_reduce=head, query_reduce=query,
                chunk_reduce=chunk, score="auto")
            check_against_reference(output, expected, ref.router_layers)
            if memory is None:
                assert output.kv_transfer_params is None
        stagings = len(prompts) * len(ref.router_layers)
        overflows = after["overflows"] - before["overflows"]
        assert 0 < overflows < stagings + (after["preempted"] - before["preempted"]) * len(
            ref.router_layers), after
        if i == 0:
            assert after["preempted"] > before["preempted"], "no request was preempted"
        assert_staging_released(llm)
