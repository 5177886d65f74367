"""Feed the MSA memory runtime each step's batch from vLLM's V1 model runner.

What: wraps `GPUModelRunner._update_states` (to free finished/aborted requests' staged memory
and release preempted ones', and to note whether the step routes or stages),
`CudagraphDispatcher.dispatch` (such a step must not replay a full CUDA graph: FULL becomes an
invalid mode for it) and `GPUModelRunner._model_forward` (to hand the runtime the batch rows —
request id, extra args, block-table row, token range, computed tokens — for the duration of
the forward, fill the full-graph buffers and add the RoPE offset to the runner's positions
buffer in place, which full graphs read).
Why: the V1 runner (the CPU runner subclasses it) has no per-request model hook; Model Runner
V2 has one (`get_model_state_cls`), which the GPU path will use.
Versions: vLLM 0.32.x and 0.33.x (`_update_states`, `_model_forward`, `input_batch`,
`query_start_loc`, `requests`, `CudagraphDispatcher.dispatch(..., invalid_modes=)` and the
forward context's `cudagraph_runtime_mode` as in those versions).
"""

from __future__ import annotations

import functools
import os
from typing import Any

from . import require_vllm

_installed = False


def batch_requests(runner: Any) -> list[tuple[str, dict | None]]:
    """(req_id, extra_args) of the step's requests, in batch order (known once
    `_update_states` ran)."""
    batch = runner.input_batch
    out = []
    for req_id in batch.req_ids[: batch.num_reqs]:
        params = runner.requests[req_id].sampling_params
        out.append((req_id, params.extra_args if params is not None else None))
    return out


def batch_rows(runner: Any) -> list[tuple[str, dict | None, int, int, int, int]]:
    """(req_id, extra_args, batch_index, token_start, num_tokens, first_position) per row."""
    starts = runner.query_start_loc.np
    computed = runner.input_batch.num_computed_tokens_cpu
    return [(req_id, extra, i, int(starts[i]), int(starts[i + 1] - starts[i]), int(computed[i]))
            for i, (req_id, extra) in enumerate(batch_requests(runner))]


def batch_key(runner: Any) -> tuple[tuple[str, ...], bytes]:
    """What identifies a step's batch layout for the runtime's steady-decode shortcut: its
    request ids in order and their token offsets (C-speed copies, no per-request Python)."""
    batch = runner.input_batch
    n = batch.num_reqs
    return tuple(batch.req_ids[:n]), runner.query_start_loc.np[: n + 1].tobytes()


def install_model_runner_hook() -> None:
    global _installed
    if _installed:
        return
    require_vllm("the MSA model-runner hook")
    from vllm.config import CUDAGraphMode
    from vllm.forward_context import get_forward_context
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_msa.attention.runtime import current_runtime

    update_states = GPUModelRunner._update_states
    model_forward = GPUModelRunner._model_forward
    dispatch = CudagraphDispatcher.dispatch

    @functools.wraps(update_states)
    def _update_states(self, scheduler_output, *args, **kwargs):
        runtime = current_runtime()
        if runtime is not None:
            runtime.finish(scheduler_output.finished_req_ids)
            runtime.preempt(scheduler_output.preempted_req_ids or ())
        result = update_states(self, scheduler_output, *args, **kwargs)
        if runtime is not None and runtime.graphs is not None:
            batch = self.input_batch
            runtime.eager_step = not runtime.all_settled(batch.req_ids[: batch.num_reqs]) \
                and runtime.needs_eager_step(batch_requests(self))
        return result

    @functools.wraps(dispatch)
    def _dispatch(self, *args, invalid_modes=None, **kwargs):
        runtime = current_runtime()
        if runtime is not None and (runtime.eager_step or os.environ.get(
                "VLLM_MSA_DECODE_GRAPHS") == "piecewise"):  # the env: a switch for tests
            invalid_modes = {*(invalid_modes or ()), CUDAGraphMode.FULL}
        return dispatch(self, *args, invalid_modes=invalid_modes, **kwargs)

    @functools.wraps(model_forward)
    def _model_forward(self, *args, **kwargs):
        runtime = current_runtime()
        if runtime is None:
            return model_forward(self, *args, **kwargs)
        mode = get_forward_context().cudagraph_runtime_mode
        full = mode == CUDAGraphMode.FULL
        runtime.begin_step(lambda: batch_rows(self), full_graph=full,
                           batch_key=batch_key(self) if full else None)
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        if positions is not None:  # in place: full graphs read the runner's buffer
            runtime.offset_positions(positions)
        try:
            return model_forward(self, *args, **kwargs)
        finally:
            runtime.end_step()
            runtime.eager_step = False

    GPUModelRunner._update_states = _update_states
    GPUModelRunner._model_forward = _model_forward
    CudagraphDispatcher.dispatch = _dispatch
    _installed = True
