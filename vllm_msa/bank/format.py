"""The on-disk bank format: names, the manifest, checksums and atomic writes.

A bank is a directory:

    manifest.json                  written last; its presence is what makes the bank loadable
    template.safetensors           template_ids [T] and every layer's template-head K/V [T, kv, hd]
    segments/seg-NNNNN.safetensors a run of documents in bank order: per router layer L
                                   `layer.L.routing_keys|keys|values` [chunks, kv, hd] (an FP8
                                   tier adds `layer.L.<name>.scale` [chunks, kv] float32), plus
                                   chunk_doc_ids [chunks], doc_ids, doc_num_chunks, doc_num_tokens
    documents.jsonl                {"id", "text"} per document, in bank order

The manifest records the format version, the model it was built from (fingerprint and the
shapes that must match), the counts and the sha256 and size of every data file. Everything is
safetensors or JSON: nothing is unpickled, so opening a bank never runs code.

An edited bank (`generations.py`) is format 3: its manifest has a "generation", segments
appended by an edit carry their own texts file (`segments/seg-NNNNN.gG.documents.jsonl`),
and a segment lists the ids of its documents that are removed. A bank without "generation"
is generation 0 (a build).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

FORMAT_NAME = "vllm-msa-bank"
FORMAT_VERSION = 1  # what a bank with every tier in the model's dtype is written as
COMPRESSED_VERSION = 2  # a bank with an FP8 tier (its manifest has "tiers"; scales beside)
LIVE_VERSION = 3  # an edited bank: generations, tombstones, texts per appended segment
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
BUILD_STATE = "build-state.json"
EDIT_STATE = "edit-state.json"  # the files of an uncommitted next generation (resumable)
TEMPLATE_FILE = "template.safetensors"
DOCUMENTS_FILE = "documents.jsonl"
SEGMENTS_DIR = "segments"
DEFAULT_SEGMENT_MB = 512  # bank data per resumable segment
# The command line's names for a tier dtype: the model's own, or FP8 with scales (dtypes.py).
BANK_DTYPES = ("auto", "fp8_e4m3")
# How serving may hold a bank's routing index on the GPU (the engine option `index_dtype`:
# `vllm_msa/attention/compressed_index.py`); the bank files keep it in the model's dtype.
INDEX_DTYPES = ("auto", "int8", "fp8_e4m3")
# Order of the three pooled tensors along dim 2 of the encoder's per-document output.
POOLED_ORDER = ("keys", "values", "routing_keys")


class BankError(Exception):
    """A bank that cannot be used: missing, incomplete, corrupt or malformed."""


class BankMismatchError(BankError):
    """A bank that does not match the model it is used with."""


def segment_name(index: int, generation: int = 0) -> str:
    """A segment's file; an edit's new segments carry their generation in the name, so that
    writing them can never touch a file an earlier generation still reads."""
    tag = f".g{generation}" if generation else ""
    return f"{SEGMENTS_DIR}/seg-{index:05d}{tag}.safetensors"


def texts_name(index: int, generation: int) -> str:
    """The texts file of a segment written by an edit (a build keeps them in DOCUMENTS_FILE)."""
    return segment_name(index, generation).removesuffix(".safetensors") + ".documents.jsonl"


def documents_data(documents: Iterable[tuple[int, str]]) -> bytes:
    """(id, text) pairs as a documents file: one JSON object per line."""
    lines = [json.dumps({"id": i, "text": t}, ensure_ascii=False) for i, t in documents]
    return ("\n".join(lines) + "\n").encode("utf-8")


def layer_key(layer: int, name: str) -> str:
    return f"layer.{layer}.{name}"


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()


def blake3_file(path: Path) -> str:
    """BLAKE3 of a file, memory-mapped (~6 GB/s a core where sha256 gives ~1): what start-up
    verifies, so that hashing a large bank does not dominate a server's start."""
    import blake3

    h = blake3.blake3()
    if Path(path).stat().st_size:
        h.update_mmap(str(path))
    return h.hexdigest()


def digests(data: bytes) -> dict[str, str]:
    """The manifest's checksums of a file's bytes: sha256 (every bank has it) and BLAKE3
    (banks written since format 1.1 of the writer; start-up verification prefers it)."""
    import blake3

    return {"sha256": hashlib.sha256(data).hexdigest(),
            "blake3": blake3.blake3(data).hexdigest()}


def file_problem(path: Path, meta: dict[str, Any]) -> str | None:
    """Why the file at `path` does not match its manifest entry (None: it matches), by its
    BLAKE3 where the manifest has one, else its sha256."""
    if not path.is_file():
        return "is missing"
    if path.stat().st_size != meta.get("bytes"):
        return f"has {path.stat().st_size} bytes, the manifest says {meta.get('bytes')}"
    algorithm = "blake3" if meta.get("blake3") else "sha256"
    digest = blake3_file(path) if algorithm == "blake3" else sha256_file(path)
    if digest != meta.get(algorithm):
        return f"{algorithm} {digest} does not match the manifest"
    return None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, sync_dir: bool = True) -> None:
    """Write `data` so that `path` holds either its old content or all of `data`, never part.
    `sync_dir` False leaves the rename's durability to the caller's one `fsync_dir` after
    several files of the same directory (an edit's segment and its texts)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BankError(f"cannot read {what} {path}: {e}") from None
    if not isinstance(obj, dict):
        raise BankError(f"{what} {path} is not a JSON object")
    return obj
