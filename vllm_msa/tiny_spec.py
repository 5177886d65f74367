"""`TinySpec`, the shape of a tiny test checkpoint, apart from the code that writes one
(vllm_msa.tiny) so that the command line can show its defaults without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TinySpec:
    """Shape and MSA options of a tiny checkpoint (CLI: `vllm-msa make-tiny-checkpoint`)."""

    seed: int = 0
    layers: int = 4
    router_layers: str = "2,3"
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    intermediate: int = 256
    pooling: int = 4
    top_k: int = 4
    head_reduce: str = "mean"
    query_reduce: str = "max"
    chunk_reduce: str = "max"
    aux_loss_method: str = "INFONCE_DECOUPLE"
    decouple_router: bool = True
    dtype: str = "float32"
    vocab_size: int = 512
    rope_theta: float = 10000.0
    weight_std: float = 0.08
