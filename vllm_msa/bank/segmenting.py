"""How a bank's documents are cut into segments: one rule, shared by `bank build` and
`bank compact` (a compaction writes the segments a build of the same documents writes).
Needs no engine, so that editing a bank's files never imports vLLM."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch

from .model_info import ModelInfo

T = TypeVar("T")


def segment_chunk_bytes(info: ModelInfo) -> int:
    """Bytes of one chunk's pooled tensors in the model's dtype: what `--segment-mb` counts
    (whatever the tiers are stored in, so that a bank segments the same in every dtype)."""
    itemsize = torch.empty((), dtype=getattr(torch, info.dtype)).element_size()
    return 3 * len(info.router_layers) * info.num_kv_heads * info.head_dim * itemsize


def segment_runs(items: Iterable[T], chunks_of: Callable[[T], int], chunk_bytes: int,
                 segment_bytes: float) -> Iterator[list[T]]:
    """`items` (documents in bank order) cut into segments: a segment closes once its
    documents hold `segment_bytes` or more. The one rule of a build, which a compaction
    follows to write the bank a build of the same documents would."""
    segment: list[T] = []
    size = 0
    for item in items:
        segment.append(item)
        size += chunks_of(item) * chunk_bytes
        if size >= segment_bytes:
            yield segment
            segment, size = [], 0
    if segment:
        yield segment
