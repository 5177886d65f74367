"""`MSAMultiConnector`: MSA's selection channel beside the KV connector a deployment already
runs (LMCache, vLLM's offloading connectors, NIXL, ...).

What: a subclass of vLLM's `MultiConnector` over [`MSAConnector`, the user's connectors]
(set up by `model_config.use_selection_connector` when `--kv-transfer-config` names another
connector). It overrides the scheduler-side calls so that the user's connectors never see a
memory request (nor a live add's encode request): they are never asked for its KV, never
told of its blocks, and the scheduler output they build their step's metadata from leaves it
out, so they neither load nor store its KV. `MSAConnector` sees every request. Plain requests
go through the user's connectors exactly as with `MultiConnector`.
Why: a memory request's KV after the template head depends on its bank, the bank's
generation and the documents it selected. A connector keyed by tokens (vLLM's shared-storage
`ExampleConnector`) would hand one selection's KV to another request with the same tokens;
one keyed by block hashes would only ever miss (the salt is the request's own) while filling
its store. Either way a KV block computed under one selection must never be loaded for
another, and the user's connector cannot know which selection a block was computed under.
Versions: vLLM 0.32.x and 0.33.x (`MultiConnector` and its `_connectors`,
`_requests_to_connector`, `_extra_async_saves`; `SchedulerOutput` and `CachedRequestData`
fields).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.multi_connector import (
    MultiConnector,
    MultiKVConnectorMetadata,
    MultiKVConnectorWorkerMetadata,
)

from vllm_msa.attention.capture import ENCODE_KEY
from vllm_msa.options import SPAN_KEY

from . import require_vllm

require_vllm("the MSA multi-connector")

CLASS_NAME = "MSAMultiConnector"
MODULE = "vllm_msa.patches.multi_connector"


def is_memory_request(request: Any) -> bool:
    """Admitted with a bank (its routing span resolved) or an encode request of a live add."""
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    return SPAN_KEY in extra or ENCODE_KEY in extra


def without_requests(output: Any, hidden: set[str]) -> Any:
    """`output` (a `SchedulerOutput`) as if the `hidden` requests did not exist."""
    if not hidden:
        return output
    cached = output.scheduled_cached_reqs
    keep = [i for i, r in enumerate(cached.req_ids) if r not in hidden]
    if len(keep) < len(cached.req_ids):
        def pick(values: list) -> list:
            return [values[i] for i in keep] if values else values

        cached = replace(
            cached, req_ids=pick(cached.req_ids),
            resumed_req_ids={r for r in cached.resumed_req_ids if r not in hidden},
            new_token_ids=pick(cached.new_token_ids),
            all_token_ids={r: t for r, t in cached.all_token_ids.items() if r not in hidden},
            new_block_ids=pick(cached.new_block_ids),
            num_computed_tokens=pick(cached.num_computed_tokens),
            num_output_tokens=pick(cached.num_output_tokens))
    tokens = {r: n for r, n in output.num_scheduled_tokens.items() if r not in hidden}
    changes: dict[str, Any] = dict(
        scheduled_new_reqs=[r for r in output.scheduled_new_reqs if r.req_id not in hidden],
        scheduled_cached_reqs=cached, num_scheduled_tokens=tokens,
        total_num_scheduled_tokens=sum(tokens.values()),
        scheduled_spec_decode_tokens={r: t for r, t in output.scheduled_spec_decode_tokens.items()
                                      if r not in hidden},
        scheduled_encoder_inputs={r: t for r, t in output.scheduled_encoder_inputs.items()
                                  if r not in hidden},
        finished_req_ids=output.finished_req_ids - hidden)
    if output.preempted_req_ids is not None:
        changes["preempted_req_ids"] = output.preempted_req_ids - hidden
    state = getattr(output, "kv_connector_block_state", None)
    if state is not None:
        changes["kv_connector_block_state"] = replace(
            state, req_ids=state.req_ids - hidden,
            boundary_state_offloads={r: v for r, v in state.boundary_state_offloads.items()
                                     if r not in hidden})
    return replace(output, **changes)


class MSAMultiConnector(MultiConnector):
    """vLLM's `MultiConnector` whose first connector is `MSAConnector` and whose others never
    see memory requests (module docstring)."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self._memory: set[str] = set()  # memory requests the scheduler holds
        self._finished_memory: set[str] = set()  # freed since the last step's metadata

    @property
    def selection_connector(self) -> Any:
        return self._connectors[0]

    def _note(self, request: Any) -> bool:
        if request.request_id in self._memory:
            return True
        if is_memory_request(request):
            self._memory.add(request.request_id)
            return True
        return False

    # ---------------------------------------------------------------- scheduler side
    def on_new_request(self, request: Any) -> None:
        if self._note(request):
            self.selection_connector.on_new_request(request)
        else:
            super().on_new_request(request)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        if self._note(request):  # never KV from the user's connectors
            return self.selection_connector.get_num_new_matched_tokens(request,
                                                                        num_computed_tokens)
        return super().get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any,
                                 num_external_tokens: int) -> None:
        if self._note(request):
            self.selection_connector.update_state_after_alloc(request, blocks, 0)
        else:
            super().update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> MultiKVConnectorMetadata:
        hidden = self._memory | self._finished_memory
        self._finished_memory = set()
        view = without_requests(scheduler_output, hidden)
        first, *others = self._connectors
        metadata = MultiKVConnectorMetadata(metadata=(
            first.build_connector_meta(scheduler_output),
            *(c.build_connector_meta(view) for c in others)))
        if self._extra_async_saves:
            metadata.extra_async_saves = self._extra_async_saves
            self._extra_async_saves = {}
        return metadata

    def take_selection_reports(self, connector_output: Any) -> None:
        """`MSAConnector.take_selection_reports` with this step's report for it (the MSA
        scheduler calls it before vLLM frees finished requests: patches/scheduler.py)."""
        meta = connector_output.kv_connector_worker_meta
        if not isinstance(meta, MultiKVConnectorWorkerMetadata):
            return
        try:
            connector_output.kv_connector_worker_meta = meta.metadata[0]
            self.selection_connector.take_selection_reports(connector_output)
        finally:
            connector_output.kv_connector_worker_meta = meta

    def _memory_finished(self, request: Any, blocks: Any) -> tuple[bool, dict | None]:
        self._memory.discard(request.request_id)
        self._finished_memory.add(request.request_id)
        self._requests_to_connector.pop(request.request_id, None)
        return self.selection_connector.request_finished(request, blocks)

    def request_finished(self, request: Any, blocks: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        if self._note(request):
            return self._memory_finished(request, blocks)
        return super().request_finished(request, blocks)

    def request_finished_all_groups(self, request: Any, block_ids: tuple[list[int], ...]
                                    ) -> tuple[bool, dict[str, Any] | None]:
        if self._note(request):
            return self._memory_finished(request, block_ids[0])
        return super().request_finished_all_groups(request, block_ids)

    def register_finished_partial_tail(self, request: Any, block_ids: Any,
                                       partial_tail_offloads: Any) -> bool:
        if self._note(request):
            return False
        return super().register_finished_partial_tail(request, block_ids,
                                                      partial_tail_offloads)
