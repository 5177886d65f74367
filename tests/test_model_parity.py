"""MSAForCausalLM in vLLM, with no bank, computes exactly transformers' Qwen3 (same weights)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import running_llm
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

TOL = 1e-4
PROMPTS = [
    "<|im_start|>user\nWhere is the Eiffel Tower?<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox",
    "Alice met Bob in the garden at noon; they talked about the weather and the harvest.",
]
# Router layers 1 and 3, GQA; INFONCE_DECOUPLE writes the training-only `temperature` weight.
SPEC = {"layers": 4, "router_layers": "1,3", "seed": 3}


def hf_qwen3(ckpt):
    """transformers' own Qwen3 with the checkpoint's Qwen3 weights (router weights left out)."""
    import json

    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = json.loads((ckpt / "config.json").read_text())
    fields = {k: v for k, v in cfg.items()
              if k not in ("model_type", "architectures", "msa_config", "transformers_version")}
    model = Qwen3ForCausalLM(Qwen3Config(**fields)).float().eval()
    state = load_file(str(ckpt / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing
    assert all("router_" in k or k == "temperature" for k in unexpected), unexpected
    return model, state


def router_projection_outputs(model) -> dict[str, list]:
    """Runs inside the vLLM worker (apply_model): each router projection applied to a fixed
    input. (Weights are compared through outputs because vLLM's CPU linear layers repack
    their weights into oneDNN handles after loading.)"""
    device = next(model.parameters()).device
    x = torch.linspace(-1, 1, model.config.hidden_size * 2, device=device).view(2, -1)
    out = {}
    for name, module in model.named_modules():
        if name.endswith(("router_q_proj", "router_k_proj")):
            with torch.no_grad():
                out[name] = module(x)[0].cpu().tolist()
    return out


@pytest.fixture(scope="module")
def vllm_run(checkpoints):
    from vllm import SamplingParams

    ckpt = checkpoints(**SPEC)
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # for apply_model below
    with running_llm(model=str(ckpt), enforce_eager=True) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=0, prompt_logprobs=0,
                                ignore_eos=True)
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
        router_outputs = llm.apply_model(router_projection_outputs)[0]
    return ckpt, outputs, router_outputs


def test_greedy_tokens_and_logprobs_match_transformers(vllm_run):
    ckpt, outputs, _ = vllm_run
    model, _ = hf_qwen3(ckpt)
    worst = 0.0
    for out in outputs:
        prompt_ids, gen_ids = list(out.prompt_token_ids), list(out.outputs[0].token_ids)
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + gen_ids])).logits[0].double()
        logprobs = logits.log_softmax(-1)
        # Prompt logprobs: token i given tokens < i.
        for i in range(1, len(prompt_ids)):
            got = out.prompt_logprobs[i][prompt_ids[i]].logprob
            worst = max(worst, abs(got - logprobs[i - 1, prompt_ids[i]].item()))
        # Generated tokens: greedy choice and its logprob.
        for j, tok in enumerate(gen_ids):
            row = logprobs[len(prompt_ids) + j - 1]
            assert tok == int(row.argmax()), f"step {j}: vLLM chose {tok}, HF {int(row.argmax())}"
            got = out.outputs[0].logprobs[j][tok].logprob
            worst = max(worst, abs(got - row[tok].item()))
    assert worst <= TOL, f"max logprob difference {worst}"


def test_router_projections_are_loaded_from_the_checkpoint(vllm_run):
    ckpt, _, router_outputs = vllm_run
    state = load_file(str(ckpt / "model.safetensors"))
    weights = {k.removesuffix(".0.weight"): v for k, v in state.items() if "router_" in k}
    assert len(weights) == 4  # q and k projections of router layers 1 and 3
    assert set(router_outputs) == set(weights)
    x = torch.linspace(-1, 1, weights[next(iter(weights))].shape[1] * 2).view(2, -1)
    for name, weight in weights.items():
        got = torch.tensor(router_outputs[name])
        assert torch.allclose(got, x @ weight.T, atol=1e-5), name
