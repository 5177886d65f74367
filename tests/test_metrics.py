"""The `vllm_msa_*` series' bookkeeping (vllm_msa/serving/metrics.py) with prometheus_client's
own classes, as vLLM hands them over: workers merged within a step and steps over an
interval, each figure counted by the ranks that own it. (tests/test_http.py reads the series
from a real server's /metrics.)"""

from __future__ import annotations

import functools
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from vllm_msa.serving.metrics import MSAPromMetrics, MSAStats


def figures(requests=0, documents=0, fetched=0, routing=(), rescored=None, in_use=0,
            overflows=0, index=100):
    return {"requests": {"kb": requests}, "documents": {"kb": documents},
            "routing_seconds": list(routing), "fetched_bytes": {"kb": fetched},
            "rescored_documents": rescored or {}, "staging_overflows": overflows,
            "staging_in_use_bytes": in_use, "bank_gpu_index_bytes": {"kb": index},
            "bank_host_bytes": {"kb": 2 * index}}


def test_workers_merge_and_steps_add_up():
    step = MSAStats({"workers": {"0.0": figures(1, 4, 10, [0.1])}})
    step.aggregate(MSAStats({"workers": {"0.1": figures(1, 4, 12, [0.1])}}))
    step.aggregate(MSAStats({"workers": {"0.0": figures(0, 4, 5, [0.2], in_use=7)}}))
    workers = step.data["workers"]
    assert workers["0.0"]["documents"] == {"kb": 8} and workers["0.0"]["fetched_bytes"] == {
        "kb": 15}
    assert workers["0.0"]["routing_seconds"] == [0.1, 0.2]
    assert workers["0.0"]["staging_in_use_bytes"] == 7  # a gauge: the last value
    assert step.reduce() == {"msa_requests": 1, "msa_documents": 8,
                             "msa_routing_ms_mean": 150.0, "msa_fetched_MiB": round(27 / 2**20,
                                                                                   3)}
    assert not step.is_empty() and MSAStats({"workers": {}}).is_empty()


def test_each_figure_is_counted_by_the_ranks_that_own_it():
    registry = CollectorRegistry()
    types = {cls: functools.partial(cls, registry=registry)
             for cls in (Counter, Gauge, Histogram)}
    config = SimpleNamespace(kv_transfer_config=None)  # (what the base class keeps of it)
    prom = MSAPromMetrics(config, types, ["model_name", "engine"], {0: ["m", 0]})
    # PP stage 0 (ranks 0.0, 0.1) and stage 1 (1.0): TP ranks route the same requests.
    prom.observe({"workers": {
        "0.0": figures(2, 8, 100, [0.01], rescored={"kb": 3}, overflows=1, in_use=5),
        "0.1": figures(2, 8, 100, [0.01], rescored={"kb": 4}),
        "1.0": figures(2, 6, 50, [0.02]),
    }})

    def value(name, **labels):
        return registry.get_sample_value(name, {"model_name": "m", "engine": "0", **labels})

    assert value("vllm_msa_memory_requests_total", bank="kb") == 2
    assert value("vllm_msa_documents_selected_total", bank="kb") == 14
    assert value("vllm_msa_fetched_bytes_total", bank="kb") == 250
    assert value("vllm_msa_routing_seconds_count") == 2
    assert value("vllm_msa_rescored_documents_total", bank="kb", rank="0.1") == 4
    assert value("vllm_msa_staging_overflows_total", rank="0.0") == 1
    assert value("vllm_msa_staging_in_use_bytes", rank="0.0") == 5
    assert value("vllm_msa_bank_host_bytes", bank="kb", rank="1.0") == 200
