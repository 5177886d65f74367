"""Bank routes of `vllm serve`: inspect the served banks, and edit them while serving.

    GET    /v1/msa/banks                         every served bank (`describe`)
    GET    /v1/msa/banks/{bank}                  one bank: generation on disk and served,
                                                 live and removed documents, tier bytes
    POST   /v1/msa/banks/{bank}/documents        add documents (admin key):
                                                 {"documents": [{"id": int, "text": str}]}
    PUT    /v1/msa/banks/{bank}/documents/{id}   add or replace one document (admin key):
                                                 {"text": str}
    DELETE /v1/msa/banks/{bank}/documents/{id}   remove a document (admin key)

Added documents are encoded by the running engine itself, as prefill-only requests batched
with the questions being served (`encode.py`). Every edit is durable before it is
acknowledged: the bank's next generation (`bank.edit`: new segments, tombstones) is
committed to disk first, then every worker of every engine switches to it between two steps
(`worker_state.apply_generation`, through `patches/engine_rpc.py`: removed documents are
masked, added ones appended to the index and host tier), and only then does the route
answer. So every request admitted after the answer routes over the new generation; a
request already running keeps the selection it made; no request ever sees a mix (a request
routes all its router layers in one step). An edit never shows part of a document: a
document is visible once all of it is committed. A restarted server loads the latest
generation.

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
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..bank.documents import Document
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
        from ..bank.edit import NotLive, remove_documents

        async with self._lock:
            try:  # durable first: the new generation is on disk before any worker uses it
                bank = await asyncio.to_thread(remove_documents, self.banks[name], [doc_id])
            except NotLive as e:
                return error(404, f"bank {name!r} has no document {doc_id}"
                             + (" (removed already)" if e.removed else ""))
            except BankError as e:  # another edit holds the bank, or it changed meanwhile
                return error(409, str(e))
            return await self._switch(name, bank, {"removed": [doc_id]})

    async def add(self, name: str, documents: list[Document], replace: bool) -> JSONResponse:
        """Encode `documents` with the engine, commit them, switch every worker. `replace`:
        an id the bank holds is replaced (PUT); otherwise it is refused (POST)."""
        from ..bank.edit import add_encoded, present_ids
        from ..bank.reader import MemoryBank
        from .encode import DocumentTooLong, encode_documents

        async with self._lock:
            bank = await asyncio.to_thread(MemoryBank.open, self.banks[name])
            if "virtual" in bank.manifest or "synthetic" in (bank.manifest.get("source")
                                                            or {}):
                return error(409, f"bank {name!r} is synthetic: documents cannot be added")
            try:
                present = present_ids(bank, [d.id for d in documents], replace,
                                      f"replace one with PUT {BANKS_ROUTE}/{name}/documents/"
                                      "{id}")
            except BankError as e:
                return error(409, str(e))
            try:
                encoded = await encode_documents(self.engine_client, name, documents,
                                                 bank.model_info)
            except DocumentTooLong as e:
                return error(400, str(e))
            except ValueError as e:  # refused by the engine's own checks; nothing written
                return error(400, f"bank {name!r}: {e}; nothing was changed")
            except RuntimeError as e:  # (a worker's capture incomplete: a bug, reported)
                return error(500, f"bank {name!r}: encoding failed ({e}); nothing was "
                                  "changed")
            texts = {d.id: d.text for d in documents}
            try:  # durable first: the new generation is on disk before any worker uses it
                bank = await asyncio.to_thread(
                    add_encoded, bank.path, encoded, texts, replace=replace,
                    identity={"online": uuid.uuid4().hex})
            except BankError as e:  # another edit holds the bank, or it changed meanwhile
                return error(409, str(e))
            return await self._switch(name, bank, {
                "added": [d.id for d in documents if d.id not in present],
                "replaced": present, "tokens": sum(d.num_tokens for d in encoded)})

    async def _switch(self, name: str, bank: Any, done: dict[str, Any]) -> JSONResponse:
        """Every worker (and admission) onto committed generation `bank`; the answer."""
        try:
            workers = await switch_workers(self.engine_client, name, bank)
        except Exception as e:  # (the reason goes back to the caller)
            return error(500, f"bank {name!r}: generation {bank.generation} is on disk "
                              f"but the workers did not switch to it ({e}); a restart "
                              "loads it")
        return JSONResponse({"bank": name, "generation": bank.generation, **done,
                             "documents": bank.num_documents, "workers": len(workers)})


async def switch_workers(engine_client: Any, name: str, bank: Any) -> list[dict[str, Any]]:
    """Every worker of every engine of `engine_client` onto generation `bank` of served bank
    `name` (committed already), then the front end's admission; each worker's state."""
    from ..patches.engine_rpc import collective_rpc_all
    from ..patches.input_processor import admission_for

    workers = await collective_rpc_all(engine_client, "msa_apply_generation", (name,))
    admission = admission_for(engine_client.vllm_config)
    if admission is not None:
        admission.refresh(name, bank)
    return workers


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

    async def checked(bank: str, request: Request) -> BankEditor | JSONResponse:
        ed = editor(request)
        refused = ed.refusal(request)
        if refused is not None:
            return refused
        if bank not in ed.banks:
            return error(404, f"no bank {bank!r} is served here; banks: {sorted(ed.banks)}")
        return ed

    @router.post(BANKS_ROUTE + "/{bank}/documents")
    async def add_documents(bank: str, request: Request) -> JSONResponse:
        ed = await checked(bank, request)
        if isinstance(ed, JSONResponse):
            return ed
        body = await json_body(request)
        if isinstance(body, JSONResponse):
            return body
        documents = body.get("documents") if set(body) == {"documents"} else None
        if not isinstance(documents, list) or not documents:
            return error(400, 'expected {"documents": [{"id": int, "text": str}, ...]} with '
                              "at least one document")
        if len(documents) > MAX_DOCUMENTS_PER_ADD:
            return error(400, f"at most {MAX_DOCUMENTS_PER_ADD} documents per request, got "
                              f"{len(documents)}")
        parsed = []
        for i, doc in enumerate(documents):
            problem = document_problem(doc)
            if problem:
                return error(400, f"documents[{i}]: {problem}")
            parsed.append(Document(doc["id"], doc["text"]))
        ids = [d.id for d in parsed]
        if len(set(ids)) != len(ids):
            return error(400, "document ids repeat within the request")
        return await ed.add(bank, parsed, replace=False)

    async def checked_document(bank: str, doc_id: str, request: Request
                               ) -> BankEditor | JSONResponse:
        ed = await checked(bank, request)
        if not isinstance(ed, JSONResponse) and not valid_id(doc_id):
            return error(400, f"document id {doc_id!r}: expected an integer >= 0")
        return ed

    @router.put(BANKS_ROUTE + "/{bank}/documents/{doc_id}")
    async def put_document(bank: str, doc_id: str, request: Request) -> JSONResponse:
        ed = await checked_document(bank, doc_id, request)
        if isinstance(ed, JSONResponse):
            return ed
        body = await json_body(request)
        if isinstance(body, JSONResponse):
            return body
        problem = document_problem({"id": int(doc_id), **body}) if set(body) == {"text"} \
            else 'expected {"text": str}'
        if problem:
            return error(400, problem)
        return await ed.add(bank, [Document(int(doc_id), body["text"])], replace=True)

    @router.delete(BANKS_ROUTE + "/{bank}/documents/{doc_id}")
    async def remove_document(bank: str, doc_id: str, request: Request) -> JSONResponse:
        ed = await checked_document(bank, doc_id, request)
        if isinstance(ed, JSONResponse):
            return ed
        return await ed.remove(bank, int(doc_id))


MAX_DOCUMENTS_PER_ADD = 10_000
MAX_ID = 2**63 - 1  # (ids are int64 in the bank)


def valid_id(raw: str) -> bool:
    return raw.isascii() and raw.isdigit() and int(raw) <= MAX_ID


def document_problem(doc: Any) -> str | None:
    """Why `doc` is not a document to add (None: it is one)."""
    if not isinstance(doc, dict) or set(doc) != {"id", "text"}:
        return 'expected {"id": int, "text": str}'
    doc_id, text = doc["id"], doc["text"]
    if isinstance(doc_id, bool) or not isinstance(doc_id, int) or not 0 <= doc_id <= MAX_ID:
        return f"id must be an integer in [0, 2^63), got {doc_id!r}"
    if not isinstance(text, str) or not text.strip():
        return f"document {doc_id}: text must be a non-empty string"
    return None


async def json_body(request: Request) -> dict[str, Any] | JSONResponse:
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        return error(400, "the body must be a JSON object")
    if not isinstance(body, dict):
        return error(400, "the body must be a JSON object")
    return body
