"""Edits of a bank: remove documents, add documents (or replace them).

Each edit commits one new generation (`generations.py`): removals are tombstones in the
manifest (the segment files stay as they are until `compact.py` rewrites them); added
documents are encoded by the same stage-1 path as `bank build` (`build.encode_documents`,
the same engine options) into new segments. Either the whole edit is committed or nothing:
an edit stopped at any point leaves the previous generation, and re-running the same add
continues where it stopped. A running server encodes added documents with its own engine and
commits them with `add_encoded` (`serving/encode.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .documents import read_documents
from .format import DEFAULT_SEGMENT_MB, BankError
from .generations import (
    PendingGeneration,
    clean_up,
    commit_generation,
    edit_lock,
    editable_bank,
    with_removed,
)
from .model_info import ModelInfo, dtype_name, resolve_checkpoint
from .reader import MemoryBank
from .writer import EncodedDocument, encoded_segment

_SHOWN_IDS = 20  # ids an error message lists before "and N more"


class NotLive(BankError):
    """Documents an edit names that the bank does not hold live (`removed`: it held them)."""

    def __init__(self, message: str, unknown: list[int], removed: list[int]) -> None:
        super().__init__(message)
        self.unknown, self.removed = unknown, removed


def remove_documents(bank: str | Path | MemoryBank, ids: Iterable[int]) -> MemoryBank:
    """Remove the live documents `ids` from `bank` in one new generation (tombstones: the
    data stays in the files until `compact_bank`); returns that generation. An id that is
    not live (unknown, or removed already) is an error naming it, and nothing is written."""
    ids = sorted(set(ids))
    if not ids:
        raise BankError("no document ids to remove")
    path = bank.path if isinstance(bank, MemoryBank) else Path(bank)
    with edit_lock(path):
        opened = editable_bank(path, "remove", synthetic_ok=True)
        return commit_generation(opened, tombstoned(opened, ids), {},
                                 {"operation": "remove", "ids": ids})


def tombstoned(bank: MemoryBank, ids: list[int]) -> list[dict[str, Any]]:
    """`bank`'s segment entries with its live documents `ids` removed."""
    layout = bank.physical
    live = layout.live_positions_of(ids)
    missing = [i for i in ids if i not in live]
    if missing:
        stored = set(layout.doc_ids.tolist())
        removed = [i for i in missing if i in stored]
        unknown = [i for i in missing if i not in stored]
        reasons = ([f"{show_ids(removed)} removed already"] if removed else []) + (
            [f"{show_ids(unknown)} not in the bank"] if unknown else [])
        raise NotLive(f"bank {bank.path}: document{'s' * (len(missing) > 1)} "
                      + " and ".join(reasons) + "; nothing was changed", unknown, removed)
    segments = [dict(seg) for seg in bank.manifest["segments"]]
    by_segment: dict[int, list[int]] = {}
    for doc_id in ids:
        by_segment.setdefault(layout.segment_of(live[doc_id]), []).append(doc_id)
    for seg, seg_ids in by_segment.items():
        positions = [live[i] for i in seg_ids]
        segments[seg] = with_removed(
            segments[seg], seg_ids, sum(int(layout.doc_num_chunks[p]) for p in positions),
            sum(int(layout.doc_num_tokens[p]) for p in positions))
    return segments


def present_ids(bank: MemoryBank, ids: list[int], replace: bool, advice: str) -> list[int]:
    """Which of `ids` `bank` holds live (an add replaces them); refused, with `advice`,
    unless `replace`."""
    live = bank.physical.live_positions_of(ids)
    present = [i for i in ids if i in live]
    if present and not replace:
        raise BankError(f"bank {bank.path} already holds document"
                        f"{'s' * (len(present) > 1)} {show_ids(present)}: {advice}; nothing "
                        "was changed")
    return present


def show_ids(ids: list[int]) -> str:
    more = len(ids) - _SHOWN_IDS
    return ", ".join(map(str, ids[:_SHOWN_IDS])) + (f" and {more} more" if more > 0 else "")


