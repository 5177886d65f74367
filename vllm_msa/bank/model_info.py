"""What a bank must agree on with the model that uses it, and the model's fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import MSAParams
from .format import BankMismatchError

# Config fields that change what stage 1 computes (besides the weights themselves).
_FINGERPRINT_CONFIG_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "rope_theta",
    "vocab_size", "hidden_act",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class ModelInfo:
    """The model-side facts a bank records and is checked against when opened."""

    fingerprint: str
    num_layers: int
    router_layers: tuple[int, ...]
    num_kv_heads: int
    head_dim: int
    pooling_kernel_size: int
    dtype: str
    decouple_router: bool
    normalized_routing_keys: bool

    @classmethod
    def from_config(cls, config: Any, fingerprint: str, dtype: str) -> ModelInfo:
        msa = MSAParams.from_hf_config(config)
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        return cls(
            fingerprint=fingerprint,
            num_layers=config.num_hidden_layers,
            router_layers=msa.router_layers,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            pooling_kernel_size=msa.pooling_kernel_size,
            dtype=dtype_name(dtype),
            decouple_router=msa.decouple_router,
            normalized_routing_keys=msa.normalize_routing,
        )

    @classmethod
    def from_checkpoint(cls, model: str | Path, dtype: str | None = None) -> ModelInfo:
        """Read a local MSA checkpoint; `dtype` defaults to the one in its config."""
        from transformers import AutoConfig

        from .. import register_config

        register_config()
        path = resolve_checkpoint(model)
        config = AutoConfig.from_pretrained(path)
        config_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        return cls.from_config(config, model_fingerprint(path), dtype or str(config_dtype))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["router_layers"] = list(self.router_layers)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelInfo:
        d = dict(d)
        d["router_layers"] = tuple(d["router_layers"])
        return cls(**d)

    def mismatches(self, model: ModelInfo) -> list[str]:
        """Human-readable differences between this (the bank's) and `model`."""
        out = []
        for field, ours in asdict(self).items():
            theirs = getattr(model, field)
            if isinstance(ours, list):
                ours = tuple(ours)
            if ours != theirs:
                out.append(f"{field}: bank has {_show(ours)}, model has {_show(theirs)}")
        return out

    def check_compatible(self, model: ModelInfo, bank_path: str | Path) -> None:
        problems = self.mismatches(model)
        if problems:
            raise BankMismatchError(
                f"bank {bank_path} does not match the model: " + "; ".join(problems)
            )


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def dtype_name(dtype: Any) -> str:
    """Canonical dtype name: "float32", "bfloat16", "float16" (accepts torch dtypes too)."""
    name = str(dtype).removeprefix("torch.")
    return {"float": "float32", "half": "float16", "bf16": "bfloat16", "fp32": "float32",
            "fp16": "float16"}.get(name, name)


def resolve_checkpoint(model: str | Path) -> Path:
    """A local checkpoint directory; a hub id is resolved from the local hub cache."""
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(model), local_files_only=True))


def model_fingerprint(checkpoint: str | Path) -> str:
    """sha256 over the checkpoint's weight files and the config fields that shape its K/V.

    Hashing a large checkpoint takes seconds, so the result is cached per weight file
    (keyed by path, size and mtime) under `$VLLM_MSA_CACHE_DIR` (default ~/.cache/vllm_msa).
    """
    path = Path(checkpoint)
    config = json.loads((path / "config.json").read_text())
    relevant = {k: config[k] for k in _FINGERPRINT_CONFIG_KEYS if k in config}
    msa = config.get("msa_config") or {}
    relevant["msa_config"] = {k: msa[k] for k in sorted(msa) if k in _MSA_FINGERPRINT_KEYS}
    h = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode())
    weights = sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    if not weights:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {path}")
    for w in weights:
        h.update(w.name.encode())
        h.update(_cached_file_sha256(w).encode())
    return "sha256:" + h.hexdigest()


_MSA_FINGERPRINT_KEYS = frozenset({
    "router_layer_idx", "pooling_kernel_size", "decouple_router", "aux_loss_method",
})


def _cache_file() -> Path:
    root = os.environ.get("VLLM_MSA_CACHE_DIR") or Path.home() / ".cache" / "vllm_msa"
    return Path(root) / "file-sha256.json"


def _cached_file_sha256(path: Path) -> str:
    from .format import sha256_file

    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    cache_path = _cache_file()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = sha256_file(path)
    cache[key] = digest
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(f"{cache_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_path)
    except OSError:
        pass  # a read-only home only costs re-hashing next time
    return digest
