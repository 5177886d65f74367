"""Memory Interleave over an async engine client (`vllm serve`'s `AsyncLLM`): one question per
coroutine; concurrent questions share the engine's steps like any concurrent requests.

`run` drives a `Conversation` to its end and, when given `emit`, reports as it happens: the
text each step generates (`{"type": "delta", ...}`) and what the loop did with it
(`{"type": "step", ...}`: documents appended, end of retrieval, answer).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ..options import SELECTION_KEY, MSARequestError
from .protocol import Conversation, InterleaveResult, StepRequest
from .session import InterleaveSession

Emit = Callable[[dict[str, Any]], Awaitable[None]]


class InterleaveRun:
    """One question's loop on an async engine client."""

    def __init__(self, engine: Any, session: InterleaveSession, conversation: Conversation,
                 base: Any, bank: str, top_k: int | None, stream: bool) -> None:
        from vllm.sampling_params import RequestOutputKind

        self.engine = engine
        self.session = session
        self.conversation = conversation
        self.base = base
        self.bank = bank
        self.top_k = top_k
        self.stream = stream
        self.kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        self.request_ids: list[str] = []

    def _generate(self, request: StepRequest) -> AsyncIterator[Any]:
        params = self.session.sampling_params(request, self.base, self.bank, self.top_k,
                                              self.kind)
        request_id = f"msa-interleave-{uuid.uuid4().hex}"
        self.request_ids.append(request_id)
        return self.engine.generate({"prompt_token_ids": request.prompt_token_ids}, params,
                                    request_id).__aiter__()

    async def start(self) -> tuple[AsyncIterator[Any], Any]:
        """Submit the first step and wait for its first output, so that a request the engine
        refuses (a question too long to route, a bad option) fails before anything is
        streamed: raises the admission's ValueError."""
        request = self.conversation.next_request()
        if request is None:  # refused before any step: the prompt does not fit the context
            raise MSARequestError(self.conversation.error or "the question cannot be asked")
        outputs = self._generate(request)
        try:
            first = await outputs.__anext__()
        except ValueError:
            self.conversation.steps.pop()
            raise
        return outputs, first

    async def run(self, started: tuple[AsyncIterator[Any], Any] | None = None,
                  emit: Emit | None = None) -> InterleaveResult:
        conversation = self.conversation
        pending = started
        while not conversation.done:
            if pending is None:
                request = conversation.next_request()
                if request is None:
                    break
                outputs, first = self._generate(request), None
            else:
                (outputs, first), pending = pending, None
            step = conversation.steps[-1]
            streamed = ""
            tokens: list[int] = []
            logprobs: list[Any] = []
            final = None
            try:
                async for output in _chain(first, outputs):
                    completion = output.outputs[0]
                    if self.stream:
                        tokens += completion.token_ids
                        logprobs += completion.logprobs or []
                        if emit is not None and completion.text:
                            streamed += completion.text
                            await emit({"type": "delta", "round": step.round,
                                        "phase": step.phase, "text": completion.text})
                    else:
                        tokens = list(completion.token_ids)
                        logprobs = list(completion.logprobs or [])
                    final = output
            except ValueError as e:  # refused at admission (a later step)
                conversation.fail(str(e))
                break
            completion = final.outputs[0]
            selection = (final.kv_transfer_params or {}).get(SELECTION_KEY)
            conversation.advance(tokens, completion.finish_reason, selection,
                                 logprobs or None)
            if emit is not None:
                # vLLM's text leaves out stop tokens; the step's text (all its tokens) has them.
                if step.text.startswith(streamed) and len(step.text) > len(streamed):
                    await emit({"type": "delta", "round": step.round, "phase": step.phase,
                                "text": step.text[len(streamed):]})
                await emit({"type": "step", **step.to_json()})
        return conversation.result()

    async def abort(self) -> None:
        if self.request_ids:
            await self.engine.abort(self.request_ids)


async def _chain(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    if first is not None:
        yield first
    async for item in rest:
        yield item
