"""MSA's series on vLLM's Prometheus endpoint (`/metrics`), carried by the KV connector's
stats channel: each worker's `MSAConnector.get_kv_connector_stats` hands vLLM its runtime's
figures of the last step (`attention/step_metrics.py`); vLLM merges the workers' (`aggregate`),
ships them with the scheduler's stats to the API server, and calls `MSAPromMetrics.observe`
there. No side channel, no file.

The series (`COUNTERS`, `GAUGES`, `vllm_msa_routing_seconds`) are listed with their labels
in docs/metrics.md. `rank` is "PP.TP" (pipeline stage, tensor-parallel rank). Requests count
on the first worker; documents and routing time on each pipeline stage's first
tensor-parallel rank (the other ranks route the same requests); bytes on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

ROUTING_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
                   5.0]
COUNTERS = {  # name -> (figure, extra labels, documentation)
    "vllm_msa_memory_requests_total": ("requests", ("bank",), "Requests that read a bank."),
    "vllm_msa_documents_selected_total": (
        "documents", ("bank",), "Documents selected, summed over the router layers."),
    "vllm_msa_fetched_bytes_total": (
        "fetched_bytes", ("bank",), "Pooled K/V bytes staged from host memory to the GPU."),
    "vllm_msa_rescored_documents_total": (
        "rescored_documents", ("bank", "rank"),
        "Documents an 8-bit routing index re-scored from full-precision keys."),
    "vllm_msa_staging_overflows_total": (
        "staging_overflows", ("rank",), "Staging requests the staging pool could not hold."),
}
GAUGES = {
    "vllm_msa_staging_in_use_bytes": (
        "staging_in_use_bytes", ("rank",), "Staging-pool bytes reserved by requests."),
    "vllm_msa_bank_gpu_index_bytes": (
        "bank_gpu_index_bytes", ("bank", "rank"), "A bank's routing index on the rank's GPU."),
    "vllm_msa_bank_host_bytes": (
        "bank_host_bytes", ("bank", "rank"), "A bank's pooled K/V in host memory for the rank."),
}
# Who counts what (`worker` is "PP.TP"): every tensor-parallel rank routes the same requests.
COUNTED_BY = {"requests": lambda w: w == "0.0",
              "documents": lambda w: w.endswith(".0"),
              "routing_seconds": lambda w: w.endswith(".0")}


@dataclass
class MSAStats(KVConnectorStats):
    """{"workers": {"PP.TP": figures}}: one step's (or, in vLLM's log interval, several
    steps') figures per worker."""

    def reset(self) -> None:
        self.data = {"workers": {}}

    def is_empty(self) -> bool:
        return not self.data.get("workers")

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        """Workers of one step side by side; a worker's later steps added to its earlier
        ones (counters summed, routing times appended, gauges as last reported)."""
        mine = self.data.setdefault("workers", {})
        for worker, figures in other.data.get("workers", {}).items():
            if worker not in mine:
                mine[worker] = figures
                continue
            kept = mine[worker]
            for key, value in figures.items():
                if key in GAUGE_FIGURES:
                    kept[key] = value
                elif key == "routing_seconds":
                    kept[key] = [*kept.get(key, []), *value]
                elif isinstance(value, dict):
                    merged = dict(kept.get(key, {}))
                    for name, n in value.items():
                        merged[name] = merged.get(name, 0) + n
                    kept[key] = merged
                else:
                    kept[key] = kept.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        """The log line's summary (vLLM's periodic "KV Transfer metrics")."""
        workers = self.data.get("workers", {})
        times = [t for w, f in workers.items() if COUNTED_BY["routing_seconds"](w)
                 for t in f.get("routing_seconds", [])]
        return {
            "msa_requests": sum(sum(f.get("requests", {}).values())
                                for w, f in workers.items() if COUNTED_BY["requests"](w)),
            "msa_documents": sum(sum(f.get("documents", {}).values())
                                 for w, f in workers.items() if COUNTED_BY["documents"](w)),
            "msa_routing_ms_mean": round(1e3 * sum(times) / len(times), 3) if times else 0.0,
            "msa_fetched_MiB": round(sum(sum(f.get("fetched_bytes", {}).values())
                                         for f in workers.values()) / 2**20, 3),
        }


GAUGE_FIGURES = {figure for figure, _, _ in GAUGES.values()}


class MSAPromMetrics(KVConnectorPromMetrics):
    """Registers the `vllm_msa_*` series with vLLM's metric classes and records each step's
    figures."""

    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters = {name: (figure, self._counter_cls(
            name=name, documentation=doc, labelnames=[*labelnames, *extra]))
            for name, (figure, extra, doc) in COUNTERS.items()}
        self.gauges = {name: (figure, self._gauge_cls(
            name=name, documentation=doc, labelnames=[*labelnames, *extra],
            multiprocess_mode="mostrecent"))
            for name, (figure, extra, doc) in GAUGES.items()}
        self.routing = self._histogram_cls(
            name="vllm_msa_routing_seconds", documentation="Host time of one step's "
            "routing over all its router layers (steps that route).",
            buckets=ROUTING_BUCKETS, labelnames=list(labelnames))

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        base = [str(v) for v in self.per_engine_labelvalues[engine_idx]]
        for worker, figures in transfer_stats_data.get("workers", {}).items():
            for name, (figure, metric) in self.counters.items():
                counted = COUNTED_BY.get(figure)
                if counted is not None and not counted(worker):
                    continue
                for labels, value in _series(figures.get(figure), worker, name):
                    metric.labels(*base, *labels).inc(value)  # (0 too: the series exists)
            for name, (figure, metric) in self.gauges.items():
                for labels, value in _series(figures.get(figure), worker, name):
                    metric.labels(*base, *labels).set(value)
            if COUNTED_BY["routing_seconds"](worker):
                for seconds in figures.get("routing_seconds", []):
                    self.routing.labels(*base).observe(seconds)


def _series(value: Any, worker: str, name: str) -> list[tuple[tuple[str, ...], float]]:
    """(extra label values, value) of one figure: per bank where it is a dict, with the
    worker as `rank` where the series has one."""
    extra = (COUNTERS.get(name) or GAUGES[name])[1]
    if value is None:
        return []
    rank = (worker,) if "rank" in extra else ()
    if isinstance(value, dict):
        return [((bank, *rank), v) for bank, v in value.items()]
    return [(rank, value)]
