"""A bank as one worker serves it: the routing index on the device, K̄/V̄ in host memory.

The routing keys of every router layer (all KV heads: routing scores sum over every query
head) and the chunk -> document map go to the device; K̄ and V̄ stay in host RAM — pinned
when a GPU will read them, plain memory on CPU — holding only the KV heads this tensor-parallel
rank attends with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ..bank.reader import MemoryBank
from .routing import RoutingIndex

logger = logging.getLogger(__name__)


def local_kv_heads(total: int, tp_rank: int, tp_size: int) -> slice:
    """The KV heads a TP rank holds, by the rule of vLLM's `QKVParallelLinear`."""
    if total >= tp_size:
        per_rank = total // tp_size
        return slice(tp_rank * per_rank, (tp_rank + 1) * per_rank)
    head = tp_rank // (tp_size // total)
    return slice(head, head + 1)


@dataclass
class ServedBank:
    name: str
    bank: MemoryBank
    index: dict[int, RoutingIndex]  # router layer -> device routing index
    host_keys: dict[int, torch.Tensor]  # router layer -> [chunks, local kv, hd], host
    host_values: dict[int, torch.Tensor]
    doc_position: dict[int, int]  # doc id -> position in bank order
    chunk_offsets: list[int]  # bank order: document i owns chunks offsets[i]:offsets[i+1]
    _prepared: dict[int, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, name: str, bank: MemoryBank, device: torch.device, kv_heads: slice
             ) -> ServedBank:
        pin = device.type == "cuda"
        index, keys, values = {}, {}, {}
        for layer in bank.router_layers:
            tensors = bank.layer(layer)
            index[layer] = RoutingIndex.from_bank(bank, layer, device)
            k = tensors.keys[:, kv_heads].contiguous()
            v = tensors.values[:, kv_heads].contiguous()
            keys[layer] = k.pin_memory() if pin else k
            values[layer] = v.pin_memory() if pin else v
        served = cls(
            name=name,
            bank=bank,
            index=index,
            host_keys=keys,
            host_values=values,
            doc_position={d: i for i, d in enumerate(bank.doc_ids)},
            chunk_offsets=bank.doc_chunk_offsets.tolist(),
        )
        tiers = bank.tier_bytes()
        logger.info(
            "MSA bank %r (%s): %d documents, %d chunks, %d tokens; device index %.1f MiB, "
            "host K/V %.1f MiB (%s)", name, bank.path, bank.num_documents, bank.num_chunks,
            bank.num_tokens, tiers["gpu_index"] / 2**20, tiers["host_kv"] / 2**20,
            "pinned" if pin else "plain memory")
        return served

    def prepared_index(self, layer: int) -> Any:
        """The layer's routing index with what the batched routing kernel derives from it
        (document offsets, tie-break ranks), computed once."""
        prepared = self._prepared.get(layer)
        if prepared is None:
            from ..kernels.routing import prepare_index

            prepared = self._prepared[layer] = prepare_index(self.index[layer])
        return prepared

    @property
    def template_len(self) -> int:
        return len(self.bank.template_ids)

    @property
    def num_documents(self) -> int:
        return len(self.chunk_offsets) - 1

    @property
    def max_document_chunks(self) -> int:
        return max(b - a for a, b in zip(self.chunk_offsets, self.chunk_offsets[1:],
                                         strict=False))

    def chunk_indices(self, doc_ids: list[int]) -> torch.Tensor:
        """Bank-order chunk indices of the given documents, ascending doc id then chunk."""
        parts = []
        for doc_id in sorted(doc_ids):
            i = self.doc_position[doc_id]
            parts.append(torch.arange(self.chunk_offsets[i], self.chunk_offsets[i + 1],
                                      device="cpu"))
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64, device="cpu")
