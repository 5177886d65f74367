"""The device staging pool: where the selected documents' K̄/V̄ live while a request runs.

Sized once at start, in slots of one chunk's K̄ and V̄ for one layer: by default for a full
batch (`max_num_seqs` requests x router layers x the top-k largest documents' chunks), or
`staging_mib`. A request
takes slots when a router layer selects its documents — as many as its top-k largest
documents could need, since the host does not wait to learn what routing chose — and gives
all of them back when it finishes, is aborted or is preempted. A request that does not fit in
what is free gets a private allocation instead (logged): slower to manage, never wrong.

On a GPU with pinned host K̄/V̄ the selected rows move with one Triton launch per layer that
reads host memory directly (`vllm_msa.kernels.fetch.gather_rows`: ~0.9x the pinned copy
bandwidth at batch, where a copy per document is launch-bound); elsewhere with torch copies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..bank.quant import dequantize
from .uploads import upload

logger = logging.getLogger(__name__)

AUTO_CAP_MIB = 4096  # the default pool's ceiling (a full batch at worst case, up to this)


@dataclass(frozen=True)
class Staged:
    """Where one request's memory for one layer sits: pool slots, or a private copy.

    Slots are reserved for the request's worst case (its top-k largest documents) before the
    host knows what routing chose, for all requests staged together as the rows of one table;
    `counts` (on the device) says how many of its slots, from the first, hold chunks."""

    table: torch.Tensor | None  # [R, W] int64 slots of the requests staged together (-1: none)
    row: int  # this request's row of `table` / `counts`
    width: int  # its reservation
    counts: torch.Tensor  # [R] int64 on the device: chunks staged per row
    private: tuple[torch.Tensor, torch.Tensor] | None = None  # [width, kv, hd] each

    @property
    def slots(self) -> torch.Tensor | None:
        """[width] int64: the reserved pool slots (None for a private copy)."""
        return None if self.table is None else self.table[self.row, :self.width]

    @property
    def count(self) -> torch.Tensor:
        """[1] int64 on the device: how many chunks are staged."""
        return self.counts[self.row:self.row + 1]

    def used(self) -> int:
        """How many chunks are staged (reads the device: for the plain-torch path)."""
        return int(self.counts[self.row].item())


Scales = tuple[torch.Tensor, torch.Tensor]  # an FP8 host tier's K and V scales [chunks, kv]


def _kernel_copy(host_keys: torch.Tensor, host_values: torch.Tensor, keys: torch.Tensor,
                 scales: Scales | None = None) -> bool:
    return (keys.is_cuda and host_keys.is_pinned() and host_values.is_pinned()
            and (scales is None or all(s.is_pinned() for s in scales)))


def chunk_rows(starts: torch.Tensor, counts: torch.Tensor, width: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunks of each row's documents, concatenated: starts/counts [R, K] (document j of
    request r owns chunks starts[r, j] + 0..counts[r, j]) -> (rows [R, width] int64, -1 past
    the request's last chunk; chunks per request [R]). Device ops only."""
    num, k = starts.shape
    ends = counts.cumsum(1)
    position = torch.arange(width, device=starts.device).expand(num, width).contiguous()
    doc = torch.searchsorted(ends, position, right=True)  # the document holding `position`
    inside = doc < k
    doc.clamp_(max=k - 1)
    rows = starts.gather(1, doc) + position - (ends - counts).gather(1, doc)
    return torch.where(inside, rows, -1), ends[:, -1].contiguous()


