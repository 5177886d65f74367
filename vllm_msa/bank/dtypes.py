"""What dtype each tier of a bank is stored in, and the tensors that implies per segment.

Two tiers: the routing index (K̄r, on the GPU) and the content K̄/V̄ (host RAM, fetched on
demand). Each is stored in the model's dtype or in FP8 with scales (`quant.py`). The manifest
records them under "tiers"; a bank without that section (format 1) is all in the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .format import BANK_DTYPES, POOLED_ORDER, BankError, layer_key
from .quant import FP8_NAMES, SCALE_SUFFIX

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16",
                      "float8_e4m3fn": "F8_E4M3"}
SCALE_DTYPE = torch.float32


@dataclass(frozen=True)
class BankDtypes:
    """Torch dtype names of the routing index (`index`) and of the K̄/V̄ tier (`kv`)."""

    index: str
    kv: str

    @classmethod
    def of_model(cls, model_dtype: str, bank_dtype: str = "auto") -> BankDtypes:
        """The tiers a build writes for `--bank-dtype` (`BANK_DTYPES`): "auto" keeps the
        model's dtype; "fp8_e4m3" stores K̄/V̄ in FP8 (the routing index stays exact)."""
        if bank_dtype == "auto" or bank_dtype == model_dtype:
            return cls(model_dtype, model_dtype)
        if bank_dtype in FP8_NAMES:
            return cls(model_dtype, FP8_NAMES[bank_dtype])
        raise ValueError(f"unknown bank dtype {bank_dtype!r}; choose one of "
                         f"{', '.join(BANK_DTYPES)}")

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], path: Any) -> BankDtypes:
        model_dtype = manifest["model"]["dtype"]
        tiers = manifest.get("tiers")
        if tiers is None:
            return cls(model_dtype, model_dtype)
        if not isinstance(tiers, dict) or set(tiers) != {"index", "kv"}:
            raise BankError(f"bank {path}: malformed tiers section {tiers!r} in its manifest")
        for tier, dtype in tiers.items():
            if dtype != model_dtype and dtype not in FP8_NAMES.values():
                raise BankError(f"bank {path}: tier {tier!r} has unsupported dtype {dtype!r}")
        if tiers["index"] != model_dtype:
            raise BankError(f"bank {path}: its routing index is stored in {tiers['index']}; "
                            "this vllm-msa serves an index in the model's dtype only")
        return cls(tiers["index"], tiers["kv"])

    def to_json(self) -> dict[str, str]:
        return {"index": self.index, "kv": self.kv}

    @property
    def compressed(self) -> bool:
        return self.index in FP8_NAMES.values() or self.kv in FP8_NAMES.values()

    def of(self, name: str) -> str:
        """The dtype of pooled tensor `name` ("routing_keys", "keys" or "values")."""
        return self.index if name == "routing_keys" else self.kv

    def scaled(self, name: str) -> bool:
        return self.of(name) in FP8_NAMES.values()

    def layer_tensors(self, layer: int, chunks: int, kv_heads: int, head_dim: int
                      ) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype, shape) of one router layer's tensors in a segment of `chunks`."""
        specs = []
        for name in POOLED_ORDER:
            specs.append((layer_key(layer, name), getattr(torch, self.of(name)),
                          (chunks, kv_heads, head_dim)))
            if self.scaled(name):
                specs.append((layer_key(layer, name) + SCALE_SUFFIX, SCALE_DTYPE,
                              (chunks, kv_heads)))
        return specs

    def element_bytes(self, name: str, head_dim: int) -> float:
        """Bytes per stored value of tensor `name`, its scales included."""
        size = torch.empty((), dtype=getattr(torch, self.of(name))).element_size()
        return size + (SCALE_DTYPE.itemsize / head_dim if self.scaled(name) else 0.0)
