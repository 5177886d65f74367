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


@pytest.fixture(scope="module")
def bf16_bank(checkpoints, tmp_path_factory):
    return build_banks(checkpoints(), tmp_path_factory.mktemp("bf16-banks"),
                       dtype="bfloat16")["docs"]


def bf16_requests(tokenizer):
    prompts = [expected_prompt(tokenizer, q) for q in QUESTIONS]
    memory = [({"prompt_token_ids": ids}, sampling(msa_bank="docs")) for ids, _ in prompts]
    plain = ({"prompt_token_ids": prompts[0][0]}, sampling())
    return prompts, memory, plain


def generate(llm, requests):
    return llm.generate([r[0] for r in requests], [r[1] for r in requests], use_tqdm=False)


def bf16_error(ref, prompt, output) -> float:
    """This engine's own bf16 error: a plain request's logprobs vs float64 on its tokens."""
    ids, span = prompt
    out = output.outputs[0]
    expected = reference_answer(ref, ids, span, None, top_k=4, rope_offset_k=4,
                                template_len=span[0], max_tokens=len(out.token_ids),
                                forced=list(out.token_ids))
    tol = max(abs(lp.logprob - expected.logprobs[step][token_id].item())
              for step, top in enumerate(out.logprobs) for token_id, lp in top.items())
    assert 0 < tol < 0.5, tol  # a real bf16 engine: some error, not garbage
    return tol


def assert_same_outputs(first, second, tol: float) -> None:
    """Same tokens and logprobs within `tol`; tokens may part only at a near-tie (top-2
    logprobs within 2 tol), after which the sequences are not compared."""
    compared = 0
    for a, b in zip(first, second, strict=True):
        for step, (ta, tb) in enumerate(zip(a.outputs[0].token_ids, b.outputs[0].token_ids,
                                            strict=True)):
            top_a, top_b = a.outputs[0].logprobs[step], b.outputs[0].logprobs[step]
            for token_id in top_a.keys() & top_b.keys():
                assert abs(top_a[token_id].logprob - top_b[token_id].logprob) <= tol, \
                    (step, token_id, tol)
                compared += 1
            if ta != tb:
                best = sorted((lp.logprob for lp in top_a.values()), reverse=True)
                assert best[0] - best[1] <= 2 * tol, (step, best[:2], tol)
                break
    assert compared >= len(first) * NUM_LOGPROBS


def test_bf16_fused_attention_matches_torch_path(checkpoints, bf16_bank):
    """bf16 on flash-attention (piecewise graphs, so every step runs the op's Python):
    memory requests take the fused path (flash-attention with LSE + the Triton memory
    kernel); the same requests through the plain-torch path, in the same engine, give the
    same tokens and logprobs.

    Tolerance, derived in the same run: both paths read identical bf16 inputs (cache, staged
    bank, queries) and differ only in where they round (the fused path rounds the local
    output and the softmax weights to bf16 once per router layer; the torch path keeps fp32
    until the output). That is less rounding than one bf16 forward pass does in total, so the
    plain request's own bf16 error against the float64 reference (same engine, same tokens)
    bounds it. Tokens must agree up to a position whose top-2 logprobs are closer than that.
    """
    ckpt = checkpoints()
    ref = ReferenceMSA(ckpt)
    with running_llm(model=str(ckpt), dtype="bfloat16", enable_prefix_caching=False,
                     additional_config={"msa": {"banks": {"docs": str(bf16_bank.path)},
                                                "decode_graphs": "piecewise"}}) as llm:
        prompts, memory, plain = bf16_requests(llm.get_tokenizer())
        before = llm.collective_rpc(worker_attention)[0]
        fused = generate(llm, [*memory, plain])
        assert llm.collective_rpc(worker_attention)[0] > before, "fused path did not run"
        llm.collective_rpc(worker_attention, args=("torch",))
        try:
            calls = llm.collective_rpc(worker_attention)[0]
            torch_path = generate(llm, memory)
            assert llm.collective_rpc(worker_attention)[0] == calls
        finally:
            llm.collective_rpc(worker_attention, args=("fused",))
        assert_same_outputs(fused[:-1], torch_path, bf16_error(ref, prompts[0], fused[-1]))


def worker_graphs(worker, mode: str | None = None) -> tuple[int, int, int] | None:
    """In the worker: optionally force decode graphs ("piecewise" / "auto"); return (router
    layers captured in full graphs, steps replayed as full graphs with memory buffers,
    captured router layers whose local pass ran once instead of the backend's too)."""
    import os

    from vllm_msa.attention.runtime import current_runtime

    if mode is not None:
        os.environ["VLLM_MSA_DECODE_GRAPHS"] = mode
    graphs = current_runtime().graphs
    return None if graphs is None else (graphs.captured, graphs.replays, graphs.single_local)


def worker_compiles(worker) -> tuple[list[str], list[str]]:
    """In the worker: (Triton compiles of vllm_msa's kernels since the first call, the
    runtime's start-up warm-up). The first call installs the recorder, chained to the hook
    vLLM's JIT monitor set after its own warm-up."""
    from triton import knobs

    from vllm_msa.attention.runtime import current_runtime

    hook = knobs.runtime.jit_post_compile_hook
    if not hasattr(hook, "msa_compiles"):
        previous, compiles = hook, []

        def hook(**kwargs):
            fn = kwargs.get("fn")
            source = getattr(fn, "fn", fn)
            if getattr(source, "__module__", "").startswith("vllm_msa"):
                compiles.append(f"{source.__module__}.{source.__name__}")
            return previous(**kwargs) if previous is not None else None

        hook.msa_compiles = compiles
        knobs.runtime.jit_post_compile_hook = hook
    return list(hook.msa_compiles), list(current_runtime().warmed_up)


