"""MSAForCausalLM for vLLM: vLLM's own Qwen3 layers plus MSA's router projections.

The model is built from `vllm.model_executor.models.qwen3`, so tensor parallelism, quantisation
and weight loading shard it exactly as they shard Qwen3. Router layers (msa-spec §1) gain
`router_q_proj` (num_heads * head_dim outputs) and `router_k_proj` (num_kv_heads * head_dim
outputs) on their `self_attn`, which is where the checkpoint names them
(`model.layers.L.self_attn.router_q_proj.0.weight`; the `.0.` comes from a one-element
`nn.Sequential` and is dropped at load time).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import (
    get_pp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.qwen3 import (
    Qwen3Attention,
    Qwen3DecoderLayer,
    Qwen3ForCausalLM,
    Qwen3Model,
)
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    PPMissingLayer,
    WeightsMapper,
    extract_layer_index,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from .attention.runtime import MemoryRuntime, create_runtime, current_runtime
from .config import MSAParams

# Top-level training-only parameters of the reference model (InfoNCE temperature, BCE bias).
TRAINING_ONLY_WEIGHTS = frozenset({"temperature", "b"})


class ReplicatedKVHeadLinear(ReplicatedLinear):
    """A full `router_k_proj` on a rank that replicates one KV head (fewer KV heads than ranks).

    Keeps the output of the head this rank holds, the rule `QKVParallelLinear` applies to K and
    V, so the routing keys line up with the rank's own K/V heads.
    """

    def __init__(self, hidden_size: int, num_kv_heads: int, head_dim: int, prefix: str) -> None:
        super().__init__(hidden_size, num_kv_heads * head_dim, bias=False, prefix=prefix)
        tp_size = get_tensor_model_parallel_world_size()
        head = get_tensor_model_parallel_rank() // (tp_size // num_kv_heads)
        self.local_slice = slice(head * head_dim, (head + 1) * head_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, bias = super().forward(x)
        return out[..., self.local_slice], bias


def router_key_projection(
    hidden_size: int, num_kv_heads: int, head_dim: int, prefix: str
) -> nn.Module:
    """`router_k_proj`, sharded across TP ranks like the K part of Qwen3's QKV projection."""
    if num_kv_heads < get_tensor_model_parallel_world_size():
        return ReplicatedKVHeadLinear(hidden_size, num_kv_heads, head_dim, prefix)
    return ColumnParallelLinear(hidden_size, num_kv_heads * head_dim, bias=False, prefix=prefix)


def add_router_projections(attn: Qwen3Attention, hidden_size: int, prefix: str) -> None:
    """Give a router layer's attention MSA's decoupled routing projections (msa-spec §1)."""
    attn.router_q_proj = ColumnParallelLinear(
        hidden_size,
        attn.total_num_heads * attn.head_dim,
        bias=False,
        prefix=f"{prefix}.router_q_proj",
    )
    attn.router_k_proj = router_key_projection(
        hidden_size, attn.total_num_kv_heads, attn.head_dim, prefix=f"{prefix}.router_k_proj"
    )


def add_folded_router_query(attn: Qwen3Attention, hidden_size: int, prefix: str) -> None:
    """`router_q_fold`: one output head per KV head, its group's mean `router_q_proj` weight
    (`fold_router_query`, filled in by `MSAForCausalLM.load_weights`). Column-parallel like
    `router_q_proj`, so a rank's fold comes from the heads it holds."""
    attn.router_q_fold = ColumnParallelLinear(
        hidden_size,
        attn.total_num_kv_heads * attn.head_dim,
        bias=False,
        prefix=f"{prefix}.router_q_fold",
    )


def fold_router_query(attn: Qwen3Attention) -> None:
    """router_q_fold.weight = each KV head's group mean of router_q_proj.weight (this rank's
    rows), averaged in fp32 and rounded once to the weight's dtype."""
    weight = attn.router_q_proj.weight
    kv_heads = attn.router_q_fold.weight.shape[0] // attn.head_dim
    group = weight.shape[0] // (kv_heads * attn.head_dim)
    folded = weight.float().view(kv_heads, group, attn.head_dim, -1).mean(1)
    attn.router_q_fold.weight.data.copy_(folded.reshape(attn.router_q_fold.weight.shape))


