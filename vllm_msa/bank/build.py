"""Stage 1: encode documents into a bank with vLLM's `LLM` class (msa-spec §2).

Each document is its own pooling request to the `MSABankEncoder` view of the checkpoint, so
vLLM batches them, restarts positions at 0 per document and keeps attention inside it; tensor
parallelism and any other engine option pass straight through. Documents are written in
segments of about `segment_mb` MiB, so a killed build resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..encoder import DOCUMENT_MODE, ENCODE_MODE_KEY, TEMPLATE_MODE
from ..prompt import TEMPLATE_HEAD, document_text
from .documents import Document, read_documents
from .dtypes import BankDtypes
from .format import DEFAULT_SEGMENT_MB, MANIFEST, BankError
from .model_info import ModelInfo, dtype_name, resolve_checkpoint
from .reader import MemoryBank
from .segmenting import segment_chunk_bytes, segment_runs
from .writer import BankWriter, EncodedDocument

_TOO_LONG_ADVICE = ("re-run with a larger --max-model-len (the build resumes), or split the "
                    "document and build into a new directory")

# Engine settings the encoder needs; a caller's value for these is overridden.
_ENCODER_ENGINE_ARGS = {
    "runner": "pooling",
    "hf_overrides": {"architectures": ["MSABankEncoder"]},
    "enforce_eager": True,  # the encoder's capture runs eagerly; prefill-only needs no graphs
    "enable_prefix_caching": False,
}


def build_bank(
    model: str | Path,
    docs: str | Path,
    out: str | Path,
    *,
    segment_mb: float = DEFAULT_SEGMENT_MB,
    progress: bool = True,
    llm: Any | None = None,
    bank_dtype: str = "auto",
    **engine_args: Any,
) -> MemoryBank:
    """Encode `docs` (a DOCS.jsonl) with checkpoint `model` into the bank directory `out`,
    its K̄/V̄ tier stored as `bank_dtype` (`dtypes.BANK_DTYPES`).

    Re-running after an interruption finishes the same build; re-running after success returns
    the existing bank. `engine_args` go to `vllm.LLM` (tensor_parallel_size, dtype,
    max_num_seqs, ...). `llm` may be an already started encoder engine (see `encoder_llm`).
    """
    documents, docs_sha256 = read_documents(docs)
    checkpoint = resolve_checkpoint(model)
    source = {"documents_sha256": docs_sha256, "num_documents": len(documents)}
    if (Path(out) / MANIFEST).exists():  # finished before: no engine needed
        return _existing_bank(out, source, ModelInfo.from_checkpoint(checkpoint).fingerprint,
                              bank_dtype)

    if llm is None:
        llm = encoder_llm(checkpoint, **engine_args)
        try:
            return _build(llm, checkpoint, documents, source, out, segment_mb, progress,
                          bank_dtype)
        finally:
            # Stop the engine's processes now, not whenever the garbage collector (or the
            # interpreter's exit) gets to the LLM object.
            shutdown_engine(llm)
    return _build(llm, checkpoint, documents, source, out, segment_mb, progress, bank_dtype)


def shutdown_engine(llm: Any) -> None:
    """Stop an `LLM`'s engine core and workers."""
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()


def _build(llm: Any, checkpoint: Path, documents: list[Document], source: dict[str, Any],
           out: str | Path, segment_mb: float, progress: bool, bank_dtype: str = "auto"
           ) -> MemoryBank:
    info = ModelInfo.from_checkpoint(checkpoint, dtype_name(llm.llm_engine.model_config.dtype))
    writer = BankWriter.open(out, info, source, {"segment_mb": segment_mb},
                             BankDtypes.of_model(info.dtype, bank_dtype))
    encode_documents(llm, info, documents[writer.num_done_documents:], writer.add_segment,
                     segment_mb=segment_mb, progress=progress,
                     done=writer.num_done_documents, on_stop=writer.record_stop)
    tokenizer = llm.get_tokenizer()
    template_ids = tokenizer.encode(TEMPLATE_HEAD, add_special_tokens=False)
    template_kv = _encode_raw(llm, template_ids, TEMPLATE_MODE)
    writer.finish(template_ids, template_kv, ((d.id, d.text) for d in documents))
    return MemoryBank.open(out, info)


