"""Attention pieces in plain torch: paged local attention and memory attention, each with its
log-sum-exp, for the exact merge of msa-spec §3 (vLLM's `merge_attn_states` does the merge).

This is the portable path (CPU, and the reference for GPU kernels). Every function works on
one request at a time and computes in float32.
"""

from __future__ import annotations

import torch


def paged_key_value(kv_cache: torch.Tensor, backend_name: str, head_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value caches as [num_blocks, block_size, num_kv_heads, head_size] views.

    vLLM 0.32/0.33 give every backend a logical [blocks, kv_heads, block_size, 2*head_size]
    tensor; GPU backends keep each token's K|V side by side, the CPU backend stores a block's
    keys then its values per head (see `CPUAttentionBackendImpl.forward`).
    """
    if backend_name == "CPU_ATTN":
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        halves = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, head_size)
        key, value = halves.chunk(2, dim=2)
        return key.transpose(1, 2), value.transpose(1, 2)
    key, value = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return key, value


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
    out = torch.einsum("kgqn,nkd->qkgd", weights, v).reshape(query.shape[0], num_heads, -1)
    return out, lse.reshape(num_heads, query.shape[0])

