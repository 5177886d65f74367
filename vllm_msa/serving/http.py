"""`POST /v1/msa/answer` for `vllm serve`, added through vLLM's endpoint-plugin mechanism.

Enable it with `VLLM_PLUGINS=msa,msa_answer` (vLLM loads endpoint plugins only when named).
The route builds the MSA prompt for a question (`vllm_msa.prompt.build_prompt`), runs it on the
server's engine with the request's bank and options, and returns the text — plus, on request,
the documents each router layer selected. Bad input is answered with HTTP 400 and the server
keeps serving; the same admission rules as for completions apply (unknown bank, bad top-k, a
question too long to route in one step, ...).
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..prompt import build_prompt
from .connector import SELECTION_KEY

ROUTE = "/v1/msa/answer"


class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1)
    bank: str | None = None  # absent: the server's default bank
    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] | None = None
    top_k: int | None = Field(default=None, ge=1)  # documents; absent: the server's top-k
    return_selection: bool = False


def error(status: int, message: str) -> JSONResponse:
    kind = "BadRequestError" if status == 400 else "InternalServerError"
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status)


async def answer(body: dict[str, Any], engine: Any) -> JSONResponse:
    from vllm import SamplingParams

    try:
        req = AnswerRequest.model_validate(body)
    except ValueError as e:
        return error(400, str(e))
    extra: dict[str, Any] = {"msa_return_selection": req.return_selection}
    if req.bank is not None:
        extra["msa_bank"] = req.bank
    if req.top_k is not None:
        extra["msa_top_k"] = req.top_k
    try:
        params = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature,
                                top_p=req.top_p, seed=req.seed, stop=req.stop,
                                extra_args=extra)
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

        @router.post(ROUTE)
        async def msa_answer(request: Request) -> JSONResponse:
            try:
                body = await request.json()
            except ValueError:
                return error(400, "the body must be a JSON object")
            if not isinstance(body, dict):
                return error(400, "the body must be a JSON object")
            return await answer(body, request.app.state.msa_engine_client)

        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        state.msa_engine_client = engine_client


def endpoint_plugin() -> MSAAnswerPlugin:
    return MSAAnswerPlugin()
