"""What a worker's runtime did since vLLM last asked: the figures behind the `vllm_msa_*`
Prometheus series (`vllm_msa/serving/metrics.py`), taken once a step by the KV connector.

Counting must not make the host wait for the device: the chunks staged per step are known
only on the device, so they are summed there and read one step late (a non-blocking copy to
pinned memory that the next step's sync has completed).
"""

from __future__ import annotations

import collections
from typing import Any

import torch


class LaggingTotal:
    """A running int64 total on the device, read on the host one read late without a wait."""

    def __init__(self, device: torch.device) -> None:
        self.total = torch.zeros((), dtype=torch.int64, device=device)
        self._pinned = (torch.zeros((), dtype=torch.int64).pin_memory()
                        if device.type == "cuda" else None)

    def add(self, values: torch.Tensor) -> None:
        self.total += values.sum()

    def settle(self) -> int:
        """The total now (waits for the device), and the next `read`'s answer."""
        if self._pinned is None:
            return int(self.total)
        self._pinned.copy_(self.total)
        return int(self._pinned)

    def read(self) -> int:
        """The total as of the previous read (on a CPU device: as of now)."""
        if self._pinned is None:
            return int(self.total)
        seen = int(self._pinned)  # the copy the last read queued has finished since
        self._pinned.copy_(self.total, non_blocking=True)
        return seen


class StepMetrics:
    """Per bank: requests that started reading it, documents selected, chunks staged to the
    device; each step's routing host time. `take` hands over everything since the last one."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.requests: collections.Counter[str] = collections.Counter()
        self.documents: collections.Counter[str] = collections.Counter()
        self.routing_seconds: list[float] = []
        self._step_routing = 0.0
        self._staged: dict[str, LaggingTotal] = {}
        self._staged_seen: collections.Counter[str] = collections.Counter()
        self._rescored_seen: collections.Counter[str] = collections.Counter()
        self._overflows_seen = 0
        self._tier_bytes: dict[str, dict[str, int]] = {}

    def request(self, bank: str) -> None:
        self.requests[bank] += 1

    def routed(self, bank: str, documents: int, seconds: float) -> None:
        self.documents[bank] += documents
        self._step_routing += seconds

    def staged(self, bank: str, counts: torch.Tensor) -> None:
        """`counts`: [R] chunks staged per request, on the device."""
        total = self._staged.get(bank)
        if total is None:
            total = self._staged[bank] = LaggingTotal(self.device)
        total.add(counts)

    def end_step(self) -> None:
        if self._step_routing:
            self.routing_seconds.append(self._step_routing)
            self._step_routing = 0.0

    def baseline(self, runtime: Any) -> None:
        """Count from here: what start-up did (the kernel warm-up's routing) is not served
        work."""
        self.requests.clear()
        self.documents.clear()
        self.routing_seconds, self._step_routing = [], 0.0
        for name, total in self._staged.items():
            self._staged_seen[name] = total.settle()
        for name, bank in runtime.banks.items():
            stats = bank.rescore_stats()
            self._rescored_seen[name] = stats["candidates"] if stats else 0
        self._overflows_seen = runtime.pool.overflows
        # Fixed once the banks are loaded: not summed again on every (decode) step.
        self._tier_bytes = {
            "bank_gpu_index_bytes": {n: b.index_bytes for n, b in runtime.banks.items()},
            "bank_host_bytes": {n: b.host_bytes for n, b in runtime.banks.items()},
        }

    def take(self, runtime: Any) -> dict[str, Any]:
        """This worker's figures since the last call (counters as increments, gauges as
        they stand), JSON-shaped for vLLM's stats channel."""
        banks = runtime.banks
        staged = {}
        for name, total in self._staged.items():
            chunks = total.read()
            staged[name] = (chunks - self._staged_seen[name]) * banks[name].host_row_bytes
            self._staged_seen[name] = chunks
        rescored = {}
        for name, bank in banks.items():
            stats = bank.rescore_stats()
            if stats is not None:
                rescored[name] = stats["candidates"] - self._rescored_seen[name]
                self._rescored_seen[name] = stats["candidates"]
        pool = runtime.pool
        figures = {
            "requests": dict(self.requests), "documents": dict(self.documents),
            "routing_seconds": self.routing_seconds, "fetched_bytes": staged,
            "rescored_documents": rescored,
            "staging_overflows": pool.overflows - self._overflows_seen,
            "staging_in_use_bytes": (pool.num_slots - pool.num_free) * pool.slot_size,
            **self._tier_bytes,
        }
        self._overflows_seen = pool.overflows
        self.requests.clear()
        self.documents.clear()
        self.routing_seconds = []
        return figures