def attention_qkv(
    attn: Qwen3Attention, positions: torch.Tensor, hidden_states: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q and K after q/k-norm and RoPE, and V: the first half of `Qwen3Attention.forward`."""
    qkv, _ = attn.qkv_proj(hidden_states)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q = attn.q_norm(q.view(*q.shape[:-1], -1, attn.head_dim)).view(q.shape)
    k = attn.k_norm(k.view(*k.shape[:-1], -1, attn.head_dim)).view(k.shape)
    q, k = attn.rotary_emb(positions, q, k)
    return q, k, v


class MSADecoderLayer(Qwen3DecoderLayer):
    """A Qwen3 decoder layer; in router layers its attention carries the router projections
    and, when banks are attached, reads memory through the MSA router-attention op."""

    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "") -> None:
        super().__init__(
            config, cache_config=cache_config, quant_config=quant_config, prefix=prefix
        )
        self.layer_idx = extract_layer_index(prefix)
        msa = MSAParams.from_hf_config(config)
        self.is_router_layer = msa.is_router_layer(self.layer_idx)
        if self.is_router_layer and msa.decouple_router:
            add_router_projections(self.self_attn, config.hidden_size, f"{prefix}.self_attn")
        runtime = current_runtime()
        self.reads_memory = self.is_router_layer and runtime is not None and bool(runtime.banks)
        if self.reads_memory:
            if runtime.fold_router_query:
                add_folded_router_query(self.self_attn, config.hidden_size,
                                        f"{prefix}.self_attn")
            runtime.register_layer(self.self_attn.attn.layer_name, self.layer_idx,
                                   self.self_attn)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.reads_memory:
            return super().forward(positions, hidden_states, residual)
        # Qwen3DecoderLayer.forward with the attention call replaced by the MSA op.
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        attn = self.self_attn
        q, k, v = attention_qkv(attn, positions, hidden_states)
        out = torch.empty_like(q)
        torch.ops.vllm.msa_router_attention(q, k, v, hidden_states, out, attn.attn.layer_name)
        hidden_states, _ = attn.o_proj(out)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class MSAModel(Qwen3Model):
    decoder_layer_type = MSADecoderLayer
    hf_to_vllm_mapper = Qwen3Model.hf_to_vllm_mapper | WeightsMapper(
        orig_to_new_substr={
            ".router_q_proj.0.": ".router_q_proj.",
            ".router_k_proj.0.": ".router_k_proj.",
        }
    )


def drop_training_only_weights(
    weights: Iterable[tuple[str, torch.Tensor]],
) -> Iterable[tuple[str, torch.Tensor]]:
    return ((name, w) for name, w in weights if name not in TRAINING_ONLY_WEIGHTS)


class MSAForCausalLM(Qwen3ForCausalLM):
    """An MSA checkpoint served by vLLM. Without a memory bank it computes exactly Qwen3."""

    hf_to_vllm_mapper = MSAModel.hf_to_vllm_mapper

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        # Qwen3ForCausalLM.__init__ builds a Qwen3Model by name, so its body is restated here
        # with MSAModel; every other method is inherited unchanged.
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        self.config = config
        self.msa = MSAParams.from_hf_config(config)
        self.vllm_config = vllm_config
        self.quant_config = vllm_config.quant_config
        self.memory = create_memory_runtime(vllm_config, config, self.msa)
        self.model = MSAModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size,
                config.hidden_size,
                quant_config=self.quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        # (The memory runtime's RoPE offset is applied to `positions` by the runner hook,
        # before a full CUDA graph would replay this without Python.)
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = AutoWeightsLoader(self).load_weights(drop_training_only_weights(weights))
        # Derived weights (not in the checkpoint): made from the loaded ones.
        for name, module in self.named_modules():
            if hasattr(module, "router_q_fold"):
                fold_router_query(module)
                loaded.add(f"{name}.router_q_fold.weight")
        return loaded


def create_memory_runtime(vllm_config: VllmConfig, config, msa: MSAParams
                          ) -> MemoryRuntime | None:
    """The worker's memory runtime (banks, staging, per-request state); None without banks.

    Also installs the model-runner hook that feeds it each step's batch (`vllm_msa.patches`)
    and registers the router-attention op.
    """
    from .options import ServingConfig
    from .patches.model_runner import install_model_runner_hook

    if not ServingConfig.from_additional_config(vllm_config.additional_config).banks:
        return None
    from .attention import ops  # noqa: F401  (registers torch.ops.vllm.msa_router_attention)

    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads
    )
    runtime = create_runtime(
        vllm_config, msa, num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads, head_dim=head_dim,
        device=torch.device(vllm_config.device_config.device))
    install_model_runner_hook()
    return runtime
