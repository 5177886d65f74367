"""The device staging pool: where the selected documents' K̄/V̄ live while a request runs.

Sized once at start (`staging_mib`), in slots of one chunk's K̄ and V̄ for one layer. A request
takes slots when a router layer selects its documents and gives all of them back when it
finishes, is aborted or is preempted. A request that does not fit in what is free gets a
private allocation instead (logged): slower to manage, never wrong.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


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

    @classmethod
    def sized(cls, mib: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
              device: torch.device) -> StagingPool:
        slot_bytes = 2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        return cls(max(1, mib * 2**20 // slot_bytes), num_kv_heads, head_dim, dtype, device)

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
        n = chunks.numel()
        device = self.keys.device
        k_src = host_keys.index_select(0, chunks)
        v_src = host_values.index_select(0, chunks)
        if n > len(self._free):
            self.overflows += 1
            if self.overflows == 1:
                logger.warning(
                    "MSA staging pool full (%d slots); staging outside it. Raise "
                    "additional_config msa.staging_mib for steady throughput.", self.num_slots)
            return Staged(private=(k_src.to(device), v_src.to(device)))
        slots = [self._free.pop() for _ in range(n)]
        self._owned.setdefault(owner, []).extend(slots)
        index = torch.tensor(slots, dtype=torch.int64, device=device)
        self.keys.index_copy_(0, index, k_src.to(device, non_blocking=True))
        self.values.index_copy_(0, index, v_src.to(device, non_blocking=True))
        return Staged(slots=index)

    def read(self, staged: Staged) -> tuple[torch.Tensor, torch.Tensor]:
        """The staged K̄ and V̄, each [chunks, kv_heads, head_dim]."""
        if staged.private is not None:
            return staged.private
        return self.keys.index_select(0, staged.slots), self.values.index_select(0, staged.slots)

    def release(self, owner: str) -> None:
        self._free.extend(self._owned.pop(owner, ()))