def encode_documents(llm: Any, info: ModelInfo, documents: Sequence[Document],
                     write: Callable[[list[EncodedDocument]], Any], *, segment_mb: float,
                     progress: bool, done: int = 0,
                     on_stop: Callable[[str, str], Any] | None = None,
                     desc: str = "encoding bank", advice: str = _TOO_LONG_ADVICE) -> None:
    """Stage 1 of `documents` in segments of about `segment_mb` MiB (`segment_runs`), each
    handed to `write` in order (a build's writer, an edit's next generation). `done`: the
    documents a resumed run already wrote (the bar starts there). A document longer than the
    engine's max_model_len stops it with a BankError, after `on_stop(reason, advice)`."""
    tokenizer = llm.get_tokenizer()
    chunk_bytes = segment_chunk_bytes(info)
    max_len = llm.llm_engine.model_config.max_model_len
    bar = tqdm(total=done + len(documents), initial=done, unit="doc", desc=desc,
               disable=not progress)
    start, tokens_done = time.monotonic(), 0
    # Segment N is serialised, hashed and written by one background thread while the engine
    # encodes segment N+1 (at most one write in flight, so at most two segments in memory).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bank-writer") as io:
        pending: Future | None = None
        for segment in _segments(documents, tokenizer, info.pooling_kernel_size, chunk_bytes,
                                 segment_mb * 2**20):
            too_long = [(d.id, len(ids)) for d, ids in segment if len(ids) > max_len]
            if too_long:
                doc_id, n = too_long[0]
                reason = (f"document {doc_id} has {n} tokens, more than the engine's "
                          f"max_model_len {max_len}")
                if on_stop is not None:
                    on_stop(reason, advice)
                raise BankError(f"{reason}; {advice}")
            tokens = sum(len(ids) for _, ids in segment)
            docs = DocumentProgress(bar, start, tokens_done, tokens, len(segment))
            encoded = _encode(llm, segment, docs)
            docs.finish()  # (a vLLM that drove no progress bar: the segment at once)
            if pending is not None:
                pending.result()
            pending = io.submit(write, encoded)
            tokens_done += tokens
        if pending is not None:
            pending.result()
    bar.close()


def _existing_bank(out: str | Path, source: dict[str, Any], fingerprint: str,
                   bank_dtype: str = "auto") -> MemoryBank:
    bank = MemoryBank.open(out)
    if bank.dtypes != BankDtypes.of_model(bank.model_info.dtype, bank_dtype):
        raise BankError(f"{out} already holds this bank with its K/V tier in "
                        f"{bank.dtypes.kv}; `vllm-msa bank convert` writes a copy in another "
                        "dtype")
    if bank.manifest["source"] != source or bank.model_info.fingerprint != fingerprint:
        raise BankError(
            f"{out} already holds a bank built from other documents or another model; "
            "choose another --out or delete it"
        )
    if bank.generation:
        raise BankError(f"{out} holds a bank built from these documents and edited since "
                        f"(generation {bank.generation}); choose another --out or delete it")
    return bank


def encoder_llm(model: str | Path, **engine_args: Any):
    """A `vllm.LLM` running the checkpoint as the stage-1 encoder."""
    from vllm import LLM

    return LLM(model=str(model), **{**engine_args, **_ENCODER_ENGINE_ARGS})


def _segments(
    docs: Sequence[Document], tokenizer, pooling: int, chunk_bytes: int, segment_bytes: float
) -> Iterator[list[tuple[Document, list[int]]]]:
    """Documents with their token ids, grouped into runs of about `segment_bytes` output."""

    def tokenized() -> Iterator[tuple[Document, list[int]]]:
        batch = 256
        for i in range(0, len(docs), batch):
            texts = [document_text(d.id, d.text) for d in docs[i : i + batch]]
            encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
            yield from zip(docs[i : i + batch], encoded, strict=True)

    return segment_runs(tokenized(), lambda item: -(-len(item[1]) // pooling), chunk_bytes,
                        segment_bytes)


class DocumentProgress:
    """The progress bar `LLM.encode` drives for one segment (its `use_tqdm` takes a tqdm
    factory): every document the engine finishes advances the build's bar, with the tokens/s
    so far (the segment's documents counted at its mean length)."""

    def __init__(self, bar: Any, started: float, tokens_before: int, tokens: int,
                 documents: int) -> None:
        self.bar, self.started = bar, started
        self.tokens_before, self.tokens, self.documents = tokens_before, tokens, documents
        self.n = 0

    def factory(self, *iterable: Any, **_: Any) -> Any:
        """`use_tqdm`: vLLM calls it for the engine's bar (kept) or around an iterable of
        prompts being added (passed through)."""
        return iterable[0] if iterable else self

    def update(self, n: int = 1) -> None:
        self.n += n
        self.bar.update(n)
        done = self.tokens_before + self.tokens * self.n / max(self.documents, 1)
        elapsed = max(time.monotonic() - self.started, 1e-9)
        self.bar.set_postfix(tok_s=f"{done / elapsed:,.0f}", refresh=False)

    def finish(self) -> None:
        if self.n < self.documents:
            self.update(self.documents - self.n)

    def refresh(self) -> None:
        self.bar.refresh()

    def close(self) -> None:
        pass


def _encode(llm, segment: Sequence[tuple[Document, list[int]]],
            progress: DocumentProgress | None = None) -> list[EncodedDocument]:
    from vllm.pooling_params import PoolingParams

    params = PoolingParams(extra_kwargs={ENCODE_MODE_KEY: DOCUMENT_MODE})
    outputs = llm.encode(
        [{"prompt_token_ids": ids} for _, ids in segment],
        pooling_params=params,
        pooling_task="token_embed",
        use_tqdm=progress.factory if progress is not None else False,
    )
    return [
        EncodedDocument(doc.id, len(ids), out.outputs.data)
        for (doc, ids), out in zip(segment, outputs, strict=True)
    ]


def _encode_raw(llm, token_ids: list[int], mode: str) -> torch.Tensor:
    from vllm.pooling_params import PoolingParams

    (out,) = llm.encode(
        [{"prompt_token_ids": token_ids}],
        pooling_params=PoolingParams(extra_kwargs={ENCODE_MODE_KEY: mode}),
        pooling_task="token_embed",
        use_tqdm=False,
    )
    return out.outputs.data
