"""The disk tier: a bank's K̄/V̄ read on demand from its files into a bounded host cache.

A bank larger than host RAM still serves when `additional_config["msa"]["host_cache_gib"]`
is set: instead of reading every document's K̄/V̄ into RAM at start, each router layer gets a
page-locked buffer of a fixed number of chunk rows, and a document's rows are read from the
bank files (memory-mapped; the page cache or the disk) the first time a request selects it
in that layer. Documents leave in least-recently-selected order when room is needed, never
one that the step being staged selected.

The fetch path is the usual one from there: the gather kernel (or the torch copy) reads the
cached rows, through a device table chunk -> cache row (`slot_table`) that staging applies
to the chunk lists. What it costs: the host must know which documents a layer selected before
it can read them, so a cached bank waits for each layer's routing (a device->host copy of the
ids) where a bank in RAM never does, and its prefill stages through the decoded-ids path.

Safe against reuse: a layer's rows are rewritten only after the host has waited for that
layer's routing, which the stream orders after every earlier copy out of those rows.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from ..bank.quant import SCALE_SUFFIX

logger = logging.getLogger(__name__)


class HostCacheTooSmall(ValueError):
    """The cache cannot hold what one step may select."""


class HostCache:
    """K̄/V̄ of one bank's router layers, for this rank's KV heads, `rows` chunks per layer."""

    def __init__(self, bank: Any, layers: list[int], kv_heads: slice, rows: int,
                 device: torch.device, pin: Any = None) -> None:
        info = bank.model_info
        heads = len(range(info.num_kv_heads)[kv_heads])
        self.bank, self.kv_heads, self.rows = bank, kv_heads, rows
        self.parts = ["keys", "values"] + (
            [f"keys{SCALE_SUFFIX}", f"values{SCALE_SUFFIX}"] if bank.dtypes.scaled("keys")
            else [])
        # Stored positions (an edited bank keeps removed documents' rows: `bank.physical`).
        offsets = np.asarray(bank.physical.doc_chunk_offsets, dtype=np.int64)
        self._starts, self._sizes = offsets[:-1], np.diff(offsets)
        self.buffers: dict[int, dict[str, torch.Tensor]] = {}
        for layer in layers:
            self.buffers[layer] = {}
            for part in self.parts:
                shape = (rows, heads) if part.endswith(SCALE_SUFFIX) else \
                    (rows, heads, info.head_dim)
                t = torch.zeros(shape, dtype=bank.stored_dtype(part))
                self.buffers[layer][part] = pin(t) if pin is not None else t
        chunks = bank.physical_chunks
        self._row_of = {layer: np.full(chunks, -1, dtype=np.int64) for layer in layers}
        self._table = {layer: torch.full((chunks,), -1, dtype=torch.int64,
                                         device=device) for layer in layers}
        self._free = {layer: list(range(rows - 1, -1, -1)) for layer in layers}
        self._resident: dict[int, OrderedDict[int, np.ndarray]] = {
            layer: OrderedDict() for layer in layers}
        self.hits = self.misses = self.evictions = self.bytes_read = 0
        self.read_seconds = 0.0

    @staticmethod
    def rows_for(bank: Any, layers: int, kv_heads: int, budget_bytes: float) -> int:
        """How many chunk rows per layer a budget of host bytes holds (K̄, V̄ and scales)."""
        per_row = 2 * kv_heads * bank.model_info.head_dim * bank.dtypes.element_bytes(
            "keys", bank.model_info.head_dim)
        return int(budget_bytes // (layers * per_row))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for parts in self.buffers.values()
                   for t in parts.values())

    def slot_table(self, layer: int) -> torch.Tensor:
        """[bank chunks] int64 on the device: each chunk's cache row, -1 if not cached."""
        return self._table[layer]

    def ensure(self, layer: int, positions: Iterable[int]) -> None:
        """Make the documents at these bank positions resident in `layer`'s rows."""
        wanted = list(dict.fromkeys(int(p) for p in positions))
        resident = self._resident[layer]
        missing = [p for p in wanted if p not in resident]
        for p in wanted:
            if p in resident:
                resident.move_to_end(p)
        self.hits += len(wanted) - len(missing)
        self.misses += len(missing)
        if not missing:
            return
        need = int(self._sizes[missing].sum())
        if need > self.rows:
            raise HostCacheTooSmall(f"one step selected {need} chunks in layer {layer}; the "
                                    f"host cache holds {self.rows}")
        free, keep = self._free[layer], set(wanted)
        changed_chunks, changed_rows = [], []
        while len(free) < need:  # least recently selected first, never this step's
            victim = next(p for p in resident if p not in keep)
            rows = resident.pop(victim)
            self.evictions += 1
            free.extend(rows.tolist())
            chunks = np.arange(self._starts[victim], self._starts[victim] + rows.size)
            self._row_of[layer][chunks] = -1
            changed_chunks.append(chunks)
            changed_rows.append(np.full(rows.size, -1, dtype=np.int64))
        started = time.perf_counter()
        ranges = [(int(self._starts[p]), int(self._starts[p] + self._sizes[p])) for p in missing]
        rows = np.asarray([free.pop() for _ in range(need)], dtype=np.int64)
        index = torch.from_numpy(rows)
        for part in self.parts:
            data = self.bank.read_ranges(layer, part, ranges, self.kv_heads)
            target = self.buffers[layer][part]
            if data.element_size() == 1:  # (torch has no index_copy_ for FP8: copy the bytes)
                target, data = target.view(torch.uint8), data.view(torch.uint8)
            target.index_copy_(0, index, data)
            self.bytes_read += data.numel() * data.element_size()
        self.read_seconds += time.perf_counter() - started
        at = 0
        for p, (lo, hi) in zip(missing, ranges, strict=True):
            resident[p] = rows[at:at + hi - lo]
            self._row_of[layer][lo:hi] = resident[p]
            changed_chunks.append(np.arange(lo, hi))
            changed_rows.append(resident[p])
            at += hi - lo
        table = self._table[layer]
        chunks = torch.from_numpy(np.concatenate(changed_chunks)).to(table.device)
        table.index_copy_(0, chunks, torch.from_numpy(np.concatenate(changed_rows)).to(
            table.device))

    def grow(self, bank: Any) -> None:
        """Serve `bank`, this bank with documents appended after the stored ones (a live
        add): their chunks are known, not cached, and read from its files when selected."""
        offsets = np.asarray(bank.physical.doc_chunk_offsets, dtype=np.int64)
        more = int(offsets[-1]) - self._row_of[next(iter(self._row_of))].size \
            if self._row_of else 0
        self.bank = bank
        self._starts, self._sizes = offsets[:-1], np.diff(offsets)
        for layer in self._row_of:
            self._row_of[layer] = np.concatenate(
                [self._row_of[layer], np.full(more, -1, dtype=np.int64)])
            table = self._table[layer]
            self._table[layer] = torch.cat([table, table.new_full((more,), -1)])

    def stats(self) -> dict[str, Any]:
        """Hit rate (documents found per layer selection) and the disk tier's read rate."""
        looked = self.hits + self.misses
        return {"rows_per_layer": self.rows, "bytes": self.nbytes, "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions,
                "hit_rate": self.hits / looked if looked else None,
                "bytes_read": self.bytes_read, "read_seconds": self.read_seconds,
                "read_bytes_per_s": self.bytes_read / self.read_seconds
                if self.read_seconds else None}
