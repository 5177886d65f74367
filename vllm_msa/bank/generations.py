"""Bank generations: how a bank changes without ever being half-changed.

A bank is the last manifest written. An edit (`edit.py`, `compact.py`) makes generation
N+1 from generation N:

1. new data files are written under names that carry N+1 (`format.segment_name`), each
   durable (fsync, rename) before `edit-state.json` lists it; no file of generation N is
   ever rewritten;
2. the manifest of N+1 replaces `manifest.json` atomically (`format.write_json_atomic`):
   the commit point;
3. only then are files that N+1 no longer references deleted (a compaction's old
   segments), with the edit state.

A kill at any moment before step 2 leaves generation N, complete; the files written so far
are resumed by a re-run of the same edit (the state names the manifest it started from) or
deleted by the next edit. A kill during step 3 leaves stray files the next edit deletes.
Readers that opened generation N hold its files open (`reader.py`), so step 3 never
breaks them.

In the manifest an edited bank is format 3 with `"generation": N`; each segment entry may
carry `"texts"` (its own documents file) and `"removed"` (ids of its documents that are
removed, with their `removed_chunks` and `removed_tokens`): a tombstone names a segment and
an id, since a replaced id is live again in a later segment. `counts` are the live
documents, chunks and tokens, with the removed ones under `counts["removed"]`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from .format import (
    DOCUMENTS_FILE,
    EDIT_STATE,
    LIVE_VERSION,
    MANIFEST,
    SEGMENTS_DIR,
    BankError,
    digests,
    documents_data,
    fsync_dir,
    read_json,
    segment_name,
    texts_name,
    write_atomic,
    write_json_atomic,
)
from .reader import MemoryBank
from .writer import PreparedSegment

_SEGMENT_KEYS = ("file", "texts", "documents", "chunks", "tokens", "removed",
                 "removed_chunks", "removed_tokens")
_CHECKSUM_KEYS = ("sha256", "blake3", "bytes")


@contextlib.contextmanager
def edit_lock(path: Path) -> Iterator[None]:
    """Hold the bank's edit lock (an advisory lock on its directory, released by the
    system when the process dies): two edits of one bank would both build on generation N
    and the second commit would drop the first's changes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise BankError(f"bank {path} is being edited by another process; wait for "
                                "it to finish") from None
            raise
        yield
    finally:
        os.close(fd)  # (closing the descriptor releases the lock)


def editable_bank(bank: str | Path | MemoryBank, operation: str,
                  synthetic_ok: bool = False) -> MemoryBank:
    """The committed generation of `bank` (re-read: it may have changed since a caller
    opened it), refused for `operation` if it has no files (virtual) or, unless
    `synthetic_ok`, holds random tensors (synthetic)."""
    path = bank.path if isinstance(bank, MemoryBank) else Path(bank)
    opened = MemoryBank.open(path)
    if "virtual" in opened.manifest:
        raise BankError(f"bank {path} is virtual (a manifest only, its tensors generated on "
                        f"read): it cannot be edited ({operation}); synthesise another one")
    if not synthetic_ok and "synthetic" in (opened.manifest.get("source") or {}):
        raise BankError(f"bank {path} is synthetic (random tensors, placeholder texts): "
                        f"{operation} would mix encoded documents into it; build a bank of "
                        "real documents instead")
    return opened


def manifest_digest(bank: MemoryBank) -> str:
    """sha256 of the committed manifest's bytes: which generation an edit builds on."""
    return hashlib.sha256((bank.path / MANIFEST).read_bytes()).hexdigest()


def segment_entry(seg: dict[str, Any]) -> dict[str, Any]:
    """A segment as the manifest lists it (no checksums: those are under "files")."""
    return {k: seg[k] for k in _SEGMENT_KEYS if k in seg}


def with_removed(seg: dict[str, Any], ids: Sequence[int], chunks: int, tokens: int
                 ) -> dict[str, Any]:
    """Segment entry `seg` with more of its documents removed."""
    out = dict(seg)
    out["removed"] = sorted({*seg.get("removed", []), *ids})
    out["removed_chunks"] = int(seg.get("removed_chunks", 0)) + chunks
    out["removed_tokens"] = int(seg.get("removed_tokens", 0)) + tokens
    return out


