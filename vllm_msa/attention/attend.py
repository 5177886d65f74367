"""Attention pieces in plain torch: paged local attention and memory attention, each with its
log-sum-exp, for the exact merge of msa-spec §3 (vLLM's `merge_attn_states` does the merge).

This is the portable path (CPU, and the reference for GPU kernels). Every function works on
one request at a time and computes in float32.
"""

from __future__ import annotations

import torch

# Backends whose paged cache we can read as plain K|V per token. vLLM 0.32/0.33 give every
# backend a logical [blocks, kv_heads, block_size, 2*head_size] tensor; these keep each token's
# K|V side by side. The CPU backend packs keys per ISA (the layout of its kernel), so requests
# with memory keep their own K/V copy there (`SideKV`).
READABLE_PAGED_BACKENDS = frozenset({"FLASH_ATTN", "TRITON_ATTN", "FLASHINFER"})


def paged_key_value(kv_cache: torch.Tensor, head_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value caches as [num_blocks, block_size, num_kv_heads, head_size] views."""
    key, value = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return key, value


class SideKV:
    """One request's K/V of one layer by position, for backends whose cache is opaque."""

    def __init__(self, like: torch.Tensor) -> None:
        self.keys = like.new_empty((0, *like.shape[1:]))
        self.values = self.keys

    def write(self, first_position: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        end = first_position + keys.shape[0]
        if end > self.keys.shape[0]:
            capacity = max(end, 2 * self.keys.shape[0])
            grown_k = self.keys.new_empty((capacity, *self.keys.shape[1:]))
            grown_v = self.values.new_empty((capacity, *self.values.shape[1:]))
            grown_k[: self.keys.shape[0]] = self.keys
            grown_v[: self.values.shape[0]] = self.values
            self.keys, self.values = grown_k, grown_v
        self.keys[first_position:end] = keys
        self.values[first_position:end] = values


def gather_paged(cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one request: [length, num_kv_heads, head_size]."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = cache[block_ids[:num_blocks].long()]
    return blocks.reshape(-1, *cache.shape[2:])[:length]


def attention_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    causal_offset: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention returning (out [q, H, D] fp32, lse [H, q] fp32).

    `query` [q, H, D]; `key`/`value` [n, KV, D] with H a multiple of KV (query head h reads
    KV head h // (H / KV)). With `causal_offset` c, query row i sees keys 0..c+i; with None it
    sees all keys. A row that sees no key gets out 0 and lse -inf (it then adds nothing to a
    merge).
    """
    num_heads, num_kv = query.shape[1], key.shape[1]
    group = num_heads // num_kv
    q = query.float().view(query.shape[0], num_kv, group, -1)
    k, v = key.float(), value.float()
    logits = torch.einsum("qkgd,nkd->kgqn", q, k) * scale  # [KV, G, q, n]
    if causal_offset is not None:
        rows = torch.arange(query.shape[0], device=query.device)[:, None] + causal_offset
        cols = torch.arange(key.shape[0], device=query.device)[None, :]
        logits = logits.masked_fill(cols > rows, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [KV, G, q]
    weights = torch.exp(logits - lse[..., None]).nan_to_num(0.0)
    # einsum may hand back a permuted view (with one query head per KV head, MHA); callers
    # view the result, so it is made contiguous here.
    out = torch.einsum("kgqn,nkd->qkgd", weights, v).reshape(query.shape[0], num_heads, -1)
    return out.contiguous(), lse.reshape(num_heads, query.shape[0]).contiguous()

