"""Writing a bank atomically and resumably.

The build happens in the output directory itself. Until `finish()` writes `manifest.json`
(the commit point, written atomically after every data file is durable) the directory does not
load as a bank. Progress lives in `build-state.json`: the segments committed so far, each
written to a temporary name, fsynced and renamed before the state that lists it. A build killed
at any moment therefore resumes at the first document not in a committed segment, and a
re-run with different inputs is refused instead of mixing two builds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from .. import __version__
from .dtypes import BankDtypes
from .format import (
    BUILD_STATE,
    COMPRESSED_VERSION,
    DOCUMENTS_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    POOLED_ORDER,
    SEGMENTS_DIR,
    TEMPLATE_FILE,
    BankError,
    digests,
    documents_data,
    layer_key,
    read_json,
    segment_name,
    write_atomic,
    write_json_atomic,
)
from .model_info import ModelInfo
from .quant import SCALE_SUFFIX, quantize


@dataclass
class EncodedDocument:
    """One document's stage-1 output: `pooled` is [chunks, router_layers, 3 (K, V, Kr), kv, hd]."""

    id: int
    num_tokens: int
    pooled: torch.Tensor


@dataclass(frozen=True)
class PreparedSegment:
    """A run of documents serialised and hashed but not yet on disk (`prepare_segment`)."""

    data: bytes
    documents: int
    chunks: int
    tokens: int
    checksums: dict[str, str]  # sha256 and blake3 of `data`


class BankExistsError(BankError):
    """The output directory already holds a complete bank."""


