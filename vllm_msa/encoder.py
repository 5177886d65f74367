"""MSABankEncoder: MSA's stage 1 (encoding a memory bank) as a vLLM pooling model.

The same checkpoint, loaded under the architecture name `MSABankEncoder` with
`runner="pooling"`, runs each document as its own request, so vLLM gives it batching, paged
attention inside the document only and positions restarting at 0 (document-wise RoPE) for free
(msa-spec §2). The forward pass returns, per token, every layer's K (after k_norm and RoPE) and
V, plus each router layer's routing key `router_k_proj(h)`. The pooler turns that into what the
bank stores:

- `"document"` requests (the default): per chunk of `pooling_kernel_size` tokens, the mean of
  K, V and the routing key of every router layer (fp32 accumulation, model dtype out), as
  `[num_chunks, num_router_layers, 3, num_kv_heads, head_dim]` (K̄, V̄, K̄r);
- `"template"` requests: the raw per-token K/V of every layer, `[T, num_layers, 2, kv, hd]`.

The mode travels in `PoolingParams(extra_kwargs={"msa_encode": ...})`. The forward runs the
decoder layers eagerly (no torch.compile), which the bank builder requests with
`enforce_eager=True`: stage 1 is prefill-only, where CUDA graphs do not apply.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from dataclasses import dataclass

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import (
    get_pp_group,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_gather,
)
from vllm.model_executor.layers.pooler.tokwise import AllPool, TokenPooler, TokenPoolerHead
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix
from vllm.pooling_params import PoolingParams
from vllm.tasks import PoolingTask

from .config import MSAParams
from .model import MSADecoderLayer, MSAModel, attention_qkv, drop_training_only_weights

ENCODE_MODE_KEY = "msa_encode"
DOCUMENT_MODE = "document"
TEMPLATE_MODE = "template"


@dataclass(frozen=True)
class CaptureLayout:
    """Where each captured quantity sits in the encoder's per-token output row."""

    num_layers: int
    router_layers: tuple[int, ...]
    num_kv_heads: int
    head_dim: int
    has_routing_keys: bool

    @property
    def kv_width(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim

    def layer_kv(self, rows: torch.Tensor) -> torch.Tensor:
        """`[n, num_layers, 2, kv_heads, head_dim]`: K and V of every layer."""
        return rows[:, : self.kv_width].view(
            rows.shape[0], self.num_layers, 2, self.num_kv_heads, self.head_dim
        )

    def routing_keys(self, rows: torch.Tensor) -> torch.Tensor:
        """`[n, num_router_layers, kv_heads, head_dim]`: `router_k_proj(h)` per router layer."""
        return rows[:, self.kv_width :].view(
            rows.shape[0], len(self.router_layers), self.num_kv_heads, self.head_dim
        )


def chunk_mean(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Mean over consecutive chunks of `chunk_size` rows (the last may be shorter), in fp32."""
    n = x.shape[0]
    num_chunks = -(-n // chunk_size)
    chunk_of_row = torch.arange(n, device=x.device) // chunk_size
    sums = torch.zeros((num_chunks, *x.shape[1:]), dtype=torch.float32, device=x.device)
    sums.index_add_(0, chunk_of_row, x.float())
    counts = torch.bincount(chunk_of_row, minlength=num_chunks).to(torch.float32)
    return sums / counts.view(-1, *([1] * (x.dim() - 1)))


class BankChunkPoolerHead(TokenPoolerHead):
    """Turns one finished request's captured rows into bank entries (see module docstring)."""

    def __init__(self, layout: CaptureLayout, msa: MSAParams, dtype: torch.dtype) -> None:
        super().__init__()
        self.layout = layout
        self.msa = msa
        self.dtype = dtype

    def get_supported_tasks(self) -> Set[PoolingTask]:
        return {"token_embed"}

    def forward_chunk(
        self, pooled_data: torch.Tensor | None, pooling_param: PoolingParams
    ) -> torch.Tensor | None:
        if pooled_data is None:  # an unfinished chunked prefill
            return None
        mode = (pooling_param.extra_kwargs or {}).get(ENCODE_MODE_KEY, DOCUMENT_MODE)
        layer_kv = self.layout.layer_kv(pooled_data)
        if mode == TEMPLATE_MODE:
            return layer_kv.to(self.dtype)
        if mode != DOCUMENT_MODE:
            raise ValueError(f"unknown {ENCODE_MODE_KEY} mode {mode!r}")

        router_kv = layer_kv[:, list(self.layout.router_layers)]  # [n, R, 2, kv, hd]
        pooled_kv = chunk_mean(router_kv, self.msa.pooling_kernel_size)
        if self.layout.has_routing_keys:
            routing_keys = self.layout.routing_keys(pooled_data)
            routing = chunk_mean(routing_keys, self.msa.pooling_kernel_size)
        else:  # without a decoupled router the routing keys are the pooled K themselves
            routing = pooled_kv[:, :, 0]
        if self.msa.normalize_routing:
            routing = nn.functional.normalize(routing, p=2, dim=-1)
        return torch.cat([pooled_kv, routing.unsqueeze(2)], dim=2).to(self.dtype)


def gather_kv_heads(x: torch.Tensor, total_kv_heads: int, head_dim: int) -> torch.Tensor:
    """All KV heads of a TP-sharded `[n, local_heads * head_dim]` tensor, in head order."""
    tp_size = get_tensor_model_parallel_world_size()
    if tp_size == 1:
        return x
    gathered = tensor_model_parallel_all_gather(x.contiguous(), dim=-1)
    if total_kv_heads >= tp_size:
        return gathered
    # Fewer KV heads than ranks: every `tp_size // total_kv_heads` ranks hold the same head.
    per_rank = gathered.view(x.shape[0], tp_size, head_dim)
    return per_rank[:, :: tp_size // total_kv_heads].reshape(x.shape[0], -1)


def encode_layer(
    layer: MSADecoderLayer,
    positions: torch.Tensor,
    hidden_states: torch.Tensor,
    residual: torch.Tensor | None,
    capture_routing_key: bool,
    is_last: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """`Qwen3DecoderLayer.forward` that also returns this layer's K, V (and routing key).

    The last layer stops after its projections: nothing reads its output.
    """
    if residual is None:
        residual = hidden_states
        hidden_states = layer.input_layernorm(hidden_states)
    else:
        hidden_states, residual = layer.input_layernorm(hidden_states, residual)
    attn = layer.self_attn
    q, k, v = attention_qkv(attn, positions, hidden_states)
    captured = [k, v]
    if capture_routing_key:
        captured.append(attn.router_k_proj(hidden_states)[0])
    if is_last:
        return hidden_states, residual, captured
    out, _ = attn.o_proj(attn.attn(q, k, v))
    hidden_states, residual = layer.post_attention_layernorm(out, residual)
    hidden_states = layer.mlp(hidden_states)
    return hidden_states, residual, captured


class MSABankEncoder(nn.Module):
    """Stage-1 encoder: per-token K/V/routing keys out, pooled per chunk by the pooler."""

    is_pooling_model = True
    hf_to_vllm_mapper = MSAModel.hf_to_vllm_mapper
    packed_modules_mapping = Qwen3ForCausalLM.packed_modules_mapping

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        if get_pp_group().world_size > 1:
            raise ValueError(
                "MSABankEncoder does not support pipeline parallelism; build banks with "
                "--tensor-parallel-size instead"
            )
        config = vllm_config.model_config.hf_config
        self.config = config
        self.msa = MSAParams.from_hf_config(config)
        self.model = MSAModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.layout = CaptureLayout(
            num_layers=config.num_hidden_layers,
            router_layers=self.msa.router_layers,
            num_kv_heads=config.num_key_value_heads,
            head_dim=self.model.layers[0].self_attn.head_dim,
            has_routing_keys=self.msa.decouple_router,
        )
        head = BankChunkPoolerHead(self.layout, self.msa, vllm_config.model_config.dtype)
        self.pooler = TokenPooler(pooling=AllPool(), head=head)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        kv_rows: list[torch.Tensor] = []
        routing_rows: list[torch.Tensor] = []
        heads, head_dim = self.layout.num_kv_heads, self.layout.head_dim
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            capture_routing = layer.is_router_layer and self.layout.has_routing_keys
            hidden, residual, captured = encode_layer(
                layer, positions, hidden, residual, capture_routing, is_last=i == last
            )
            captured = [gather_kv_heads(t, heads, head_dim) for t in captured]
            kv_rows += captured[:2]
            routing_rows += captured[2:]
        return torch.cat(kv_rows + routing_rows, dim=-1)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # The encoder has no LM head: encoding a bank needs no logits.
        loader = AutoWeightsLoader(self, ignore_unexpected_prefixes=["lm_head."])
        return loader.load_weights(drop_training_only_weights(weights))