def add_documents(
    bank: str | Path | MemoryBank,
    model: str | Path,
    docs: str | Path,
    *,
    replace: bool = False,
    segment_mb: float | None = None,
    progress: bool = True,
    llm: Any | None = None,
    **engine_args: Any,
) -> MemoryBank:
    """Encode the documents of `docs` (a DOCS.jsonl) with checkpoint `model` and append
    them to `bank` in one new generation; returns it.

    `model` must be the checkpoint the bank was built from (its fingerprint and shapes;
    refused otherwise, naming the difference); the engine runs in the bank's dtype unless
    `engine_args` say otherwise (and then must match). An id the bank holds live is refused
    unless `replace`: its old copy is then removed and the new one appended, in the same
    generation. `segment_mb`: segment size (default the bank's own). A run stopped part-way
    leaves the previous generation; running the same add again continues after the
    segments it wrote, and running it after it finished returns the bank unchanged.
    `engine_args` and `llm` as for `build_bank`.
    """
    from .build import encode_documents, encoder_llm, shutdown_engine

    documents, docs_sha256 = read_documents(docs)
    checkpoint = resolve_checkpoint(model)
    path = bank.path if isinstance(bank, MemoryBank) else Path(bank)
    with edit_lock(path):
        opened = editable_bank(path, "add")
        dtype = engine_args.get("dtype")
        dtype = opened.model_info.dtype if dtype in (None, "auto") else dtype_name(dtype)
        engine_args["dtype"] = dtype
        info = ModelInfo.from_checkpoint(checkpoint, dtype)
        opened.model_info.check_compatible(info, path)
        segment_mb = segment_mb or opened.manifest.get("segment_mb", DEFAULT_SEGMENT_MB)
        identity = {"operation": "add", "documents_sha256": docs_sha256,
                    "num_documents": len(documents), "replace": replace,
                    "segment_mb": segment_mb, "model": info.fingerprint}
        if opened.manifest.get("last_edit") == identity:
            clean_up(opened)  # (what a run killed after its commit left)
            return opened  # this add is the committed generation already
        present = present_ids(opened, [d.id for d in documents], replace,
                              "add with --replace (replace=True) to replace them")
        pending = PendingGeneration.start(opened, identity)
        texts = {d.id: d.text for d in documents}

        def write(encoded: list[EncodedDocument]) -> None:
            pending.add_segment(encoded_segment(info, opened.dtypes, encoded),
                                [(d.id, texts[d.id]) for d in encoded])

        remaining = documents[pending.num_done_documents:]
        if remaining:
            engine = llm if llm is not None else encoder_llm(checkpoint, **engine_args)
            try:
                served = dtype_name(engine.llm_engine.model_config.dtype)
                opened.model_info.check_compatible(ModelInfo.from_checkpoint(checkpoint, served),
                                                   path)
                encode_documents(engine, info, remaining, write, segment_mb=segment_mb,
                                 progress=progress, done=pending.num_done_documents,
                                 desc="encoding added documents",
                                 advice="re-run with a larger --max-model-len (the add "
                                 "resumes), or split the document")
            finally:
                if llm is None:
                    shutdown_engine(engine)
        kept = tombstoned(opened, present) if present else list(opened.manifest["segments"])
        return pending.commit([*kept, *pending.segments], identity)


def add_encoded(bank: str | Path | MemoryBank, encoded: list[EncodedDocument],
                texts: dict[int, str], *, replace: bool = False,
                identity: dict[str, Any] | None = None,
                synthetic_ok: bool = False) -> MemoryBank:
    """Append documents already encoded by stage 1 (`encoded`, in the order to store them;
    `texts` by id) to `bank` in one new generation, as `add_documents` would have written
    them; returns it. An id the bank holds live is refused unless `replace` (then its old
    copy is removed in the same generation). Durable when it returns: the segment, the
    texts and the manifest are on disk (`generations.commit_generation`). `synthetic_ok`:
    add to a synthetic bank too (benchmarks; it stays marked synthetic)."""
    if not encoded:
        raise BankError("no documents to add")
    path = bank.path if isinstance(bank, MemoryBank) else Path(bank)
    with edit_lock(path):
        opened = editable_bank(path, "add", synthetic_ok=synthetic_ok)
        present = present_ids(opened, [d.id for d in encoded], replace,
                              "replace them instead")
        identity = {"operation": "add", "num_documents": len(encoded), "replace": replace,
                    **(identity or {})}
        pending = PendingGeneration.start(opened, identity, resumable=False)
        pending.add_segment(encoded_segment(opened.model_info, opened.dtypes, encoded),
                            [(d.id, texts[d.id]) for d in encoded])
        kept = tombstoned(opened, present) if present else list(opened.manifest["segments"])
        return pending.commit([*kept, *pending.segments], identity)
