"""Edits of a bank that an offline `vllm.LLM` serves, with the guarantees of the HTTP routes.

    from vllm_msa.serving.llm_edits import add_served, remove_served
    add_served(llm, "docs", [{"id": 100, "text": "..."}])       # encoded by `llm` itself
    remove_served(llm, "docs", [3, 17])

Each call commits the bank's next generation to disk, then switches every worker of the
engine to it (`worker_state.apply_generation`) and the engine's admission, before it returns:
the next `generate` routes over the new generation. New documents are encoded by the
serving engine (`encode.py`), not by a second model copy. Calls are not thread-safe with
`generate` on the same `LLM` (an `LLM` is used from one thread).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..bank.documents import Document
from ..bank.format import BankError
from ..bank.reader import MemoryBank


def served_path(llm: Any, bank: str) -> str:
    from ..options import ServingConfig

    serving = ServingConfig.from_additional_config(
        llm.llm_engine.vllm_config.additional_config)
    if bank not in serving.banks:
        raise KeyError(f"bank {bank!r} is not served by this engine; banks: "
                       f"{sorted(serving.banks)}")
    return serving.banks[bank]


def as_documents(documents: Iterable[Document | dict[str, Any]]) -> list[Document]:
    from .edits import document_problem

    out = []
    for doc in documents:
        if isinstance(doc, Document):
            doc = {"id": doc.id, "text": doc.text}
        problem = document_problem(doc)
        if problem:
            raise BankError(problem)
        out.append(Document(doc["id"], doc["text"]))
    ids = [d.id for d in out]
    if not out or len(set(ids)) != len(ids):
        raise BankError("expected at least one document, each id once")
    return out


def add_served(llm: Any, bank: str, documents: Iterable[Document | dict[str, Any]], *,
               replace: bool = False) -> MemoryBank:
    """Encode `documents` ({"id", "text"} each) with `llm` and add them to its served bank
    `bank`; an id the bank holds is refused unless `replace`. Returns the new generation."""
    import uuid

    from ..bank.edit import add_encoded, present_ids
    from .encode import encode_with_llm

    path = served_path(llm, bank)
    docs = as_documents(documents)
    opened = MemoryBank.open(path)
    present_ids(opened, [d.id for d in docs], replace, "add with replace=True to replace them")
    encoded = encode_with_llm(llm, bank, docs, opened.model_info)
    edited = add_encoded(path, encoded, {d.id: d.text for d in docs}, replace=replace,
                         identity={"online": uuid.uuid4().hex})
    return switch(llm, bank, edited)


def remove_served(llm: Any, bank: str, ids: Iterable[int]) -> MemoryBank:
    """Remove documents `ids` from `llm`'s served bank `bank`. Returns the new generation."""
    from ..bank.edit import remove_documents

    return switch(llm, bank, remove_documents(served_path(llm, bank), list(ids)))


def switch(llm: Any, bank: str, edited: MemoryBank) -> MemoryBank:
    """Every worker and the admission of `llm` onto committed generation `edited`."""
    from ..patches.input_processor import admission_for

    llm.collective_rpc("msa_apply_generation", args=(bank,))
    admission = admission_for(llm.llm_engine.vllm_config)
    if admission is not None:
        admission.refresh(bank, edited)
    return edited
