"""Stage 1 by the serving engine itself: the documents a live add brings, encoded as requests.

`vllm serve` holds one copy of the model; a second one (the stage-1 encoder engine of
`bank build`) would need its own GPU memory. So each new document becomes a prefill-only
request to the running engine: its stage-1 text (`prompt.document_text`), one output token,
and `extra_args["msa_encode"]`, which makes every worker pool the request's router-layer K,
V and routing keys per chunk (`attention/capture.py`). The requests batch with the questions
being served like any others (continuous batching, chunked prefill). When they have all
finished, one collective RPC takes each worker's share (its KV heads, its pipeline stage's
router layers) and this module puts every document's `[chunks, router layers, 3, kv heads,
head_dim]` rows together, checking that every layer and head came back and that every
prompt token was captured.

The requests can only come from here: admission (`serving/admission.py`) refuses
`msa_encode` without this process's nonce, so a client cannot make workers capture.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import uuid
from typing import Any

import torch

from ..attention.capture import ENCODE_KEY
from ..bank.documents import Document
from ..bank.model_info import ModelInfo
from ..bank.writer import EncodedDocument
from ..prompt import document_text

NONCE = secrets.token_hex(16)  # this API server process's: admission checks it


class DocumentTooLong(ValueError):
    """A document the engine cannot take in one request; the message names it."""


def is_ours(value: Any) -> bool:
    """Whether `extra_args["msa_encode"]` was made by this process (`encode_documents`)."""
    nonce = value.get("nonce") if isinstance(value, dict) else None
    return isinstance(nonce, str) and hmac.compare_digest(nonce.encode(), NONCE.encode())


def tokenized(tokenizer: Any, documents: list[Document], max_model_len: int
              ) -> list[list[int]]:
    """Each document's stage-1 token ids; a document the engine cannot take is refused by
    id (a request needs room for its one output token)."""
    texts = [document_text(d.id, d.text) for d in documents]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for doc, tokens in zip(documents, ids, strict=True):
        if len(tokens) >= max_model_len:
            raise DocumentTooLong(f"document {doc.id} has {len(tokens)} tokens; this server "
                                  f"takes documents of at most {max_model_len - 1} "
                                  "(its max_model_len - 1): split it")
    return ids


class EncodeBatch:
    """Documents to encode with an engine: their token ids, and one request each."""

    def __init__(self, bank: str, documents: list[Document], tokenizer: Any,
                 max_model_len: int) -> None:
        self.bank, self.documents = bank, documents
        self.token_ids = tokenized(tokenizer, documents, max_model_len)
        self.keys = [f"msa-encode-{uuid.uuid4().hex}" for _ in documents]

    def requests(self) -> list[tuple[dict[str, Any], Any, str]]:
        """(prompt, SamplingParams, request id) of each document."""
        from vllm import SamplingParams

        return [({"prompt_token_ids": ids,
                  # a salt of its own: no prefix-cache hit may skip positions to capture
                  "cache_salt": f"msa-encode:{uuid.uuid4().hex}"},
                 SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, extra_args={
                     ENCODE_KEY: {"bank": self.bank, "key": key, "nonce": NONCE}}), key)
                for ids, key in zip(self.token_ids, self.keys, strict=True)]

    def encoded(self, parts: list[dict[str, Any]], info: ModelInfo) -> list[EncodedDocument]:
        """Every document's rows from the workers' captures (`msa_take_encoded`)."""
        return [EncodedDocument(doc.id, len(ids), assembled(parts, key, len(ids), info))
                for doc, ids, key in zip(self.documents, self.token_ids, self.keys,
                                         strict=True)]


async def encode_documents(engine_client: Any, bank: str, documents: list[Document],
                           info: ModelInfo) -> list[EncodedDocument]:
    """Stage 1 of `documents` (for served bank `bank`) on a running async engine (`vllm
    serve`'s), in order."""
    from ..patches.engine_rpc import collective_rpc_all

    batch = EncodeBatch(bank, documents, engine_client.get_tokenizer(),
                        engine_client.vllm_config.model_config.max_model_len)

    async def run(prompt: dict[str, Any], params: Any, request_id: str) -> None:
        async for _ in engine_client.generate(prompt, params, request_id):
            pass

    try:
        await asyncio.gather(*(run(*request) for request in batch.requests()))
    finally:  # (also after a failure: the workers forget what they captured)
        parts = await collective_rpc_all(engine_client, "msa_take_encoded", (batch.keys,))
    return batch.encoded(parts, info)


def encode_with_llm(llm: Any, bank: str, documents: list[Document], info: ModelInfo
                    ) -> list[EncodedDocument]:
    """`encode_documents` on an offline `vllm.LLM` that serves bank `bank`."""
    batch = EncodeBatch(bank, documents, llm.get_tokenizer(),
                        llm.llm_engine.model_config.max_model_len)
    requests = batch.requests()
    try:
        llm.generate([r[0] for r in requests], [r[1] for r in requests], use_tqdm=False)
    finally:
        parts = llm.collective_rpc("msa_take_encoded", args=(batch.keys,))
    return batch.encoded(parts, info)


def assembled(parts: list[dict[str, Any]], request_id: str, num_tokens: int,
              info: ModelInfo) -> torch.Tensor:
    """One document's rows from every worker's share (`worker_state.take_encoded`)."""
    from safetensors.torch import load

    layers = list(info.router_layers)
    chunks = -(-num_tokens // info.pooling_kernel_size)
    out: torch.Tensor | None = None
    covered = torch.zeros(len(layers), info.num_kv_heads, dtype=torch.bool)
    for part in parts:
        doc = part["documents"].get(request_id)
        if doc is None:
            continue  # another data-parallel replica ran it
        if doc["tokens"] != num_tokens:
            raise RuntimeError(f"encoding request {request_id}: a worker captured "
                               f"{doc['tokens']} of its {num_tokens} tokens")
        rows = load(doc["rows"])["rows"]
        if out is None:
            out = torch.empty((chunks, len(layers), 3, info.num_kv_heads, info.head_dim),
                              dtype=rows.dtype)
        at = [layers.index(layer) for layer in part["layers"]]
        heads = slice(*part["kv_heads"])
        out[:, at, :, heads] = rows
        covered[at, heads] = True
    if out is None or not bool(covered.all()):
        raise RuntimeError(f"encoding request {request_id}: the workers returned "
                           f"{int(covered.sum())} of {covered.numel()} router-layer KV heads")
    return out
