"""What a bank costs in a deployment: GPU bytes per rank and host bytes per node, for a
tensor-parallel (TP) x data-parallel (DP) layout (`vllm-msa bank info --tensor-parallel-size
--data-parallel-size`, and benchmarks/parallel.py).

The rules are the runtime's (`vllm_msa/attention/tiers.py`, `index_parallel.py`):
- the routing index (every router layer's routing keys, all KV heads) is dealt over the TP
  ranks by whole documents, balanced by chunks (`index_parallel: "shard"`, the default), or
  copied to each rank (`"replicate"`); each rank also keeps the chunk -> document map of its
  chunks and a few tables of every document (ids, offsets, tie-break ranks);
- the host tier (K̄/V̄) is split by KV heads over the TP ranks as vLLM splits attention heads
  (where there are more ranks than KV heads, ranks share a head and hold it each); the
  engine processes of a node map one copy of each tensor in shared memory
  (`share_host`, the default), so data-parallel replicas add no host memory; without
  sharing every replica holds its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# Per document, on every rank: ids, bank offsets, tie-break and position tables (int64).
DOCUMENT_TABLE_BYTES = 8 * 8
CHUNK_MAP_BYTES = 8  # per chunk of the rank's index: the chunk's document (int64)
# An 8-bit index (`attention/compressed_index.py`), per chunk and layer: a byte a value, a
# float32 scale per KV head (int8 shares one per chunk where the heads' ranges allow) and a
# float32 residual bound per KV head, a float32 magnitude.
SCALE_BYTES = 4
BOUND_BYTES = 4


def compressed_layer_bytes(chunks: int, num_kv_heads: int, head_dim: int,
                           shared_scale: bool = False) -> int:
    """Device bytes of one router layer's 8-bit index of `chunks` chunks."""
    scales = SCALE_BYTES * (1 if shared_scale else num_kv_heads)
    return chunks * (num_kv_heads * head_dim + scales + BOUND_BYTES * (num_kv_heads + 1))


def index_chunk_bytes(info: Any, dtypes: Any, index_dtype: str = "auto") -> int:
    """Device bytes of one chunk's routing keys over every router layer (an 8-bit index:
    with a scale per KV head, the most it takes)."""
    layers, kv, d = len(info.router_layers), info.num_kv_heads, info.head_dim
    if index_dtype != "auto":
        return layers * compressed_layer_bytes(1, kv, d)
    return round(layers * kv * d * dtypes.element_bytes("routing_keys", d))


@dataclass(frozen=True)
class LayoutBytes:
    tensor_parallel_size: int
    data_parallel_size: int
    index_parallel: str
    index_dtype: str
    gpu_index_per_rank: int  # the largest rank's device index
    gpu_index_total: int  # all ranks of one replica
    host_per_rank: int
    host_per_node: int  # every replica's host tier, all on one node
    gpus: int
    share_host: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def local_kv_head_count(total: int, tp_size: int) -> int:
    """KV heads per rank, by vLLM's rule (`QKVParallelLinear`): split, or one shared head."""
    return total // tp_size if total >= tp_size else 1


def layout_bytes(bank: Any, tensor_parallel_size: int = 1, data_parallel_size: int = 1,
                 index_parallel: str = "shard", share_host: bool = True,
                 index_dtype: str = "auto") -> LayoutBytes:
    """Predicted bytes of serving `bank` (a `MemoryBank`, or anything with its `model_info`,
    `dtypes`, `num_documents` and `doc_chunk_offsets`) on tensor_parallel_size x
    data_parallel_size GPUs (an FP8 tier counts its values and scales), its routing index
    served in `index_dtype` (the engine option: "auto", "int8", "fp8_e4m3")."""
    from ..attention.index_parallel import shard_bounds

    tp, dp = tensor_parallel_size, data_parallel_size
    if tp < 1 or dp < 1:
        raise ValueError("tensor and data parallel sizes must be >= 1")
    if index_parallel not in ("shard", "replicate"):
        raise ValueError(f"index_parallel must be 'shard' or 'replicate', got {index_parallel!r}")
    info = bank.model_info
    kv_value = bank.dtypes.element_bytes("keys", info.head_dim)
    layers = len(info.router_layers)
    offsets = np.asarray(bank.doc_chunk_offsets, dtype=np.int64)
    per_chunk_keys = index_chunk_bytes(info, bank.dtypes, index_dtype)
    tables = DOCUMENT_TABLE_BYTES * bank.num_documents
    if index_parallel == "shard" and tp > 1:
        bounds = shard_bounds(offsets, tp)
        chunks = [int(offsets[bounds[r + 1]] - offsets[bounds[r]]) for r in range(tp)]
    else:
        chunks = [int(offsets[-1])] * tp
    per_rank = [c * (per_chunk_keys + CHUNK_MAP_BYTES) + tables for c in chunks]
    heads = local_kv_head_count(info.num_kv_heads, tp)
    # Ranks holding the same heads (replicas; TP ranks sharing a KV head) share one copy.
    copies = (min(tp, info.num_kv_heads) if share_host else tp * dp)
    host_rank = round(2 * layers * int(offsets[-1]) * heads * info.head_dim * kv_value)
    return LayoutBytes(tp, dp, index_parallel, index_dtype, max(per_rank), sum(per_rank), host_rank,
                       host_rank * copies, tp * dp, share_host)



@dataclass(frozen=True)
class PlannedBank:
    """What `layout_bytes` reads of a bank not built yet: `tokens` memory tokens in documents
    of `doc_tokens` (the last one shorter), stored as `dtypes`."""

    model_info: Any
    dtypes: Any
    tokens: int
    doc_tokens: int

    @property
    def num_documents(self) -> int:
        return -(-self.tokens // self.doc_tokens)

    @property
    def doc_chunk_offsets(self) -> np.ndarray:
        pooling = self.model_info.pooling_kernel_size
        chunks = np.full(self.num_documents, -(-self.doc_tokens // pooling), dtype=np.int64)
        last = self.tokens - (self.num_documents - 1) * self.doc_tokens
        chunks[-1] = -(-last // pooling)
        return np.concatenate([[0], np.cumsum(chunks)])


def largest_bank(model_info: Any, dtypes: Any, doc_tokens: int, gpu_index_bytes: float,
                 host_bytes: float, tensor_parallel_size: int = 1, data_parallel_size: int = 1,
                 index_parallel: str = "shard", share_host: bool = True,
                 index_dtype: str = "auto") -> tuple[int, LayoutBytes | None]:
    """The most memory tokens, in whole documents of `doc_tokens`, whose layout fits
    `gpu_index_bytes` of routing index on every GPU and `host_bytes` of host tier per node;
    with its `LayoutBytes` (0 and None when not even one document fits)."""
    def layout(docs: int) -> LayoutBytes:
        return layout_bytes(PlannedBank(model_info, dtypes, docs * doc_tokens, doc_tokens),
                            tensor_parallel_size, data_parallel_size, index_parallel,
                            share_host, index_dtype)

    def fits(docs: int) -> bool:
        lb = layout(docs)
        return lb.gpu_index_per_rank <= gpu_index_bytes and lb.host_per_node <= host_bytes

    if not fits(1):
        return 0, None
    lo, hi = 1, 2
    while fits(hi):  # sizes grow linearly with the documents: doubling finds a bound
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * doc_tokens, layout(lo)
