"""Memory banks: MSA's stage-1 output as a durable, verifiable directory.

`MemoryBank` (reading) needs only torch and safetensors; `build_bank` (stage 1) starts vLLM.
Both, and `ModelInfo`, are imported on first use, so that the format's names (and the
`vllm-msa` command line) load in a blink.
"""

from .format import BankError, BankMismatchError

__all__ = ["BankError", "BankLayer", "BankMismatchError", "MemoryBank", "ModelInfo", "build_bank"]

_LAZY = {"BankLayer": ".reader", "MemoryBank": ".reader", "ModelInfo": ".model_info",
         "build_bank": ".build"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(name)
