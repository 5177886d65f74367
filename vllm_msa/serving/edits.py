"""Bank routes of `vllm serve`: inspect the served banks, and remove documents while serving.

    GET    /v1/msa/banks                         every served bank (`describe`)
    GET    /v1/msa/banks/{bank}                  one bank: generation on disk and served,
                                                 live and removed documents, tier bytes
    DELETE /v1/msa/banks/{bank}/documents/{id}   remove a document (admin key)

A removal is durable before it is acknowledged: the bank's next generation (a tombstone,
`bank.edit.remove_documents`) is committed to disk first, then every worker of every engine
switches to it between two steps (`worker_state.apply_generation`, through
`patches/engine_rpc.py`), and only then does the route answer. So every request admitted
after the answer routes without the document; a request already running keeps the
selection it made; no request ever sees a mix (a request routes all its router layers in one
step). A restarted server loads the latest generation. Adding documents to a served bank
is not available yet: `vllm-msa bank add`, then a restart.

Edits need the admin key, in the `X-MSA-Admin-Key` header, compared in constant time: the key
is the `VLLM_MSA_ADMIN_KEY` environment variable, else `additional_config["msa"]["admin_key"]`
(vLLM logs its engine config at start: prefer the variable). Without a key edits are refused
with 403 and the answer says how to enable them; a wrong or missing header gets 401. vLLM's
own `--api-key` (the `Authorization` header) still guards every route.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..bank.format import BankError

ADMIN_HEADER = "X-MSA-Admin-Key"
ADMIN_ENV = "VLLM_MSA_ADMIN_KEY"
BANKS_ROUTE = "/v1/msa/banks"


def error(status: int, message: str) -> JSONResponse:
    kinds = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
             404: "NotFoundError", 409: "ConflictError"}
    return JSONResponse({"error": {"message": message,
                                   "type": kinds.get(status, "InternalServerError"),
                                   "code": status}}, status)


class BankEditor:
    """The API server's side of the bank routes: the served banks' paths, the admin key, and
    one edit at a time."""

    def __init__(self, engine_client: Any, banks: dict[str, str], admin_key: str | None
                 ) -> None:
        self.engine_client = engine_client
        self.banks = banks
        self.admin_key = admin_key or None
        self._lock = asyncio.Lock()

    @classmethod
    def of(cls, engine_client: Any) -> BankEditor:
        from ..options import ServingConfig

        additional = getattr(engine_client.vllm_config, "additional_config", None) or {}
        serving = ServingConfig.from_additional_config(additional)
        return cls(engine_client, dict(serving.banks),
                   os.environ.get(ADMIN_ENV) or serving.admin_key)

    def refusal(self, request: Request) -> JSONResponse | None:
        """Why `request` may not edit (None: it may)."""
        if self.admin_key is None:
            return error(403, f"bank edits are disabled on this server: start it with the "
                              f"{ADMIN_ENV} environment variable set (or "
                              'additional_config {"msa": {"admin_key": ...}}) and send the '
                              f"key in the {ADMIN_HEADER} header")
        given = request.headers.get(ADMIN_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.admin_key.encode()):
            return error(401, f"a bank edit needs the admin key in the {ADMIN_HEADER} header")
        return None

    async def served_generations(self) -> dict[str, list[int]]:
        """Per bank, the generation each worker routes over."""
        from ..patches.engine_rpc import collective_rpc_all

        states = await collective_rpc_all(self.engine_client, "msa_state")
        out: dict[str, list[int]] = {}
        for state in states:
            for name, generation in state.get("generations", {}).items():
                out.setdefault(name, []).append(generation)
        return out

    async def describe(self, name: str, served: dict[str, list[int]] | None = None
                       ) -> dict[str, Any]:
        from ..bank.reader import MemoryBank, removed_bytes

        bank = await asyncio.to_thread(MemoryBank.open, self.banks[name])
        if served is None:
            served = await self.served_generations()
        removed = bank.removed_counts
        return {"bank": name, "path": str(Path(self.banks[name])), "generation": bank.generation,
                "served_generations": sorted(set(served.get(name, []))),
                "documents": bank.num_documents, "chunks": bank.num_chunks,
                "tokens": bank.num_tokens, "removed": removed,
                "removed_bytes": removed_bytes(bank), "tier_bytes": bank.tier_bytes()}

    async def remove(self, name: str, doc_id: int) -> JSONResponse:
        from ..bank.edit import remove_documents
        from ..bank.reader import MemoryBank
        from ..patches.engine_rpc import collective_rpc_all

        async with self._lock:
            bank = await asyncio.to_thread(MemoryBank.open, self.banks[name])
            if doc_id not in bank.physical.live_positions():
                return error(404, f"bank {name!r} has no document {doc_id}"
                             + (" (removed already)" if doc_id in set(
                                 bank.physical.doc_ids.tolist()) else ""))
            try:  # durable first: the new generation is on disk before any worker uses it
                bank = await asyncio.to_thread(remove_documents, bank.path, [doc_id])
            except BankError as e:  # another edit holds the bank, or it changed meanwhile
                return error(409, str(e))
            try:
                workers = await collective_rpc_all(self.engine_client,
                                                   "msa_apply_generation", (name,))
            except Exception as e:  # (the reason goes back to the caller)
                return error(500, f"bank {name!r}: generation {bank.generation} is on disk "
                                  f"but the workers did not switch to it ({e}); a restart "
                                  "loads it")
        return JSONResponse({"bank": name, "generation": bank.generation, "removed": [doc_id],
                             "documents": bank.num_documents, "workers": len(workers)})


def attach_bank_routes(router: APIRouter) -> None:
    """The routes above, on `router` (the endpoint plugin's: `serving/http.py`)."""

    def editor(request: Request) -> BankEditor:
        return request.app.state.msa_bank_editor

    @router.get(BANKS_ROUTE)
    async def list_banks(request: Request) -> JSONResponse:
        ed = editor(request)
        served = await ed.served_generations()
        return JSONResponse({"banks": [await ed.describe(name, served) for name in ed.banks]})

    @router.get(BANKS_ROUTE + "/{bank}")
    async def show_bank(bank: str, request: Request) -> JSONResponse:
        ed = editor(request)
        if bank not in ed.banks:
            return error(404, f"no bank {bank!r} is served here; banks: {sorted(ed.banks)}")
        return JSONResponse(await ed.describe(bank))

    @router.delete(BANKS_ROUTE + "/{bank}/documents/{doc_id}")
    async def remove_document(bank: str, doc_id: str, request: Request) -> JSONResponse:
        ed = editor(request)
        refused = ed.refusal(request)
        if refused is not None:
            return refused
        if bank not in ed.banks:
            return error(404, f"no bank {bank!r} is served here; banks: {sorted(ed.banks)}")
        if not doc_id.isdigit() or len(doc_id) > 19:
            return error(400, f"document id {doc_id!r}: expected an integer >= 0")
        return await ed.remove(bank, int(doc_id))
