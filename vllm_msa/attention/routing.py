"""MSA routing in plain torch (msa-spec §3): score chunks, reduce to documents, pick top-k.

This is the portable path (CPU, and the reference for the fused Triton kernel): it walks the
index in tiles of chunks so the [tokens, heads, chunks] score tensor never exists in full.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch

from ..config import MSAParams
from .uploads import upload_tensor

DEFAULT_TILE_CHUNKS = 1 << 16
PAD_CHUNKS = 64  # chunk_scores multiplies keys in whole blocks of this many chunks


@dataclass(frozen=True)
class RoutingIndex:
    """One router layer's routing keys and the chunk -> document map, in bank order.

    A shard of a bank (`index_parallel.py`) holds a contiguous run of its documents, from
    bank position `shard_start`, and carries the whole bank's ids and chunk offsets: ties
    rank among all the bank's ids, and staging reads the host tier by bank position.

    A bank with removed documents (tombstones of an edited bank: `bank.generations`) is
    served in its stored layout, with `live` False for the removed ones: they are never
    selected, and a request selects at most the bank's live documents, so routing selects
    exactly what it selects over the bank rewritten without them."""

    routing_keys: torch.Tensor  # [num_chunks, num_kv_heads, head_dim]
    chunk_doc_index: torch.Tensor  # [num_chunks] int64: position of the chunk's document
    doc_ids: torch.Tensor  # [num_documents] int64, bank order
    shard_start: int = 0  # bank position of the first document (shards only)
    bank_doc_ids: torch.Tensor | None = None  # [bank documents] int64 (shards only)
    bank_doc_start: torch.Tensor | None = None  # [bank documents + 1] int64 (shards only)
    live: torch.Tensor | None = None  # [num_documents] bool; None: every document is live
    bank_live: int | None = None  # live documents of the whole bank (shards; None: this's)
    live_count: int | None = None  # documents `live` marks (known on the host: no sync)

    @classmethod
    def from_bank(cls, bank, layer: int, device: torch.device | str = "cpu") -> RoutingIndex:
        return cls(bank.layer(layer).routing_keys.to(device), *cls.document_map(bank, device))

    @staticmethod
    def document_map(bank, device: torch.device | str = "cpu"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(chunk_doc_index, doc_ids): the same for every router layer of a bank."""
        counts = bank.doc_num_chunks
        doc_index = torch.repeat_interleave(torch.arange(len(counts)), counts)
        return (doc_index.to(device),
                torch.tensor(bank.doc_ids, dtype=torch.int64, device=device))

    @classmethod
    def of_shard(cls, routing_keys: torch.Tensor, chunk_doc_index: torch.Tensor,
                 doc_ids: torch.Tensor, chunk_offsets: torch.Tensor, shard: Any,
                 live: torch.Tensor | None = None,
                 uploaded: dict[torch.device, torch.Tensor] | None = None) -> RoutingIndex:
        """The index of one `index_parallel.IndexShard`: `routing_keys` holds the shard's
        chunks; the chunk -> document map, ids, [documents + 1] chunk offsets and `live`
        flags (None: all) are the bank's (`uploaded`: as `with_live`)."""
        if shard.size == 1:
            index = cls(routing_keys, chunk_doc_index, doc_ids)
        else:
            first = shard.documents.start
            index = cls(routing_keys, chunk_doc_index[shard.chunks] - first,
                        doc_ids[shard.documents], first, doc_ids,
                        chunk_offsets.to(device=routing_keys.device, dtype=torch.int64))
        return index.with_live(live, shard, uploaded)

    def with_live(self, live: torch.Tensor | None, shard: Any,
                  uploaded: dict[torch.device, torch.Tensor] | None = None) -> RoutingIndex:
        """This index (of `shard`, an `index_parallel.IndexShard`) with the bank's [bank
        documents] `live` flags (None: every document live). `uploaded`: `live` on each
        device, shared by the router layers of one switch (one copy a device)."""
        if live is None:
            return dataclasses.replace(self, live=None, bank_live=None, live_count=None)
        device = self.routing_keys.device
        host = live if live.device.type == "cpu" else None
        if uploaded is not None and device in uploaded:
            live = uploaded[device]
        else:
            live = upload_tensor(live.to(torch.bool), device)
            if uploaded is not None:
                uploaded[device] = live
        if shard.size == 1:
            count = None if host is None else int(host.sum())
            return dataclasses.replace(self, live=live, bank_live=None, live_count=count)
        count = None if host is None else int(host[shard.documents].sum())
        return dataclasses.replace(self, live=live[shard.documents],
                                   bank_live=int(live.sum() if host is None else host.sum()),
                                   live_count=count)

    @property
    def num_documents(self) -> int:
        return self.doc_ids.shape[0]

    @functools.cached_property
    def num_live(self) -> int:
        """This index's live documents (the most one request can select from it)."""
        if self.live is None:
            return self.num_documents
        return self.live_count if self.live_count is not None else int(self.live.sum())

    @property
    def num_bank_live(self) -> int:
        """The whole bank's live documents (the most one request can select)."""
        if self.bank_live is not None:
            return self.bank_live
        return self.num_live if self.bank_doc_ids is None else self.bank_doc_ids.shape[0]


