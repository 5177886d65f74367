"""`POST /v1/msa/answer` for `vllm serve`, added through vLLM's endpoint-plugin mechanism.

Enable it with `VLLM_PLUGINS=msa,msa_answer` (vLLM loads endpoint plugins only when named).
The route answers a question over a bank with Memory Interleave (msa-spec §4, the default:
`vllm_msa.interleave`), or with one routed request (`"interleave": false`: the MSA prompt of
`vllm_msa.prompt.build_prompt`, whose text and, on request, selections come back). With
`"stream": true` (interleave only) it sends server-sent events as the loop runs: each step's
generated text (`delta`), each step's outcome (`step`: documents appended, end of retrieval,
the answer) and finally the whole result (`result`), then `[DONE]`.
Bad input is answered with HTTP 400 and the server keeps serving; the same admission rules as
for completions apply (unknown bank, bad top-k, a question too long to route in one step, ...).
The same plugin serves the bank routes (`GET /v1/msa/banks`, document removal: `edits.py`).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..interleave.protocol import InterleaveLimits
from ..options import SELECTION_KEY
from ..prompt import build_prompt
from .edits import BankEditor, attach_bank_routes, json_body

ROUTE = "/v1/msa/answer"


class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1)
    bank: str | None = None  # absent: the server's default bank
    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # as vLLM's routes
    stop: list[str] | None = None
    top_k: int | None = Field(default=None, ge=1)  # documents; absent: the server's top-k
    return_selection: bool = False
    # Memory Interleave (msa-spec §4); max_tokens then bounds all steps together.
    interleave: bool = True
    stream: bool = False
    max_rounds: int = Field(default=InterleaveLimits.max_rounds, ge=1)
    max_retrieved_docs: int = Field(default=InterleaveLimits.max_retrieved_docs, ge=1)
    max_retrieval_tokens: int = Field(default=InterleaveLimits.max_retrieval_tokens, ge=1)
    # Extra per-request args for vLLM (custom logits processors, ...); `msa_*` are the route's.
    vllm_xargs: dict[str, Any] | None = None


def _sse(event: dict[str, Any]) -> str:
    return f"data: {json.dumps(event)}\n\n"


def error(status: int, message: str) -> JSONResponse:
    kind = "BadRequestError" if status == 400 else "InternalServerError"
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status)


def _cancel_on_disconnect(handler: Any) -> Any:
    """`handler(body, raw_request, engine)` cancelled when the client disconnects, as vLLM's
    own routes are (its `with_cancellation`): a cancelled `engine.generate` aborts the
    request in the engine, so a client that hangs up stops its generation. A streamed answer
    hands the watch over to the `StreamingResponse`."""
    from vllm.entrypoints.serve.utils.api_utils import with_cancellation  # vLLM 0.32, 0.33

    return with_cancellation(handler)


async def answer(body: dict[str, Any], raw_request: Any, engine: Any
                 ) -> JSONResponse | StreamingResponse:
    try:
        req = AnswerRequest.model_validate(body)
    except ValueError as e:
        return error(400, str(e))
    reserved = sorted(k for k in (req.vllm_xargs or {}) if k.startswith("msa_"))
    if reserved:
        return error(400, f"vllm_xargs may not set {', '.join(reserved)}: use the route's "
                          "fields (bank, top_k, return_selection)")
    if req.interleave:
        return await answer_interleaved(req, engine)
    if req.stream:
        return error(400, '"stream" needs "interleave": true (use /v1/completions to stream '
                          "a single request)")
    return await answer_once(req, engine)


def base_params(req: AnswerRequest, extra: dict[str, Any]) -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature,
                          top_p=req.top_p, seed=req.seed, stop=req.stop,
                          extra_args={**(req.vllm_xargs or {}), **extra} or None)


async def answer_interleaved(req: AnswerRequest, engine: Any
                             ) -> JSONResponse | StreamingResponse:
    from ..interleave.online import InterleaveRun
    from ..interleave.session import InterleaveSession

    if req.stop:
        return error(400, '"stop" is not supported with "interleave": the loop sets its stops')
    try:
        session = InterleaveSession(engine.vllm_config, engine.get_tokenizer())
        bank = session.resolve_bank(req.bank)
        session.check_top_k(bank, req.top_k)
        limits = InterleaveLimits(req.max_rounds, req.max_retrieved_docs, req.max_tokens,
                                  req.max_retrieval_tokens)
        conversation = session.conversation(req.question, bank, limits)
        run = InterleaveRun(engine, session, conversation, base_params(req, {}), bank,
                            req.top_k, stream=req.stream)
        started = await run.start()
    except ValueError as e:  # unknown bank, bad option, question too long to route, ...
        return error(400, str(e))
    request_id = f"msa-answer-{uuid.uuid4().hex}"

    def body(result: Any) -> dict[str, Any]:
        out = {"id": request_id, **result.to_json()}
        if not req.return_selection:
            for step in out["steps"]:
                step.pop("selection")
        return out

    if not req.stream:
        try:
            result = await run.run(started)
        except BaseException:
            await run.abort()
            raise
        return JSONResponse(body(result))

    async def events():
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        async def emit(event: dict[str, Any]) -> None:
            if not req.return_selection:
                event.pop("selection", None)
            queue.put_nowait(event)

        # The loop runs beside the response: each event goes out as soon as it exists.
        task = asyncio.create_task(run.run(started, emit))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (event := await queue.get()) is not None:
                yield _sse(event)
            if task.exception() is not None:  # the status line is gone: report in-band
                yield _sse({"type": "error", "message": str(task.exception())})
            else:
                yield _sse({"type": "result", **body(task.result())})
            yield "data: [DONE]\n\n"
        finally:
            if not task.done():  # the client went away: stop the engine work
                task.cancel()
                await run.abort()

    return StreamingResponse(events(), media_type="text/event-stream")


async def answer_once(req: AnswerRequest, engine: Any) -> JSONResponse:
    extra: dict[str, Any] = {"msa_return_selection": req.return_selection}
    if req.bank is not None:
        extra["msa_bank"] = req.bank
    if req.top_k is not None:
        extra["msa_top_k"] = req.top_k
    try:
        params = base_params(req, extra)
        prompt = build_prompt(engine.get_tokenizer(), req.question)
        request_id = f"msa-answer-{uuid.uuid4().hex}"
        final = None
        async for output in engine.generate(prompt, params, request_id):
            final = output
    except ValueError as e:  # admission: unknown bank, bad option, span too long, ...
        return error(400, str(e))
    completion = final.outputs[0]
    result: dict[str, Any] = {
        "id": request_id,
        "text": completion.text,
        "finish_reason": completion.finish_reason,
        "usage": {"prompt_tokens": len(final.prompt_token_ids or []),
                  "completion_tokens": len(completion.token_ids)},
    }
    if req.return_selection:
        result["selection"] = (final.kv_transfer_params or {}).get(SELECTION_KEY)
    return JSONResponse(result)


class MSAAnswerPlugin:
    name = "msa_answer"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        router = APIRouter()

        # The body is parsed here (for one clear 400 on anything), so FastAPI cannot derive
        # its schema: publish AnswerRequest's in /openapi.json for clients and fuzzers.
        schema = AnswerRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        body_schema = {"required": True, "content": {"application/json": {"schema": schema}}}

        @router.post(ROUTE, response_model=None, openapi_extra={"requestBody": body_schema})
        async def msa_answer(raw_request: Request) -> Response | None:
            body = await json_body(raw_request)
            if isinstance(body, JSONResponse):
                return body
            return await _cancel_on_disconnect(answer)(
                body, raw_request, raw_request.app.state.msa_engine_client)

        attach_bank_routes(router)
        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        state.msa_engine_client = engine_client
        state.msa_bank_editor = BankEditor.of(engine_client)


def endpoint_plugin() -> MSAAnswerPlugin:
    return MSAAnswerPlugin()