def test_full_decode_graphs_match_piecewise(checkpoints, bf16_bank):
    """vLLM's default FULL_AND_PIECEWISE graphs with memory: decode steps of memory requests
    (batched with a plain one) replay full CUDA graphs whose memory attention reads the
    per-step buffers; the same requests with decode forced onto piecewise graphs (the op's
    Python every step) give the same tokens and logprobs, within this engine's own bf16
    error (as above: the two paths differ only in flash-attention's split schedule).

    And no kernel of ours compiles while serving: the engine's start-up warm-up
    (vllm_msa/attention/warmup.py) compiled every variant these steps use — prefill of one
    and of three memory requests, decode in full graphs and on piecewise graphs."""
    ckpt = checkpoints()
    ref = ReferenceMSA(ckpt)
    banks = {"docs": str(bf16_bank.path),
             "docs-int8": {"path": str(bf16_bank.path), "index_dtype": "int8"}}
    with running_llm(model=str(ckpt), dtype="bfloat16", enable_prefix_caching=False,
                     additional_config={"msa": {"banks": banks}}) as llm:
        compiles, warmed = llm.collective_rpc(worker_compiles)[0]
        assert warmed, "the runtime did not warm its kernels up at start"
        prompts, memory, plain = bf16_requests(llm.get_tokenizer())
        generate(llm, memory[:1])  # a step routing one request
        captured, replays, single_local = llm.collective_rpc(worker_graphs)[0]
        assert captured > 0, "no full graph captured memory attention"
        assert single_local == captured, "a full graph ran the backend's attention as well"
        graphs = generate(llm, [*memory, plain])
        assert llm.collective_rpc(worker_graphs)[0][1] > replays, "no full-graph decode step"
        llm.collective_rpc(worker_graphs, args=("piecewise",))
        try:
            replays = llm.collective_rpc(worker_graphs)[0][1]
            piecewise = generate(llm, [*memory, plain])
            assert llm.collective_rpc(worker_graphs)[0][1] == replays
        finally:
            llm.collective_rpc(worker_graphs, args=("auto",))
        tol = bf16_error(ref, prompts[0], graphs[-1])
        assert_same_outputs(graphs, piecewise, tol)
        # The same bank from an 8-bit routing index (the bounds kernel, then the exact
        # kernels over the re-scored documents): the same selections, best first, and
        # outputs, in full graphs too.
        small = [(prompt, sampling(msa_bank="docs-int8", msa_return_selection=True))
                 for prompt, _ in memory]
        full = [(prompt, sampling(msa_bank="docs", msa_return_selection=True))
                for prompt, _ in memory]
        got, want = generate(llm, [*small, plain]), generate(llm, [*full, plain])
        for a, b in zip(got[:-1], want[:-1], strict=True):
            assert a.kv_transfer_params["msa_selection"]["layers"] == \
                b.kv_transfer_params["msa_selection"]["layers"]
        assert_same_outputs(got, want, tol)
        assert_staging_released(llm)
        compiles, _ = llm.collective_rpc(worker_compiles)[0]
        assert not compiles, f"compiled while serving: {compiles}"


GPU_LAYOUTS = {"mha": {"kv_heads": 4, "pooling": 5, "seed": 3},
               "mqa": {"kv_heads": 1, "pooling": 2, "seed": 5}}


@pytest.mark.parametrize("layout", list(GPU_LAYOUTS))
def test_layout_fused_path_and_full_graphs(checkpoints, tmp_path_factory, layout):
    """Multi-head and multi-query attention on the GPU path (grouped-query is the default
    checkpoint above): bf16 with vLLM's default graphs, so memory requests take the fused
    path (flash-attention with LSE + the Triton memory kernel) and decode replays full CUDA
    graphs; the same requests forced onto the plain-torch path give the same tokens and
    logprobs within this engine's own bf16 error (see the bf16 test above)."""
    spec = GPU_LAYOUTS[layout]
    ckpt = checkpoints(**spec)
    ref = ReferenceMSA(ckpt)
    bank = build_banks(ckpt, tmp_path_factory.mktemp(f"{layout}-bf16"), dtype="bfloat16")["docs"]
    with running_llm(model=str(ckpt), dtype="bfloat16", enable_prefix_caching=False,
                     additional_config={"msa": {"banks": {"docs": str(bank.path)}}}) as llm:
        prompts, memory, plain = bf16_requests(llm.get_tokenizer())
        before = llm.collective_rpc(worker_attention)[0]
        replays = llm.collective_rpc(worker_graphs)[0][1]
        fused = generate(llm, [*memory, plain])
        assert llm.collective_rpc(worker_attention)[0] > before, "fused path did not run"
        assert llm.collective_rpc(worker_graphs)[0][1] > replays, "no full-graph decode step"
        llm.collective_rpc(worker_attention, args=("torch",))
        llm.collective_rpc(worker_graphs, args=("piecewise",))
        try:
            torch_path = generate(llm, memory)
        finally:
            llm.collective_rpc(worker_attention, args=("fused",))
            llm.collective_rpc(worker_graphs, args=("auto",))
        assert_same_outputs(fused[:-1], torch_path, bf16_error(ref, prompts[0], fused[-1]))
        assert_staging_released(llm)
