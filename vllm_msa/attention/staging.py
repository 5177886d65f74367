"""The device staging pool: where the selected documents' K̄/V̄ live while a request runs.

Sized once at start, in slots of one chunk's K̄ and V̄ for one layer: by default for a full
batch (`max_num_seqs` requests x router layers x the top-k largest documents' chunks), or
`staging_mib`. A request
takes slots when a router layer selects its documents and gives all of them back when it
finishes, is aborted or is preempted. A request that does not fit in what is free gets a
private allocation instead (logged): slower to manage, never wrong.

On a GPU with pinned host K̄/V̄ the selected rows move with one Triton launch per layer that
reads host memory directly (`vllm_msa.kernels.fetch.gather_rows`: ~0.9x the pinned copy
bandwidth at batch, where a copy per document is launch-bound); elsewhere with torch copies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

AUTO_CAP_MIB = 4096  # the default pool's ceiling (a full batch at worst case, up to this)


@dataclass(frozen=True)
class Staged:
    """Where one request's memory for one layer sits: pool slots, or a private copy."""

    slots: torch.Tensor | None = None  # [chunks] int64 on the device
    private: tuple[torch.Tensor, torch.Tensor] | None = None


class StagingPool:
    def __init__(self, num_slots: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.keys = torch.zeros(num_slots, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self._free = list(range(num_slots - 1, -1, -1))
        self._owned: dict[str, list[int]] = {}
        self.overflows = 0
        self.version = 0  # bumped whenever slots are taken or given back

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

    def stage(self, owner: str, host_keys: torch.Tensor, host_values: torch.Tensor,
              chunks: torch.Tensor) -> Staged:
        """Copy host chunks `chunks` into slots owned by `owner`."""
        return self.stage_many(host_keys, host_values, [(owner, chunks)])[0]

    def stage_many(self, host_keys: torch.Tensor, host_values: torch.Tensor,
                   requests: list[tuple[str, torch.Tensor]]) -> list[Staged]:
        """Stage several requests' chunks of one layer (same host tensors) with one copy:
        a host->device gather moves a whole step's selections at once far faster than one
        small copy per request."""
        self.version += 1
        staged: list[Staged | None] = [None] * len(requests)
        rows, slots, spans = [], [], []
        for i, (owner, chunks) in enumerate(requests):
            n = chunks.numel()
            if n > len(self._free):
                staged[i] = self._stage_private(host_keys, host_values, chunks)
                continue
            taken = [self._free.pop() for _ in range(n)]
            self._owned.setdefault(owner, []).extend(taken)
            spans.append((i, len(slots), len(slots) + n))
            rows.append(chunks)
            slots.extend(taken)
        if spans:
            index = torch.tensor(slots, dtype=torch.int64, device=self.keys.device)
            self._copy(host_keys, host_values, torch.cat(rows), self.keys, self.values, index)
            for i, a, b in spans:
                staged[i] = Staged(slots=index[a:b])
        return staged  # type: ignore[return-value]

    def _stage_private(self, host_keys: torch.Tensor, host_values: torch.Tensor,
                       chunks: torch.Tensor) -> Staged:
        self.overflows += 1
        if self.overflows == 1:
            logger.warning(
                "MSA staging pool full (%d slots); staging outside it. Raise "
                "additional_config msa.staging_mib for steady throughput.", self.num_slots)
        keys = self.keys.new_empty((chunks.numel(), *self.keys.shape[1:]))
        values = torch.empty_like(keys)
        self._copy(host_keys, host_values, chunks, keys, values, None)
        return Staged(private=(keys, values))

    @staticmethod
    def _copy(host_keys: torch.Tensor, host_values: torch.Tensor, chunks: torch.Tensor,
              keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor | None) -> None:
        """keys[slots] = host_keys[chunks] (and values), on the current stream."""
        if keys.is_cuda and host_keys.is_pinned() and host_values.is_pinned():
            from ..kernels.fetch import gather_rows

            gather_rows(host_keys, host_values, chunks, keys, values, dst_rows=slots)
            return
        for src, dst in ((host_keys, keys), (host_values, values)):
            rows = src.index_select(0, chunks).to(dst.device, non_blocking=True)
            if slots is None:
                dst.copy_(rows)
            else:
                dst.index_copy_(0, slots, rows)

    def read(self, staged: Staged) -> tuple[torch.Tensor, torch.Tensor]:
        """The staged K̄ and V̄, each [chunks, kv_heads, head_dim]."""
        if staged.private is not None:
            return staged.private
        return self.keys.index_select(0, staged.slots), self.values.index_select(0, staged.slots)

    def release(self, owner: str) -> None:
        self.version += 1
        self._free.extend(self._owned.pop(owner, ()))
