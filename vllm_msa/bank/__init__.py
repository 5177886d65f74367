"""Memory banks: MSA's stage-1 output as a durable, verifiable directory.

`MemoryBank` (reading) needs only torch and safetensors; `build_bank` (stage 1) starts vLLM and
is imported on first use.
"""

from .format import BankError, BankMismatchError
from .model_info import ModelInfo
from .reader import BankLayer, MemoryBank

__all__ = ["BankError", "BankLayer", "BankMismatchError", "MemoryBank", "ModelInfo", "build_bank"]


def __getattr__(name: str):
    if name == "build_bank":
        from .build import build_bank

        return build_bank
    raise AttributeError(name)