def normalized_keys(keys: torch.Tensor) -> torch.Tensor:
    """Routing keys L2-normalised in float32, back in their dtype (cosine scores of a bank
    built for dot products): at load, and for the exact keys a compressed index reads back,
    on the same device, so both are the same bits."""
    return torch.nn.functional.normalize(keys.float(), dim=-1).to(keys.dtype)


@dataclass(frozen=True)
class Selection:
    """The selected documents, best first, with their scores (as msa-spec §3 defines them)."""

    doc_ids: torch.Tensor  # [k] int64
    scores: torch.Tensor  # [k] float32


def chunk_scores(
    routing_query: torch.Tensor,
    index: RoutingIndex,
    msa: MSAParams,
    tile_chunks: int = DEFAULT_TILE_CHUNKS,
) -> torch.Tensor:
    """S(c) for every chunk: [num_chunks] float32.

    `routing_query` is [T, num_heads, head_dim]: the routing-span tokens of one request.
    Query head h reads KV head h // (num_heads / num_kv_heads).
    """
    num_tokens, num_heads, head_dim = routing_query.shape
    if num_tokens == 0:
        raise ValueError("routing needs at least one routing-span token")
    num_kv_heads = index.routing_keys.shape[1]
    group = num_heads // num_kv_heads
    q = routing_query.float()
    if msa.normalize_routing:
        q = torch.nn.functional.normalize(q, p=2, dim=-1)
    q = q * msa.routing_scale(head_dim)
    # [T, kv, group, D]: the query heads that share each KV head.
    q = q.view(num_tokens, num_kv_heads, group, head_dim)
    out = []
    for start in range(0, index.routing_keys.shape[0], tile_chunks):
        keys = index.routing_keys[start : start + tile_chunks].float()  # [c, kv, D]
        chunks = keys.shape[0]
        # Whole blocks of chunks: the CPU GEMM computes a ragged last block with other
        # kernels, whose rounding differs, so a chunk's score would depend on how many
        # chunks share its index (a shard of it, index_parallel.py, must score alike).
        if chunks % PAD_CHUNKS:
            keys = torch.cat([keys, keys.new_zeros(PAD_CHUNKS - chunks % PAD_CHUNKS,
                                                   *keys.shape[1:])])
        # The reduces run over the whole blocks too, sliced only after: a vectorised reduce
        # handles a ragged tail of columns otherwise, so a chunk's score would depend on
        # where it sits (an edited bank's stored layout must score as its rewrite does).
        s = torch.einsum("tkgd,ckd->tkgc", q, keys)
        s = s.reshape(num_tokens, num_heads, -1)
        s = s.mean(1) if msa.head_reduce == "mean" else s.amax(1)  # [T, c]
        if msa.query_reduce == "max":
            s = s.amax(0)
        elif msa.query_reduce == "mean":
            s = s.mean(0)
        else:  # "last": the last routing-span token of this request
            s = s[-1]
        out.append(s[:chunks])
    return torch.cat(out) if out else q.new_empty(0)  # a shard may hold no documents


def document_scores(scores: torch.Tensor, index: RoutingIndex, msa: MSAParams) -> torch.Tensor:
    """Chunk scores reduced to documents (max or mean over each document's chunks)."""
    reduce = "amax" if msa.chunk_reduce == "max" else "mean"
    out = torch.full((index.num_documents,), float("-inf") if reduce == "amax" else 0.0,
                     dtype=torch.float32, device=scores.device)
    return out.scatter_reduce(0, index.chunk_doc_index, scores, reduce=reduce,
                              include_self=False)


def select_documents(doc_scores: torch.Tensor, doc_ids: torch.Tensor, top_k: int) -> Selection:
    """Top-k documents by score, ties to the smaller id; all of them if fewer than k."""
    by_id = torch.argsort(doc_ids, stable=True)
    order = by_id[torch.argsort(doc_scores[by_id], descending=True, stable=True)]
    chosen = order[: min(top_k, doc_ids.shape[0])]
    return Selection(doc_ids=doc_ids[chosen], scores=doc_scores[chosen])


def route(
    routing_query: torch.Tensor,
    index: RoutingIndex,
    msa: MSAParams,
    top_k: int,
    tile_chunks: int = DEFAULT_TILE_CHUNKS,
) -> Selection:
    """One request's routing in one router layer."""
    scores = document_scores(chunk_scores(routing_query, index, msa, tile_chunks), index, msa)
    if index.live is None:
        return select_documents(scores, index.doc_ids, top_k)
    # Removed documents sort last (live scores are finite) and are never taken.
    scores = scores.masked_fill(~index.live.to(scores.device), float("-inf"))
    return select_documents(scores, index.doc_ids, min(top_k, index.num_live))
