"""An independent plain-torch implementation of MSA stage 1, written from msa-spec.md §1–2.

It reads the checkpoint's config.json and safetensors directly (no vLLM, no vllm_msa code, no
transformers model), runs a Qwen3 forward in float64 and pools per the spec. The tests compare
the plugin's output against it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file


class ReferenceMSA:
    def __init__(self, checkpoint: str | Path) -> None:
        path = Path(checkpoint)
        self.cfg = json.loads((path / "config.json").read_text())
        self.w = {k: v.double() for k, v in load_file(str(path / "model.safetensors")).items()}
        c = self.cfg
        self.num_layers = c["num_hidden_layers"]
        self.heads = c["num_attention_heads"]
        self.kv_heads = c["num_key_value_heads"]
        self.head_dim = c.get("head_dim") or c["hidden_size"] // self.heads
        self.eps = c["rms_norm_eps"]
        rope = c.get("rope_parameters") or {}
        self.theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
        m = c["msa_config"]
        idx = m.get("router_layer_idx", "all")
        self.router_layers = (list(range(self.num_layers)) if idx == "all"
                              else sorted(int(i) for i in str(idx).split(",")))
        self.pooling = m.get("pooling_kernel_size", 64)
        self.decouple = bool(m.get("decouple_router", False))
        self.infonce = m.get("aux_loss_method") == "INFONCE"

    # -- Qwen3 pieces ------------------------------------------------------------------------
    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        angles = positions.double()[:, None] * inv_freq[None]
        cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None]
        sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None]
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def run(self, token_ids: list[int]) -> dict:
        """Causal forward over one sequence at positions 0..n-1.

        Returns per layer K (after k_norm and RoPE), V and, for decoupled router layers, the
        routing key `router_k_proj(h)`; plus the final logits.
        """
        w, n, d = self.w, len(token_ids), self.head_dim
        pos = torch.arange(n)
        h = w["model.embed_tokens.weight"][torch.tensor(token_ids)]
        mask = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
        out = {"k": [], "v": [], "kr": {}}
        for layer in range(self.num_layers):
            p = f"model.layers.{layer}"
            x = self._rms(h, w[f"{p}.input_layernorm.weight"])
            q = (x @ w[f"{p}.self_attn.q_proj.weight"].T).view(n, self.heads, d)
            k = (x @ w[f"{p}.self_attn.k_proj.weight"].T).view(n, self.kv_heads, d)
            v = (x @ w[f"{p}.self_attn.v_proj.weight"].T).view(n, self.kv_heads, d)
            q = self._rope(self._rms(q, w[f"{p}.self_attn.q_norm.weight"]), pos)
            k = self._rope(self._rms(k, w[f"{p}.self_attn.k_norm.weight"]), pos)
            out["k"].append(k)
            out["v"].append(v)
            if self.decouple and layer in self.router_layers:
                kr = x @ w[f"{p}.self_attn.router_k_proj.0.weight"].T
                out["kr"][layer] = kr.view(n, self.kv_heads, d)
            group = self.heads // self.kv_heads
            kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            scores = torch.einsum("qhd,khd->hqk", q, kk) / math.sqrt(d) + mask
            attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv).reshape(n, -1)
            h = h + attn @ w[f"{p}.self_attn.o_proj.weight"].T
            x = self._rms(h, w[f"{p}.post_attention_layernorm.weight"])
            gate = torch.nn.functional.silu(x @ w[f"{p}.mlp.gate_proj.weight"].T)
            h = h + (gate * (x @ w[f"{p}.mlp.up_proj.weight"].T)) @ w[f"{p}.mlp.down_proj.weight"].T
        h = self._rms(h, w["model.norm.weight"])
        out["logits"] = h @ w["lm_head.weight"].T
        return out

    # -- MSA stage 1 -------------------------------------------------------------------------
    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        chunks = [x[i : i + self.pooling].mean(0) for i in range(0, x.shape[0], self.pooling)]
        return torch.stack(chunks)

    def encode_document(self, token_ids: list[int]) -> dict[int, dict[str, torch.Tensor]]:
        """Per router layer: pooled routing keys, keys and values, [chunks, kv_heads, hd]."""
        run = self.run(token_ids)
        result = {}
        for layer in self.router_layers:
            keys, values = self._pool(run["k"][layer]), self._pool(run["v"][layer])
            routing = self._pool(run["kr"][layer]) if self.decouple else keys
            if self.infonce:
                routing = routing / routing.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            result[layer] = {"routing_keys": routing, "keys": keys, "values": values}
        return result

    def template_kv(self, token_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        run = self.run(token_ids)
        return list(zip(run["k"], run["v"], strict=True))


def wrap_document(doc_id: int, text: str) -> str:
    """msa-spec §2: how a document is presented to the model in stage 1."""
    return "<|im_start|>" + f"[{doc_id}]. " + text + f"[{doc_id}]" + "<|im_end|>"


TEMPLATE_HEAD_TEXT = "<|im_start|>user\n"
