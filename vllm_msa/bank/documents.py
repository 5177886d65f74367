"""Reading the documents a bank is built from (`DOCS.jsonl`: one {"id": int, "text": str})."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Document:
    id: int
    text: str


class DocumentsError(ValueError):
    """A malformed documents file; the message names the line."""


def read_documents(path: str | Path) -> tuple[list[Document], str]:
    """All documents in file order and the sha256 of the file (what a resumed build checks)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DocumentsError(f"cannot read documents file {path}: {e}") from None
    docs: list[Document] = []
    seen: dict[int, int] = {}
    for lineno, line in enumerate(raw.decode("utf-8", errors="strict").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DocumentsError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or set(obj) - {"id", "text"} or not {"id", "text"} <= set(obj):
            raise DocumentsError(f'{where}: expected an object {{"id": int, "text": str}}')
        doc_id, text = obj["id"], obj["text"]
        if isinstance(doc_id, bool) or not isinstance(doc_id, int) or doc_id < 0:
            raise DocumentsError(f"{where}: id must be an integer >= 0, got {doc_id!r}")
        if not isinstance(text, str):
            raise DocumentsError(f"{where}: text must be a string, got {type(text).__name__}")
        if doc_id in seen:
            raise DocumentsError(f"{where}: duplicate id {doc_id} (first on line {seen[doc_id]})")
        seen[doc_id] = lineno
        docs.append(Document(doc_id, text))
    if not docs:
        raise DocumentsError(f"{path}: no documents")
    return docs, hashlib.sha256(raw).hexdigest()
