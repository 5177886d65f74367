"""The router layers' attention as one custom op, opaque to torch.compile.

Routing and staging are data-dependent (top-k, per-request host copies), so they cannot be
traced; the op runs them eagerly, the way vLLM runs `unified_attention_with_output`. Inside
a full decode graph's capture it records the buffer-driven path instead (decode_graphs.py).
"""

from __future__ import annotations

import torch
from vllm.config import CUDAGraphMode
from vllm.forward_context import get_forward_context
from vllm.utils.torch_utils import direct_register_custom_op

from ..patches.kv_cache_write import write_kv_cache
from .runtime import current_runtime

OP_NAME = "msa_router_attention"
OP_QUALNAME = f"vllm::{OP_NAME}"


def msa_router_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    h: torch.Tensor,
    output: torch.Tensor,
    layer_name: str,
) -> None:
    """Local attention through the layer's own backend (which also writes the KV cache),
    then, for requests with memory, local ⊕ memory attention in their rows."""
    context = get_forward_context()
    attn_layer = context.no_compile_layers[layer_name]
    runtime = current_runtime()
    metadata = context.attn_metadata
    if isinstance(metadata, list):
        metadata = metadata[0]
    if isinstance(metadata, dict):
        metadata = metadata.get(layer_name)
    if (runtime is not None and runtime.graphs is not None and metadata is not None
            and context.cudagraph_runtime_mode == CUDAGraphMode.FULL):
        # Capture / warm-up of a full decode graph (no Python at replay): the local pass
        # with its LSE is computed once, for every row, by the graph's own call.
        local_in_output = write_kv_cache(attn_layer, k, v)
        if not local_in_output:  # the layer's own forward writes the cache (and attends)
            output.copy_(attn_layer(q, k, v).view(output.shape))
        runtime.graphs.attend(runtime.layers[layer_name].layer_idx, q, output, attn_layer,
                              metadata, runtime.pool, runtime.head_dim,
                              local_in_output=local_in_output)
        return
    output.copy_(attn_layer(q, k, v).view(output.shape))
    if runtime is not None and runtime.encodes.rows:
        runtime.capture(layer_name, k, v, h)
    if runtime is None or not runtime.rows or metadata is None:
        return
    runtime.attend(layer_name, q, k, v, h, output, attn_layer, metadata)


def msa_router_attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    h: torch.Tensor,
    output: torch.Tensor,
    layer_name: str,
) -> None:
    return None


direct_register_custom_op(
    op_name=OP_NAME,
    op_func=msa_router_attention,
    mutates_args=["output"],
    fake_impl=msa_router_attention_fake,
)
