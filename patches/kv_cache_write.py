"""Write a layer's new K/V into its paged cache without running its attention.

What: `write_kv_cache` calls vLLM's `unified_kv_cache_update`
(vllm/model_executor/layers/attention/attention.py), the first half of `Attention.forward`
for backends whose forward does not include the cache write (FLASH_ATTN among them).
Why: inside a full decode graph the router layers compute their local attention themselves,
with its log-sum-exp, which the backend's forward does not return; running the backend's
attention too would compute it twice per router layer and step.
Versions: vLLM 0.32 and 0.33 (same function, same signature). Elsewhere, or for a layer
whose backend writes the cache in its forward or shares another layer's cache, it returns
False and the caller runs the layer's own forward.
"""

from __future__ import annotations

from typing import Any

import torch

from . import require_vllm


def write_kv_cache(attn_layer: Any, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Write `key`/`value` [tokens, kv_heads * head_dim] into `attn_layer`'s cache; False
    (nothing written) where this is not the supported way to do it."""
    if (attn_layer.attn_backend.forward_includes_kv_cache_update
            or attn_layer.kv_sharing_target_layer_name is not None):
        return False
    try:
        require_vllm("vllm_msa.patches.kv_cache_write")
        from vllm.model_executor.layers.attention.attention import unified_kv_cache_update
    except (RuntimeError, ImportError):
        return False
    unified_kv_cache_update(key.view(-1, attn_layer.num_kv_heads, attn_layer.head_size),
                            value.view(-1, attn_layer.num_kv_heads, attn_layer.head_size_v),
                            attn_layer.layer_name)
    return True