def live_counts(segments: Sequence[dict[str, Any]], template_tokens: int) -> dict[str, Any]:
    """The manifest's counts for these segment entries: live, and removed if any."""
    removed = {"documents": sum(len(s.get("removed", [])) for s in segments),
               "chunks": sum(int(s.get("removed_chunks", 0)) for s in segments),
               "tokens": sum(int(s.get("removed_tokens", 0)) for s in segments)}
    counts: dict[str, Any] = {
        "documents": sum(int(s["documents"]) for s in segments) - removed["documents"],
        "chunks": sum(int(s["chunks"]) for s in segments) - removed["chunks"],
        "tokens": sum(int(s["tokens"]) for s in segments) - removed["tokens"],
        "template_tokens": template_tokens,
    }
    if removed["documents"]:
        counts["removed"] = removed
    return counts


def commit_generation(bank: MemoryBank, segments: Sequence[dict[str, Any]],
                      new_files: dict[str, dict[str, Any]], edit: dict[str, Any]
                      ) -> MemoryBank:
    """Commit generation `bank.generation + 1` with these segment entries (every data file
    they name durable already: `new_files` holds the checksums of those this edit wrote),
    then delete what it no longer references. `edit` is recorded as the manifest's
    "last_edit" (a re-run of the same edit finds it done). Returns the new generation."""
    old = bank.manifest
    if live_counts(segments, 0)["documents"] < 1:
        raise BankError(f"bank {bank.path}: an edit cannot leave it without documents")
    entries = [segment_entry(s) for s in segments]
    referenced = {name for s in entries for name in (s["file"], s.get("texts")) if name}
    referenced |= {name for name in old["files"] if not _is_segment_data(name)}
    if any("texts" not in s for s in entries):
        referenced.add(DOCUMENTS_FILE)
    files = {**old["files"], **new_files}
    manifest = {
        **old,
        "format_version": LIVE_VERSION,
        "generation": bank.generation + 1,
        "edited_by": f"vllm-msa {__version__}",
        "last_edit": edit,
        "counts": live_counts(entries, old["counts"]["template_tokens"]),
        "segments": entries,
        "files": {name: files[name] for name in sorted(referenced)},
    }
    write_json_atomic(bank.path / MANIFEST, manifest)
    committed = MemoryBank.open(bank.path)
    clean_up(committed)
    return committed


def clean_up(bank: MemoryBank) -> None:
    """After a commit (or on finding an edit committed already): delete what generation
    `bank` does not reference, and the edit state."""
    remove_unreferenced(bank)  # (syncs the directories where it deletes)
    state = bank.path / EDIT_STATE
    if state.exists():  # (an online add keeps none: nothing to sync then)
        state.unlink(missing_ok=True)
        fsync_dir(bank.path)


def _is_segment_data(name: str) -> bool:
    """A file a generation may stop referencing (segments and texts, not the template)."""
    return name.startswith(f"{SEGMENTS_DIR}/") or name == DOCUMENTS_FILE


def remove_unreferenced(bank: MemoryBank, keep: Sequence[str] = ()) -> list[str]:
    """Delete the data files generation `bank` does not reference (a compaction's old
    segments, a killed edit's leftovers); `keep`: files of a pending edit being resumed.
    Returns the names deleted."""
    referenced = set(bank.manifest["files"]) | set(keep)
    gone = []
    names = []
    if (bank.path / SEGMENTS_DIR).is_dir():
        with os.scandir(bank.path / SEGMENTS_DIR) as entries:  # (one listing, no stat a file)
            names = sorted(f"{SEGMENTS_DIR}/{e.name}" for e in entries if e.is_file())
    if (bank.path / DOCUMENTS_FILE).is_file():
        names.append(DOCUMENTS_FILE)
    for name in names:
        if name not in referenced:
            (bank.path / name).unlink(missing_ok=True)
            gone.append(name)
    if gone:
        fsync_dir(bank.path / SEGMENTS_DIR)
        fsync_dir(bank.path)
    return gone