class BankWriter:
    """Appends segments of encoded documents, then commits the bank with `finish()`."""

    def __init__(self, out: Path, model: ModelInfo, source: dict[str, Any],
                 options: dict[str, Any] | None = None,
                 dtypes: BankDtypes | None = None) -> None:
        self.out = out
        self.model = model
        self.source = source
        self.options = dict(options or {})  # build options that shape the files
        self.dtypes = dtypes or BankDtypes.of_model(model.dtype)
        self.segments: list[dict[str, Any]] = []

    @classmethod
    def open(cls, out: str | Path, model: ModelInfo, source: dict[str, Any],
             options: dict[str, Any] | None = None,
             dtypes: BankDtypes | None = None) -> BankWriter:
        """Start a new build in `out`, or resume the interrupted build of the same inputs
        and `options` (e.g. {"segment_mb": 512}: a resume with other options would mix two
        layouts, so it is refused, naming what changed). `dtypes`: the tiers' stored
        dtypes (default: the model's)."""
        out = Path(out)
        writer = cls(out, model, source, options, dtypes)
        if (out / MANIFEST).exists():
            raise BankExistsError(f"{out} already holds a complete bank")
        state_path = out / BUILD_STATE
        if state_path.exists():
            state = read_json(state_path, "build state")
            expected = writer._identity()
            if state.get("identity") != expected:
                raise BankError(
                    f"{out} holds an interrupted build of different inputs ("
                    + _identity_changes(state.get("identity"), expected)
                    + "); delete it or re-run with the original inputs")
            writer.segments = state["segments"]
        elif out.exists() and any(out.iterdir()):
            raise BankError(f"{out} exists and is not an empty directory or a bank build")
        else:
            (out / SEGMENTS_DIR).mkdir(parents=True, exist_ok=True)
            writer._save_state()
        return writer

    def _identity(self) -> dict[str, Any]:
        options = dict(self.options)
        if self.dtypes.compressed:  # (uncompressed builds keep the identity they always had)
            options["bank_dtype"] = self.dtypes.kv
        return {"model": self.model.to_json(), "source": self.source, "options": options}

    def _save_state(self, stopped: dict[str, str] | None = None) -> None:
        state: dict[str, Any] = {"identity": self._identity(), "segments": self.segments}
        if stopped:
            state["stopped"] = stopped
        write_json_atomic(self.out / BUILD_STATE, state)

    def record_stop(self, reason: str, advice: str) -> None:
        """Note in the build state why this build stopped before finishing (a document the
        engine cannot take, ...): `bank info` and `MemoryBank.open` show it, so the advice
        on the unfinished directory is the fix, not a re-run that fails the same way."""
        self._save_state(stopped={"reason": reason, "advice": advice})

    @property
    def num_done_documents(self) -> int:
        return sum(seg["documents"] for seg in self.segments)

    def add_segment(self, docs: Sequence[EncodedDocument]) -> None:
        """Durably append the next run of documents (in bank order)."""
        if docs:
            self.commit_segment(encoded_segment(self.model, self.dtypes, docs))

    def add_pooled_segment(
        self,
        doc_ids: Sequence[int],
        doc_num_tokens: Sequence[int],
        doc_num_chunks: Sequence[int],
        layers: Mapping[int, Mapping[str, torch.Tensor]],
        on_layer: Callable[[], Any] | None = None,
    ) -> None:
        """Durably append the next run of documents given as whole-run tensors.

        `layers[L][name]` (every router layer L, every name in `POOLED_ORDER`) is
        [sum(doc_num_chunks), kv, hd] in the model's dtype (an FP8 tier is quantised here,
        `quant.py`). Producers that already hold per-layer
        tensors (the synthetic generator) use this, or its two halves, directly and skip
        `add_segment`'s per-document concatenation; every path writes identical segments.
        """
        if doc_ids:
            self.commit_segment(
                self.prepare_segment(doc_ids, doc_num_tokens, doc_num_chunks, layers, on_layer)
            )

    def prepare_segment(
        self,
        doc_ids: Sequence[int],
        doc_num_tokens: Sequence[int],
        doc_num_chunks: Sequence[int],
        layers: Mapping[int, Mapping[str, torch.Tensor]],
        on_layer: Callable[[], Any] | None = None,
    ) -> PreparedSegment:
        """Check, serialise and hash a run of documents (see `add_pooled_segment`;
        `on_layer()` after each router layer's tensors: a progress bar's step).

        Touches no writer state, so several runs may be prepared in parallel threads (the
        CPU-bound part of writing); `commit_segment` then appends them one by one, in order.
        """
        return serialize_segment(self.model, self.dtypes, doc_ids, doc_num_tokens,
                                 doc_num_chunks,
                                 stored_tensors(self.model, self.dtypes, layers, on_layer))

    def commit_segment(self, segment: PreparedSegment) -> None:
        """Durably append a prepared run as the next segment (in bank order)."""
        name = segment_name(len(self.segments))
        write_atomic(self.out / name, segment.data)
        self.segments.append({
            "file": name,
            "documents": segment.documents,
            "chunks": segment.chunks,
            "tokens": segment.tokens,
            **segment.checksums,
            "bytes": len(segment.data),
        })
        self._save_state()

    def finish(
        self,
        template_ids: Sequence[int],
        template_kv: torch.Tensor,
        documents: Iterable[tuple[int, str]],
    ) -> None:
        """Write the template and texts, then commit: `manifest.json` appears atomically.

        `template_kv` is [T, num_layers, 2, kv, hd]; `documents` are (id, text) in bank order.
        """
        tensors = {"template_ids": torch.tensor(list(template_ids), dtype=torch.int64)}
        for layer in range(self.model.num_layers):
            tensors[layer_key(layer, "keys")] = template_kv[:, layer, 0].contiguous()
            tensors[layer_key(layer, "values")] = template_kv[:, layer, 1].contiguous()
        template_data = save(tensors)
        write_atomic(self.out / TEMPLATE_FILE, template_data)

        docs_data = documents_data(documents)
        write_atomic(self.out / DOCUMENTS_FILE, docs_data)

        # (Segments of a build resumed from an older writer may have a sha256 only.)
        files = {seg["file"]: {k: seg[k] for k in ("sha256", "blake3", "bytes") if k in seg}
                 for seg in self.segments}
        for name, data in ((TEMPLATE_FILE, template_data), (DOCUMENTS_FILE, docs_data)):
            files[name] = {**digests(data), "bytes": len(data)}
        manifest = build_manifest(self.model, self.source, self.segments, files,
                                  len(template_ids), self.dtypes)
        if "segment_mb" in self.options:  # what `bank add` and `bank compact` segment by
            manifest["segment_mb"] = self.options["segment_mb"]
        write_json_atomic(self.out / MANIFEST, manifest)
        (self.out / BUILD_STATE).unlink(missing_ok=True)
        for stale in (self.out / SEGMENTS_DIR).glob("*.tmp"):
            stale.unlink(missing_ok=True)


def encoded_segment(model: ModelInfo, dtypes: BankDtypes, docs: Sequence[EncodedDocument]
                    ) -> PreparedSegment:
    """A run of encoded documents (in bank order) serialised as one segment."""
    return serialize_segment(model, dtypes, [d.id for d in docs], [d.num_tokens for d in docs],
                             [d.pooled.shape[0] for d in docs],
                             stored_tensors(model, dtypes, pooled_layers(model, docs)))


def pooled_layers(model: ModelInfo, docs: Sequence[EncodedDocument]
                  ) -> dict[int, dict[str, torch.Tensor]]:
    """Encoded documents as whole-run tensors per router layer (`add_pooled_segment`)."""
    pooled = torch.cat([d.pooled for d in docs])  # [chunks, R, 3, kv, hd]
    return {layer: {name: pooled[:, r, i] for i, name in enumerate(POOLED_ORDER)}
            for r, layer in enumerate(model.router_layers)}


