"""Per-request memory state in a worker: what a request reads, what it selected per router
layer and where its selected documents are staged, and how its tokens sit in this step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..options import RequestOptions
from .attend import SideKV
from .routing import Selection
from .staging import Staged
from .tiers import ServedBank


@dataclass
class MemoryRequest:
    """A request that reads a bank: its options, selection per layer and staged memory."""

    req_id: str
    options: RequestOptions
    bank: ServedBank
    selections: dict[int, Selection | RoutedSelection] = field(default_factory=dict)
    staged: dict[int, Staged] = field(default_factory=dict)
    reported: set[int] = field(default_factory=set)  # layers whose selection was reported
    side_kv: dict[int, SideKV] = field(default_factory=dict)  # opaque-cache backends only
    # Per layer, its selection as stored positions, first chunks and chunk counts ([1, K]
    # each, `ServedBank.locate`), fixed when the bank switched generation under it: a later
    # generation may have removed or replaced what it selected, and staging it again (after
    # a preemption) must read what it selected.
    located: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict)


@dataclass(frozen=True)
class RoutedSelection:
    """A request's selection in one layer as routing left it: row `row` of a batch of top-k
    sort keys on the device. Staging reads the keys; ids and scores decode on first use."""

    batch: Any  # vllm_msa.kernels.routing.RoutedBatch
    row: int

    @property
    def doc_ids(self) -> torch.Tensor:
        return self.batch.selection(self.row).doc_ids

    @property
    def scores(self) -> torch.Tensor:
        return self.batch.selection(self.row).scores


@dataclass(frozen=True)
class StepRow:
    """One memory request's tokens in this step's flattened batch."""

    request: MemoryRequest
    batch_index: int  # row of the block table
    token_start: int  # first of its tokens in the step
    num_tokens: int
    first_position: int  # index in the request's sequence of its first token in the step


@dataclass(frozen=True)
class FullGraphStep:
    """What the last full-graph step set up, for the next one with the same batch layout."""

    batch_key: Any  # the runner's request ids and token offsets
    pool_version: int
    offsets: list[tuple[int, int]] | None  # token spans shifted by the RoPE offset
    has_memory: bool  # it had memory rows (counted in `memory_steps`)