class PendingGeneration:
    """The new segments of generation N+1, written durably one by one before the commit.

    `identity` says which edit this is (the operation and its inputs); with the digest of
    generation N's manifest it makes the resume key, kept in `edit-state.json`: a re-run of
    the same edit on the same generation continues after the segments already written;
    anything else starts over (the old pending files are deleted: the bank is generation N,
    nothing of an uncommitted edit is promised).
    """

    def __init__(self, bank: MemoryBank, identity: dict[str, Any], resumable: bool = True
                 ) -> None:
        self.bank = bank
        self.resumable = resumable
        self.generation = bank.generation + 1
        self.identity = {**identity, "base_manifest_sha256": manifest_digest(bank)}
        self.first_index = len(bank.manifest["segments"])
        self.segments: list[dict[str, Any]] = []  # entries with their files' checksums

    @classmethod
    def start(cls, bank: MemoryBank, identity: dict[str, Any], resumable: bool = True
              ) -> PendingGeneration:
        """Resume the pending edit `identity` of `bank`, or start it. `resumable` False: an
        edit written in one go (a running server's add: one segment, its rows in memory)
        keeps no edit state; a kill before its commit leaves files the next edit deletes."""
        pending = cls(bank, identity, resumable)
        state_path = bank.path / EDIT_STATE
        if resumable and state_path.exists():
            try:
                state = read_json(state_path, "edit state")
            except BankError:
                state = {}
            if state.get("identity") == pending.identity and pending._intact(state):
                pending.segments = list(state["segments"])
        remove_unreferenced(bank, keep=pending.files())
        if resumable:
            pending._save()
        else:  # (another edit's state: this one replaces it)
            state_path.unlink(missing_ok=True)
        return pending

    def _intact(self, state: dict[str, Any]) -> bool:
        segments = state.get("segments")
        if not isinstance(segments, list):
            return False
        for seg in segments:
            for name, meta in _files_of(seg).items():
                path = self.bank.path / name
                if not path.is_file() or path.stat().st_size != meta["bytes"]:
                    return False
        return True

    def _save(self) -> None:
        write_json_atomic(self.bank.path / EDIT_STATE,
                          {"identity": self.identity, "segments": self.segments})

    @property
    def num_done_documents(self) -> int:
        return sum(int(seg["documents"]) for seg in self.segments)

    def files(self) -> dict[str, dict[str, Any]]:
        """Checksums of every file written so far (the manifest's "files" entries)."""
        return {name: meta for seg in self.segments for name, meta in _files_of(seg).items()}

    def add_segment(self, segment: PreparedSegment, texts: Sequence[tuple[int, str]],
                    index: int | None = None) -> None:
        """Durably write the next new segment and its documents' texts, then record it.
        `index`: its position in generation N+1 (default: after the bank's segments and
        those written so far); it names the files."""
        index = self.first_index + len(self.segments) if index is None else index
        name, texts_file = segment_name(index, self.generation), texts_name(index,
                                                                           self.generation)
        data = documents_data(texts)
        write_atomic(self.bank.path / texts_file, data, sync_dir=False)
        write_atomic(self.bank.path / name, segment.data, sync_dir=False)
        fsync_dir((self.bank.path / name).parent)  # (both renames durable at once)
        self.segments.append({
            "file": name, "texts": texts_file, "documents": segment.documents,
            "chunks": segment.chunks, "tokens": segment.tokens,
            "checksums": {name: {**segment.checksums, "bytes": len(segment.data)},
                          texts_file: {**digests(data), "bytes": len(data)}},
        })
        if self.resumable:
            self._save()

    def write_texts(self, index: int, texts: Sequence[tuple[int, str]]
                    ) -> tuple[str, dict[str, Any]]:
        """Durably write a texts file for segment `index` of generation N+1 (a kept segment
        whose texts move out of a build's documents file); its name and checksums. Not
        recorded: cheap to write again after an interruption."""
        name, data = texts_name(index, self.generation), documents_data(texts)
        write_atomic(self.bank.path / name, data)
        return name, {**digests(data), "bytes": len(data)}

    def commit(self, segments: Sequence[dict[str, Any]], edit: dict[str, Any],
               more_files: dict[str, dict[str, Any]] | None = None) -> MemoryBank:
        """Commit generation N+1 made of `segments` (kept entries of generation N and this
        edit's `self.segments`, in bank order); `more_files`: checksums of other files
        this edit wrote (`write_texts`)."""
        return commit_generation(self.bank, segments, {**self.files(), **(more_files or {})},
                                 edit)


def _files_of(seg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: {k: meta[k] for k in _CHECKSUM_KEYS if k in meta}
            for name, meta in seg.get("checksums", {}).items()}
