"""MSA checkpoint configuration.

`MSAConfig` is the transformers config class for `"model_type": "msa"` (a Qwen3 config plus the
`msa_config` dict). `MSAParams` is the one typed, validated view of that dict that the rest of
the plugin reads; nothing else parses `msa_config` by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from huggingface_hub.dataclasses import strict
from transformers import Qwen3Config

from .reduce_methods import CHUNK_REDUCE_METHODS, HEAD_REDUCE_METHODS, QUERY_REDUCE_METHODS

logger = logging.getLogger(__name__)

HeadReduce = Literal["mean", "max"]
QueryReduce = Literal["max", "mean", "last"]
ChunkReduce = Literal["max", "mean"]

DEFAULT_TOP_K = 16

# Keys the released training code reads and inference never needs. Accepted and ignored.
TRAINING_ONLY_KEYS = frozenset({
    "aux_loss", "lmloss_weigth", "lmloss_weight", "auxloss_weight", "recloss_weight",
    "ansloss_weight", "infonce_loss_temp", "temperature", "rewrite_position",
    "decouple_pooling_mode", "pad_free", "use_focal", "focal_gamma", "focal_alpha",
})
INFERENCE_KEYS = frozenset({
    "router_layer_idx", "top_k_docs", "doc_top_k", "pooling_kernel_size", "decouple_router",
    "head_reduce_method", "query_reduce_method", "chunk_reduce_method", "aux_loss_method",
})


class MSAConfigError(ValueError):
    """An invalid `msa_config` value; the message names the key and what is allowed."""


@strict
class MSAConfig(Qwen3Config):
    """Qwen3 config with MSA's `msa_config` dict (registered with AutoConfig as "msa")."""

    model_type = "msa"
    msa_config: dict | None = None


@dataclass(frozen=True)
class MSAParams:
    """The inference-relevant part of `msa_config`, parsed and validated."""

    num_layers: int
    router_layers: tuple[int, ...]
    top_k: int
    pooling_kernel_size: int
    decouple_router: bool
    head_reduce: HeadReduce
    query_reduce: QueryReduce
    chunk_reduce: ChunkReduce
    aux_loss_method: str

    @property
    def normalize_routing(self) -> bool:
        """L2-normalise routing queries and pooled routing keys (only for aux "INFONCE")."""
        return self.aux_loss_method == "INFONCE"

    def routing_scale(self, head_dim: int) -> float:
        """Score scale: cosine (1.0) for decoupled INFONCE, else head_dim^-0.5 (msa-spec §3)."""
        if self.decouple_router and self.aux_loss_method == "INFONCE":
            return 1.0
        return head_dim**-0.5

    def is_router_layer(self, layer_idx: int) -> bool:
        return layer_idx in self.router_layers

    @classmethod
    def from_hf_config(cls, config: Any) -> MSAParams:
        """Parse `config.msa_config` (a dict) against `config.num_hidden_layers`."""
        raw = getattr(config, "msa_config", None)
        if raw is None:
            raise MSAConfigError("config.json has no `msa_config` dict: not an MSA checkpoint")
        return cls.from_dict(raw, num_layers=config.num_hidden_layers)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, num_layers: int) -> MSAParams:
        if not isinstance(raw, Mapping):
            raise MSAConfigError(f"msa_config must be a JSON object, got {type(raw).__name__}")
        unknown = set(raw) - INFERENCE_KEYS - TRAINING_ONLY_KEYS
        if unknown:
            logger.debug("msa_config: ignoring keys unknown to inference: %s", sorted(unknown))

        # The released serving path reads `doc_top_k`; only training reads `top_k_docs`.
        if raw.get("doc_top_k") is not None:
            top_k = _positive_int(raw, "doc_top_k")
        elif raw.get("top_k_docs") is not None:
            top_k = _positive_int(raw, "top_k_docs")
        else:
            top_k = DEFAULT_TOP_K

        return cls(
            num_layers=num_layers,
            router_layers=parse_router_layers(raw.get("router_layer_idx", "all"), num_layers),
            top_k=top_k,
            pooling_kernel_size=_positive_int(raw, "pooling_kernel_size", default=64),
            decouple_router=_bool(raw, "decouple_router", default=False),
            head_reduce=_choice(raw, "head_reduce_method", HEAD_REDUCE_METHODS, "mean"),
            query_reduce=_choice(raw, "query_reduce_method", QUERY_REDUCE_METHODS, "max"),
            chunk_reduce=_choice(raw, "chunk_reduce_method", CHUNK_REDUCE_METHODS, "max"),
            aux_loss_method=_string(raw, "aux_loss_method", default=""),
        )


def parse_router_layers(value: Any, num_layers: int) -> tuple[int, ...]:
    """`"all"`, a comma-separated string ("18,19,...,35"), an int or a list of ints."""
    allowed = f'"all" or layer indices in [0, {num_layers - 1}] ("18,19,20" or a list)'
    if isinstance(value, str) and value.strip().lower() == "all":
        return tuple(range(num_layers))
    try:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, int):
            layers = [value]
        elif isinstance(value, str):
            layers = [int(part) for part in value.split(",") if part.strip()]
        elif isinstance(value, list | tuple):
            if any(isinstance(v, bool) or not isinstance(v, int) for v in value):
                raise TypeError
            layers = list(value)
        else:
            raise TypeError
    except (TypeError, ValueError):
        raise MSAConfigError(
            f"msa_config.router_layer_idx: invalid value {value!r}; expected {allowed}"
        ) from None
    if not layers:
        raise MSAConfigError(f"msa_config.router_layer_idx is empty; expected {allowed}")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise MSAConfigError(
            f"msa_config.router_layer_idx: layers {bad} out of range; expected {allowed}"
        )
    if len(set(layers)) != len(layers):
        raise MSAConfigError(f"msa_config.router_layer_idx: duplicate layers in {value!r}")
    return tuple(sorted(layers))


def _positive_int(raw: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MSAConfigError(f"msa_config.{key}: invalid value {value!r}; expected an integer >= 1")
    return value


def _bool(raw: Mapping[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise MSAConfigError(f"msa_config.{key}: invalid value {value!r}; expected true or false")
    return value


def _choice(raw: Mapping[str, Any], key: str, allowed: tuple[str, ...], default: str) -> Any:
    value = raw.get(key, default)
    if value is None:
        return default
    if value not in allowed:
        raise MSAConfigError(
            f"msa_config.{key}: invalid value {value!r}; allowed values: {', '.join(allowed)}"
        )
    return value


def _string(raw: Mapping[str, Any], key: str, default: str) -> str:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise MSAConfigError(f"msa_config.{key}: invalid value {value!r}; expected a string")
    return value
