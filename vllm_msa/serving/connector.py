"""`MSAConnector`: vLLM's KV-connector channel, used to hand each request's document
selection back to the caller.

MSA engines get it automatically (`--kv-transfer-config` stays free to name it explicitly).
It moves no KV: the worker side reports the selections that router layers made in a step
(`build_connector_worker_meta`, requests with `msa_return_selection` only), the scheduler side
keeps them until the request finishes and returns them from `request_finished`, which vLLM
puts in `RequestOutput.kv_transfer_params` (offline) and in the OpenAI response's
`kv_transfer_params` (HTTP). (The same channel carries the workers' figures behind the
`vllm_msa_*` series of vLLM's `/metrics`: `metrics.py`.)

    {"msa_selection": {"bank": NAME, "layers": {"18": {"doc_ids": [...], "scores": [...]}}}}

Per layer, documents come best first (ties: smaller id), each with its document score as
msa-spec §3 defines it.
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
    SupportsHMA,
)

from ..options import SELECTION_KEY
from .metrics import MSAPromMetrics, MSAStats


@dataclass
class SelectionReport(KVConnectorWorkerMetadata):
    """req_id -> {"bank": name, "layers": {layer: {"doc_ids", "scores"}}} made this step."""

    selections: dict[str, dict[str, Any]] = field(default_factory=dict)
    taken: bool = False  # already handed to the scheduler-side connector

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        # Tensor-parallel ranks report identical selections; pipeline stages report their
        # own router layers: merge layer by layer.
        for req_id, report in getattr(other, "selections", {}).items():
            mine = self.selections.setdefault(req_id, {"bank": report["bank"], "layers": {}})
            mine["layers"].update(report["layers"])
        return self


class _NoMetadata(KVConnectorMetadata):
    pass


class MSAConnector(KVConnectorBase_V1, SupportsHMA):
    """Holds no KV, so any KV-cache grouping suits it (`SupportsHMA`): beside a user's
    connector under `MultiConnector`, vLLM's hybrid KV-cache manager stays as that connector
    allows."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self._selections: dict[str, dict[str, Any]] = {}

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        # Routing and staging run in Python between graph pieces. Decode steps can replay
        # full graphs when the GPU path supports it (set at engine set-up, see
        # patches/model_config.py: full_decode_graphs); otherwise piecewise only.
        return not (extra_config or {}).get("full_decode_graphs", False)

    # ---------------------------------------------------------------- worker side
    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        return None

    def get_kv_connector_stats(self) -> MSAStats | None:
        """This worker's `vllm_msa_*` figures since the last step (`metrics.py`)."""
        from ..attention.runtime import current_runtime

        if self._role != KVConnectorRole.WORKER:
            return None
        runtime = current_runtime()
        if runtime is None or not runtime.banks:
            return None
        worker = f"{runtime.pp_rank}.{runtime.tp_rank}"
        return MSAStats({"workers": {worker: runtime.metrics.take(runtime)}})

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> MSAStats:
        return MSAStats(data if data is not None else {"workers": {}})

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: dict, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> MSAPromMetrics:
        return MSAPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def build_connector_worker_meta(self) -> SelectionReport | None:
        from ..attention.runtime import current_runtime

        runtime = current_runtime()
        made = runtime.take_reports() if runtime is not None else {}
        return SelectionReport(made) if made else None

    # ---------------------------------------------------------------- scheduler side
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int
                                   ) -> tuple[int, bool]:
        return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any,
                                 num_external_tokens: int) -> None:
        return None

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return _NoMetadata()

    def update_connector_output(self, connector_output: Any) -> None:
        self.take_selection_reports(connector_output)

    def take_selection_reports(self, connector_output: Any) -> None:
        """Keep a step's selections until their requests finish. The MSA scheduler calls this
        before vLLM frees the step's finished requests; vLLM's own call comes later and finds
        the report already taken."""
        report = connector_output.kv_connector_worker_meta
        if isinstance(report, SelectionReport) and not report.taken:
            report.taken = True
            for req_id, selection in report.selections.items():
                kept = self._selections.setdefault(
                    req_id, {"bank": selection["bank"], "layers": {}})
                kept["layers"].update(selection["layers"])

    def request_finished(self, request: Any, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        selection = self._selections.pop(request.request_id, None)
        if selection is None:
            return False, None
        selection["layers"] = dict(sorted(selection["layers"].items(), key=lambda kv:
                                          int(kv[0])))
        return False, {SELECTION_KEY: selection}

    def request_finished_all_groups(self, request: Any, block_ids: tuple[list[int], ...]
                                    ) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished(request, block_ids[0] if block_ids else [])


def register_connectors() -> None:
    """Name our connectors in vLLM's connector registry (idempotent): `--kv-transfer-config
    '{"kv_connector": "MSAConnector"}'` then works without a module path, and vLLM's
    `MultiConnector` can rebuild `MSAConnector`'s figures by name in the front end."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    for name, module in (("MSAConnector", "vllm_msa.serving.connector"),
                         ("MSAMultiConnector", "vllm_msa.patches.multi_connector")):
        with suppress(ValueError):  # registered already (register() ran in this process)
            KVConnectorFactory.register_connector(name, module, name)

