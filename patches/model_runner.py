"""Feed the MSA memory runtime each step's batch from vLLM's V1 model runner.

What: wraps `GPUModelRunner._update_states` (to free finished/aborted requests' staged memory
and release preempted ones') and `GPUModelRunner._model_forward` (to hand the runtime the
batch rows — request id, extra args, block-table row, token range, computed tokens — for the
duration of the forward).
Why: the V1 runner (the CPU runner subclasses it) has no per-request model hook; Model Runner
V2 has one (`get_model_state_cls`), which the GPU path will use.
Versions: vLLM 0.32.x and 0.33.x (`_update_states`, `_model_forward`, `input_batch`,
`query_start_loc`, `requests` read as in those versions).
"""

from __future__ import annotations

import functools
from typing import Any

from . import require_vllm

_installed = False


def batch_rows(runner: Any) -> list[tuple[str, dict | None, int, int, int, int]]:
    """(req_id, extra_args, batch_index, token_start, num_tokens, first_position) per row."""
    batch = runner.input_batch
    starts = runner.query_start_loc.np
    rows = []
    for i, req_id in enumerate(batch.req_ids[: batch.num_reqs]):
        params = runner.requests[req_id].sampling_params
        extra = params.extra_args if params is not None else None
        rows.append((req_id, extra, i, int(starts[i]), int(starts[i + 1] - starts[i]),
                     int(batch.num_computed_tokens_cpu[i])))
    return rows


def install_model_runner_hook() -> None:
    global _installed
    if _installed:
        return
    require_vllm("the MSA model-runner hook")
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_msa.attention.runtime import current_runtime

    update_states = GPUModelRunner._update_states
    model_forward = GPUModelRunner._model_forward

    @functools.wraps(update_states)
    def _update_states(self, scheduler_output, *args, **kwargs):
        runtime = current_runtime()
        if runtime is not None:
            runtime.finish(scheduler_output.finished_req_ids)
            runtime.preempt(scheduler_output.preempted_req_ids or ())
        return update_states(self, scheduler_output, *args, **kwargs)

    @functools.wraps(model_forward)
    def _model_forward(self, *args, **kwargs):
        runtime = current_runtime()
        if runtime is None:
            return model_forward(self, *args, **kwargs)
        runtime.begin_step(batch_rows(self))
        try:
            return model_forward(self, *args, **kwargs)
        finally:
            runtime.end_step()

    GPUModelRunner._update_states = _update_states
    GPUModelRunner._model_forward = _model_forward
    _installed = True