class StagingPool:
    def __init__(self, num_slots: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.keys = torch.zeros(num_slots, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self._free = list(range(num_slots - 1, -1, -1))
        self._owned: dict[str, list[int]] = {}
        self.overflows = 0
        self.version = 0  # bumped whenever slots are taken or given back

    @property
    def slot_size(self) -> int:
        """Device bytes of one slot."""
        return self.slot_bytes(self.keys.shape[1], self.keys.shape[2], self.keys.dtype)

    @staticmethod
    def slot_bytes(num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """One slot: a chunk's K̄ and V̄ for one layer."""
        return 2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def sized(cls, mib: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
              device: torch.device) -> StagingPool:
        slot_bytes = cls.slot_bytes(num_kv_heads, head_dim, dtype)
        return cls(max(1, mib * 2**20 // slot_bytes), num_kv_heads, head_dim, dtype, device)

    @classmethod
    def for_batch(cls, slots: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                  device: torch.device, cap_mib: int = AUTO_CAP_MIB) -> StagingPool:
        """A pool of `slots` slots (every request of a full batch at its worst case), capped
        at `cap_mib`: past that, requests beyond the pool are staged privately (logged)."""
        slot_bytes = cls.slot_bytes(num_kv_heads, head_dim, dtype)
        cap = cap_mib * 2**20 // slot_bytes
        if slots > cap:
            logger.info("MSA staging pool: a full batch at worst case needs %.0f MiB; capped "
                        "at %d MiB (set additional_config msa.staging_mib to choose)",
                        slots * slot_bytes / 2**20, cap_mib)
        pool = cls(max(1, min(slots, cap)), num_kv_heads, head_dim, dtype, device)
        logger.info("MSA staging pool: %d slots (%.0f MiB)", pool.num_slots,
                    pool.num_slots * slot_bytes / 2**20)
        return pool

    @property
    def num_slots(self) -> int:
        return self.keys.shape[0]

    @property
    def num_free(self) -> int:
        return len(self._free)

    def owners(self) -> list[str]:
        return sorted(self._owned)

    def stage_documents(self, host_keys: torch.Tensor, host_values: torch.Tensor,
                        starts: torch.Tensor, counts: torch.Tensor,
                        requests: list[tuple[str, int]], scales: Scales | None = None,
                        row_map: torch.Tensor | None = None) -> list[Staged]:
        """Stage one layer's selected documents of several requests (same bank) with one
        copy: `starts`/`counts` [R, K] from `ServedBank.selected_chunks`, `requests` the
        (owner, slots to reserve) of each row. The host never learns how many chunks routing
        chose: each request reserves its worst case, and the device writes how many it used
        (`Staged.count`), so staging queues behind routing without a host-device wait.
        `scales`: an FP8 host tier's, dequantised into the pool's dtype as it is copied.
        `row_map`: [bank chunks] device table of the host rows holding each chunk (the disk
        tier's cache, `host_cache.py`); by default chunk c is host row c."""
        widths = [width for _, width in requests]
        rows, used = chunk_rows(starts, counts, max(widths, default=0))
        if row_map is not None:
            rows = torch.where(rows >= 0, row_map[rows.clamp(min=0)], -1)
        table, private = self._reserve(requests)
        slots = upload(table, self.keys.device)
        if len(private) < len(requests):
            pooled = rows if not private else rows.index_fill(
                0, upload(private, rows.device), -1)
            self.copy_rows(host_keys, host_values, pooled.flatten(), self.keys, self.values,
                           slots.flatten(), scales)
        staged = [Staged(slots, i, width, used) for i, width in enumerate(widths)]
        for i in private:
            staged[i] = self._stage_private(host_keys, host_values, rows[i, :widths[i]], i,
                                            used, scales)
        return staged

    def stage_routed(self, host_keys: torch.Tensor, host_values: torch.Tensor, routed: Any,
                     ks: torch.Tensor, requests: list[tuple[str, int]], max_doc_chunks: int,
                     scales: Scales | None = None) -> list[Staged] | None:
        """`stage_documents` straight from routing's sort keys (`RoutedBatch`, one row per
        request; `ks` its per-request k on the device) with one kernel launch
        (`vllm_msa.kernels.stage`); None, with nothing reserved, when the requests do not all
        fit in the pool."""
        from ..kernels.stage import stage_routed

        widths = [width for _, width in requests]
        if sum(widths) > len(self._free):
            return None
        table, _ = self._reserve(requests)
        device = self.keys.device
        slots = upload(table, device)
        counts = torch.empty(len(requests), dtype=torch.int64, device=device)
        prep = routed.prep
        stage_routed(host_keys, host_values, self.keys, self.values, routed.keys, ks,
                     prep.positions_by_tiebreak, prep.bank_doc_start, slots, counts,
                     max_doc_chunks, scales)
        return [Staged(slots, i, width, counts) for i, width in enumerate(widths)]

    def _reserve(self, requests: list[tuple[str, int]]) -> tuple[np.ndarray, list[int]]:
        """Take `width` free slots for each (owner, width), in order: ([R, max width] slot
        table, -1 where nothing is reserved; the rows that did not fit)."""
        self.version += 1
        table = np.full((len(requests), max((w for _, w in requests), default=0)), -1,
                        dtype=np.int64)
        unfit = []
        for i, (owner, width) in enumerate(requests):
            if width > len(self._free):
                unfit.append(i)
                continue
            taken = self._free[len(self._free) - width:]
            del self._free[len(self._free) - width:]
            self._owned.setdefault(owner, []).extend(taken)
            table[i, :width] = taken
        return table, unfit

    def _stage_private(self, host_keys: torch.Tensor, host_values: torch.Tensor,
                       rows: torch.Tensor, row: int, counts: torch.Tensor,
                       scales: Scales | None = None) -> Staged:
        self.overflows += 1
        if self.overflows == 1:
            logger.warning(
                "MSA staging pool full (%d slots); staging outside it. Raise "
                "additional_config msa.staging_mib for steady throughput.", self.num_slots)
        keys = self.keys.new_empty((rows.numel(), *self.keys.shape[1:]))
        values = torch.empty_like(keys)
        self.copy_rows(host_keys, host_values, rows, keys, values, None, scales)
        return Staged(None, row, rows.numel(), counts, private=(keys, values))

    def reads_host_directly(self, host_keys: torch.Tensor, host_values: torch.Tensor,
                            scales: Scales | None = None) -> bool:
        """Whether staging into this pool runs the Triton kernels that read the host tier in
        place (a device pool, a pinned host tier); elsewhere torch copies."""
        return _kernel_copy(host_keys, host_values, self.keys, scales)

    @staticmethod
    def copy_rows(host_keys: torch.Tensor, host_values: torch.Tensor, rows: torch.Tensor,
                  keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor | None,
                  scales: Scales | None = None) -> None:
        """keys[slots] = host_keys[rows] (and values), skipping rows < 0 and slots < 0, on the
        current stream; an FP8 host tier (`scales`) is dequantised into keys' dtype."""
        if _kernel_copy(host_keys, host_values, keys, scales):
            from ..kernels.fetch import gather_rows

            gather_rows(host_keys, host_values, rows, keys, values, dst_rows=slots,
                        scales=scales)
            return
        keep = rows >= 0 if slots is None else (rows >= 0) & (slots >= 0)
        index = torch.nonzero(keep).flatten()  # plain-torch path: may wait for the device
        source = rows.index_select(0, index).to(host_keys.device)
        target = index if slots is None else slots.index_select(0, index)
        for i, (src, dst) in enumerate(((host_keys, keys), (host_values, values))):
            rows_of = src.index_select(0, source)
            if scales is not None:
                rows_of = dequantize(rows_of, scales[i].index_select(0, source), dst.dtype)
            dst.index_copy_(0, target, rows_of.to(dst.device))

    def read(self, staged: Staged) -> tuple[torch.Tensor, torch.Tensor]:
        """The staged K̄ and V̄, each [chunks, kv_heads, head_dim]."""
        n = staged.used()
        if staged.private is not None:
            return staged.private[0][:n], staged.private[1][:n]
        slots = staged.slots[:n]
        return self.keys.index_select(0, slots), self.values.index_select(0, slots)

    def release(self, owner: str) -> None:
        self.version += 1
        self._free.extend(self._owned.pop(owner, ()))
