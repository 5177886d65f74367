"""Memory banks: MSA's stage-1 output as a durable, verifiable directory.

`MemoryBank` (reading) needs only torch and safetensors; `build_bank` (stage 1) starts vLLM,
as does `add_documents`; `remove_documents` and `compact_bank` edit files only (`edit.py`,
`compact.py`, `generations.py`). All of them, and `ModelInfo`, are imported on first use, so
that the format's names (and the `vllm-msa` command line) load in a blink.
"""

from .format import BankError, BankMismatchError

__all__ = ["BankError", "BankLayer", "BankMismatchError", "DocumentRemovedError", "MemoryBank",
           "ModelInfo", "PhysicalLayout", "add_documents", "build_bank", "compact_bank",
           "remove_documents"]

_LAZY = {"BankLayer": ".reader", "DocumentRemovedError": ".reader", "MemoryBank": ".reader",
         "ModelInfo": ".model_info", "PhysicalLayout": ".layout", "add_documents": ".edit",
         "build_bank": ".build", "compact_bank": ".compact", "remove_documents": ".edit"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(name)