def stored_tensors(model: ModelInfo, dtypes: BankDtypes,
                   layers: Mapping[int, Mapping[str, torch.Tensor]],
                   on_layer: Callable[[], Any] | None = None) -> dict[str, torch.Tensor]:
    """Every router layer's pooled tensors (model dtype, [chunks, kv, hd]) as the segment
    file stores them: an FP8 tier quantised here (`quant.py`), with its scales."""
    dtype = getattr(torch, model.dtype)
    tensors: dict[str, torch.Tensor] = {}
    shape = None
    for layer in model.router_layers:
        for name in POOLED_ORDER:
            t = layers[layer][name]
            shape = shape or (t.shape[0], model.num_kv_heads, model.head_dim)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"layer {layer} {name}: got {tuple(t.shape)} {t.dtype}, the "
                                 f"bank needs {shape} {dtype}")
            if dtypes.scaled(name):
                values, scale = quantize(t)
                tensors[layer_key(layer, name)] = values
                tensors[layer_key(layer, name) + SCALE_SUFFIX] = scale
            else:
                tensors[layer_key(layer, name)] = t.contiguous()
        if on_layer is not None:
            on_layer()
    return tensors


def serialize_segment(model: ModelInfo, dtypes: BankDtypes, doc_ids: Sequence[int],
                      doc_num_tokens: Sequence[int], doc_num_chunks: Sequence[int],
                      tensors: Mapping[str, torch.Tensor]) -> PreparedSegment:
    """A segment file's bytes and checksums from its stored tensors (`stored_tensors`, or
    rows a compaction copies as stored: either way the same documents give the same bytes)
    plus the document tables derived from the ids and counts."""
    if not doc_ids:
        raise ValueError("a segment needs at least one document")
    if not len(doc_ids) == len(doc_num_tokens) == len(doc_num_chunks):
        raise ValueError("doc_ids, doc_num_tokens and doc_num_chunks differ in length")
    num_chunks = sum(doc_num_chunks)
    expected = {key: (dtype, shape) for layer in model.router_layers
                for key, dtype, shape in dtypes.layer_tensors(
                    layer, num_chunks, model.num_kv_heads, model.head_dim)}
    if set(tensors) != set(expected):
        raise ValueError(f"segment tensors {sorted(tensors)}, expected {sorted(expected)}")
    for key, (dtype, shape) in expected.items():
        if tuple(tensors[key].shape) != shape or tensors[key].dtype != dtype:
            raise ValueError(f"{key}: got {tuple(tensors[key].shape)} {tensors[key].dtype}, "
                             f"the bank needs {shape} {dtype}")
    ids = torch.tensor(list(doc_ids), dtype=torch.int64)
    chunks = torch.tensor(list(doc_num_chunks), dtype=torch.int64)
    tables = {"chunk_doc_ids": torch.repeat_interleave(ids, chunks), "doc_ids": ids,
              "doc_num_chunks": chunks,
              "doc_num_tokens": torch.tensor(list(doc_num_tokens), dtype=torch.int64)}
    data = save({**tensors, **tables})
    return PreparedSegment(data, len(doc_ids), num_chunks, sum(doc_num_tokens), digests(data))


def _identity_changes(old: Any, new: dict[str, Any]) -> str:
    """What differs between an interrupted build's identity and this run's, in words."""
    old = old if isinstance(old, dict) else {}
    changes = []
    if old.get("model") != new["model"]:
        changes.append("the model or its dtype changed")
    if old.get("source") != new["source"]:
        changes.append("the documents changed")
    before, now = old.get("options") or {}, new["options"]
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key):
            changes.append(f"--{key.replace('_', '-')} was {before.get(key)}, now "
                           f"{now.get(key)}")
    return "; ".join(changes) or "options changed"


def build_manifest(
    model: ModelInfo,
    source: dict[str, Any],
    segments: Sequence[dict[str, Any]],
    files: dict[str, dict[str, Any]],
    template_tokens: int,
    dtypes: BankDtypes | None = None,
) -> dict[str, Any]:
    """The manifest of a bank with these segments and files (`finish()` commits it; the
    synthetic generator's dry run shows a predicted one through `bank info`'s summary).
    A bank with an FP8 tier is format 2 and records its tiers; others stay format 1."""
    compressed = dtypes is not None and dtypes.compressed
    tiers = {"tiers": dtypes.to_json()} if compressed else {}
    return {
        "format": FORMAT_NAME,
        "format_version": COMPRESSED_VERSION if compressed else FORMAT_VERSION,
        **tiers,
        "created_by": f"vllm-msa {__version__}",
        "model": model.to_json(),
        "source": source,
        "counts": {
            "documents": sum(seg["documents"] for seg in segments),
            "chunks": sum(seg["chunks"] for seg in segments),
            "tokens": sum(seg["tokens"] for seg in segments),
            "template_tokens": template_tokens,
        },
        "segments": [
            {k: seg[k] for k in ("file", "documents", "chunks", "tokens")} for seg in segments
        ],
        "files": files,
    }
