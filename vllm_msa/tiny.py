"""Tiny random MSA checkpoints for tests, examples and the README.

Real MSA-4B weights cannot be downloaded everywhere, so `make_tiny_checkpoint` writes a complete
MSA checkpoint offline: `config.json` (model_type "msa" with an `msa_config`), safetensors
weights in the reference checkpoint's naming, and a real byte-level BPE tokenizer with Qwen3's
chat special tokens and chat template. Everything is deterministic in `seed`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import MSAConfig, MSAParams
from .tiny_spec import TinySpec

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<End-of-Retrieve>",
)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# A small fixed corpus so that the BPE merges (and so the vocabulary) never depend on anything
# outside this file. Chat-template words come first so that e.g. "user" is one token, as in Qwen3.
_CORPUS = [
    "user\n", "assistant\n", "system\n",
    "\nPlease answer the question based on the above historical document information\n\n",
    "\nPlease return all documents related to the question\n",
    "The answer to the question is: ", "The user's question is: ",
    "The quick brown fox jumps over the lazy dog. " * 2,
    "Memory sparse attention routes each question over a bank of documents. ",
    "Paris is the capital of France. Berlin is the capital of Germany. ",
    "Alice met Bob in the garden at noon; they talked about the weather and the harvest. ",
    "Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42 and 2026 appear in documents. ",
    "[0]. [1]. [2]. [3]. [4]. [5]. [6]. [7]. [8]. [9]. ",
]




def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on `_CORPUS`, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def tiny_config(spec: TinySpec, vocab_size: int, eos_id: int, pad_id: int) -> MSAConfig:
    msa_config = {
        "router_layer_idx": spec.router_layers,
        "top_k_docs": spec.top_k,
        "doc_top_k": spec.top_k,
        "pooling_kernel_size": spec.pooling,
        "decouple_router": spec.decouple_router,
        "head_reduce_method": spec.head_reduce,
        "query_reduce_method": spec.query_reduce,
        "chunk_reduce_method": spec.chunk_reduce,
        "aux_loss_method": spec.aux_loss_method,
        # Training-only keys of the reference config, present so that loading ignores them.
        "aux_loss": True,
        "infonce_loss_temp": 0.05,
        "rewrite_position": True,
        "decouple_pooling_mode": "mean",
    }
    config = MSAConfig(
        architectures=["MSAForCausalLM"],
        vocab_size=vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        tie_word_embeddings=False,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        msa_config=msa_config,
    )
    config.dtype = spec.dtype
    MSAParams.from_hf_config(config)  # validate before writing anything
    return config


def tiny_weights(spec: TinySpec, config: MSAConfig) -> dict[str, torch.Tensor]:
    """Random weights in the reference checkpoint's names (HF Qwen3 + MSA router layers)."""
    gen = torch.Generator().manual_seed(spec.seed)
    dtype = getattr(torch, spec.dtype)

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * spec.weight_std).to(dtype)

    def norm_weight(size: int) -> torch.Tensor:  # not all ones, so a skipped norm shows
        return (1.0 + 0.2 * torch.randn(size, generator=gen)).to(dtype)

    h, hd = spec.hidden, spec.head_dim
    q_out, kv_out = spec.heads * hd, spec.kv_heads * hd
    msa = MSAParams.from_hf_config(config)
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(config.vocab_size, h)}
    for i in range(spec.layers):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = norm_weight(h)
        w[f"{p}.post_attention_layernorm.weight"] = norm_weight(h)
        w[f"{p}.self_attn.q_proj.weight"] = normal(q_out, h)
        w[f"{p}.self_attn.k_proj.weight"] = normal(kv_out, h)
        w[f"{p}.self_attn.v_proj.weight"] = normal(kv_out, h)
        w[f"{p}.self_attn.o_proj.weight"] = normal(h, q_out)
        w[f"{p}.self_attn.q_norm.weight"] = norm_weight(hd)
        w[f"{p}.self_attn.k_norm.weight"] = norm_weight(hd)
        w[f"{p}.mlp.gate_proj.weight"] = normal(spec.intermediate, h)
        w[f"{p}.mlp.up_proj.weight"] = normal(spec.intermediate, h)
        w[f"{p}.mlp.down_proj.weight"] = normal(h, spec.intermediate)
        if msa.decouple_router and msa.is_router_layer(i):
            w[f"{p}.self_attn.router_q_proj.0.weight"] = normal(q_out, h)
            w[f"{p}.self_attn.router_k_proj.0.weight"] = normal(kv_out, h)
    w["model.norm.weight"] = norm_weight(h)
    w["lm_head.weight"] = normal(config.vocab_size, h)
    # Training-only parameters of the reference model, which loading must ignore.
    if "INFONCE" in spec.aux_loss_method:
        w["temperature"] = torch.tensor(0.05, dtype=dtype)
    elif spec.aux_loss_method == "BCE":
        w["b"] = torch.tensor(-20.0, dtype=dtype)
    return w


def make_tiny_checkpoint(out_dir: str | Path, spec: TinySpec | None = None) -> Path:
    """Write a random MSA checkpoint to `out_dir` (created if needed) and return its path."""
    spec = spec or TinySpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_size)
    vocab_size = len(tokenizer)
    config = tiny_config(
        spec,
        vocab_size,
        eos_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    config.save_pretrained(out)
    save_file(tiny_weights(spec, config), str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": config.eos_token_id, "do_sample": False}, indent=2) + "\n"
    )
    return out
