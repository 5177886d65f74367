"""Memory Parallel (msa-spec §5): a bank's routing index dealt over the tensor-parallel ranks.

Each rank keeps the routing keys (every KV head: a chunk's score sums over all query heads)
of one contiguous run of documents in bank order, about 1/TP of the bank's chunks, so the
largest bank a deployment serves grows with its GPUs. K̄/V̄ stay split by KV heads as before:
every rank attends with its heads over every selected document, whichever shard chose it.

Routing a layer: the routing query is already gathered over the group (`router.py`); each
rank scores its own documents with the usual kernels and keeps its best top-k as sort keys
(`kernels/routing.py`: the fp32 score's order-preserving bits above the document's tie-break,
ranked among *all* the bank's ids). One all-gather hands every rank all the candidates, and
every rank takes the same top-k of them on the device.

Why that is exactly the selection TP=1 makes: sort keys are distinct and totally ordered
(higher score first, then the smaller id, msa-spec §3), and a document's score does not depend
on the other chunks of its index (the kernels and the torch path compute each chunk's score
and each document's reduction alone). The global top-k documents are each among the top-k of
their own shard, so the top-k of the union of per-shard top-k lists is the global top-k, in
the same order, ties between shards included.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..bank.format import BankError

# A candidate that is no document (an empty shard's rows): below every real sort key.
NO_CANDIDATE = -(2**63)


@dataclass(frozen=True)
class IndexShard:
    """The documents (bank positions) and chunks one rank's routing index holds."""

    rank: int
    size: int
    documents: slice
    chunks: slice

    @property
    def num_documents(self) -> int:
        return self.documents.stop - self.documents.start

    @property
    def num_chunks(self) -> int:
        return self.chunks.stop - self.chunks.start

    @classmethod
    def whole(cls, chunk_offsets: Sequence[int]) -> IndexShard:
        return cls.of(chunk_offsets, 0, 1)

    @classmethod
    def of(cls, chunk_offsets: Sequence[int], rank: int, size: int) -> IndexShard:
        bounds = shard_bounds(chunk_offsets, size)
        offsets = np.asarray(chunk_offsets, dtype=np.int64)
        first, last = int(bounds[rank]), int(bounds[rank + 1])
        return cls(rank, size, slice(first, last),
                   slice(int(offsets[first]), int(offsets[last])))


def shard_bounds(chunk_offsets: Sequence[int], num_shards: int) -> np.ndarray:
    """Document boundaries [num_shards + 1] (bank positions): shard r holds documents
    bounds[r]:bounds[r + 1], whole documents, balanced by chunks rather than by count (one
    huge document must not unbalance the others): each boundary is the document start nearest
    to r/num_shards of the bank's chunks (the earlier one on a tie). Shards may be empty when
    there are fewer documents than ranks."""
    offsets = np.asarray(chunk_offsets, dtype=np.int64)
    num_documents, total = len(offsets) - 1, int(offsets[-1]) if len(offsets) else 0
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    targets = np.array([r * total / num_shards for r in range(num_shards + 1)])
    after = np.searchsorted(offsets, targets, side="left").clip(0, num_documents)
    before = (after - 1).clip(0, num_documents)
    nearer_before = (targets - offsets[before]) <= (offsets[after] - targets)
    bounds = np.where(nearer_before, before, after)
    bounds[0], bounds[-1] = 0, num_documents
    return np.maximum.accumulate(bounds)


def exchange_candidates(keys: torch.Tensor) -> torch.Tensor:
    """Every rank's candidate sort keys, [R, k] -> [R, TP * k]: one all-gather over the
    tensor-parallel group, on the device (nothing waits for it on the host)."""
    from vllm.distributed import tensor_model_parallel_all_gather

    # Sent as float32 pairs: vLLM's CPU shared-memory all-gather has no int64 kernel. An
    # all-gather only copies, so every bit (NaN patterns included) arrives as it left.
    gathered = tensor_model_parallel_all_gather(keys.contiguous().view(torch.float32), dim=1)
    return gathered.view(torch.int64)


def index_bytes(routing_keys: dict[int, torch.Tensor]) -> int:
    """Device bytes of a rank's routing keys, all router layers."""
    return sum(t.numel() * t.element_size() for t in routing_keys.values())


def bank_identity(bank: Any) -> str:
    """A digest of what a bank holds: its manifest (counts, layout, every file's checksum)."""
    return hashlib.sha256(json.dumps(bank.manifest, sort_keys=True).encode()).hexdigest()


def check_same_bank(name: str, bank: Any, tp_size: int, group: Any = None) -> None:
    """Refuse to start unless every tensor-parallel rank opened the same bank: with the index
    dealt over the ranks (and K̄/V̄ split by heads), ranks that read different copies (another
    node's disk, a bank rebuilt between two starts) would combine unrelated documents.
    `group`: the ranks' CPU process group (vLLM's tensor-parallel group by default)."""
    if tp_size == 1:
        return
    import torch.distributed as dist

    if group is None:  # vLLM's tensor-parallel group (its CPU side: no device traffic)
        from vllm.distributed import get_tp_group

        group = get_tp_group().cpu_group
    mine = (bank_identity(bank), str(bank.path))
    every: list[Any] = [None] * tp_size
    dist.all_gather_object(every, mine, group=group)
    if any(other[0] != mine[0] for other in every):
        ranks = ", ".join(f"rank {r}: {path} ({digest[:12]})"
                          for r, (digest, path) in enumerate(every))
        raise BankError(f"bank {name!r} differs across tensor-parallel ranks ({ranks}); "
                        "every rank must open the same bank (copy it byte for byte)")
