"""Never split an MSA request's prefill inside its routing span; hand each step's document
selections to the connector before that step's finished requests are released.

What: scheduler subclasses whose `_reserve_prefill_lookahead` (the hook both the running and
the waiting paths of `Scheduler.schedule` call on every prefill chunk, where 0 means "not this
step") also refuses a chunk that starts before the end of a request's routing span and ends
inside it. The request then waits for a step with enough token budget, as it would with
chunked prefill off. The front end refuses spans longer than the per-step budget, so every
request is eventually scheduled.
Why: routing needs the routing query of every span token, and every span token already
attends to the selected memory (msa-spec §3), so the span is computed in one step.

Also: `update_from_output` first gives the step's worker reports to `MSAConnector`. vLLM frees
requests that finish in a step (calling the connector's `request_finished`, which returns the
selection) before it passes the step's connector output on; a request routed and finished in
the same step (one generated token) would otherwise come back without its selection.
Versions: vLLM 0.32.x and 0.33.x (`Scheduler._reserve_prefill_lookahead`,
`Scheduler.update_from_output` freeing finished requests before `_update_from_kv_xfer_finished`).
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from . import require_vllm

require_vllm("the MSA scheduler")


def routing_span_end(request: Any) -> int | None:
    params = request.sampling_params
    extra = params.extra_args if params is not None else None
    if not extra or "msa_span" not in extra:
        return None
    return int(extra["msa_span"][-1][1])  # sorted [start, end) routing ranges


class _MSASchedulerMixin:
    def update_from_output(self, scheduler_output, model_runner_output):
        output = model_runner_output.kv_connector_output
        take = getattr(self.connector, "take_selection_reports", None)
        if output is not None and take is not None:
            take(output)
        return super().update_from_output(scheduler_output, model_runner_output)

    def _reserve_prefill_lookahead(self, request, num_computed_tokens, num_new_tokens):
        num_new_tokens = super()._reserve_prefill_lookahead(
            request, num_computed_tokens, num_new_tokens)
        if num_computed_tokens >= request.num_prompt_tokens:
            return num_new_tokens  # decoding (vLLM asks for every running request, every step)
        end = routing_span_end(request)
        if end is not None and num_computed_tokens < end and \
                num_computed_tokens + num_new_tokens < end:
            return 0
        return num_new_tokens


class MSAScheduler(_MSASchedulerMixin, Scheduler):
    pass


class MSAAsyncScheduler(_MSASchedulerMixin, AsyncScheduler):
    pass


class MSASchedulerSelector:
    """The `scheduler_cls` MSA engines get: builds the async or sync MSA scheduler, the way
    vLLM picks its default (async scheduling is only decided after model config hooks run)."""

    def __new__(cls, *args: Any, **kwargs: Any):
        vllm_config = kwargs.get("vllm_config", args[0] if args else None)
        if vllm_config.scheduler_config.async_scheduling:
            return MSAAsyncScheduler(*args, **kwargs)
        return MSAScheduler(*args, **kwargs)
