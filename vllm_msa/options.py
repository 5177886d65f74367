"""MSA options: the engine's `additional_config["msa"]` and each request's `msa_*` args.

The vocabulary every layer shares (the worker runtime, the front end's admission, Memory
Interleave and the HTTP route), so it depends on none of them.

Engine-wide (`LLM(..., additional_config={"msa": {...}})` or
`vllm serve CKPT --additional-config '{"msa": {...}}'`):

- `banks`: {name: path} — the memory banks this engine serves (opened by every worker); an
  entry may also be {"path": ..., "host_cache_gib": ..., "index_dtype": ...,
  "reserve_tokens": ...}, that bank's own disk-tier cache, routing-index dtype and room for
  live adds.
- `default_bank`: the bank a request without `msa_bank` uses; absent means such a request
  runs without memory (plain Qwen3).
- `top_k`: overrides the checkpoint's top-k (`doc_top_k`/`top_k_docs`); it is also the global
  RoPE offset (msa-spec §3).
- `score`: "auto" (the released code: dot product, cosine for decoupled INFONCE), "dot" or
  "cosine" (the paper's variant).
- `decode_graphs`: "auto" (default: decode steps replay full CUDA graphs, memory attention
  included, where the GPU path supports it — flash-attention, fp16/bf16) or "piecewise".
- `verify`: true (default) checks every bank file's checksum (BLAKE3, or sha256 for older
  banks) while it loads, and that its values are finite; false skips both (faster starts of
  banks verified otherwise).
- `index_parallel`: "shard" (default) deals each bank's documents over the tensor-parallel
  ranks, balanced by chunks: each rank keeps only its share of the routing index on its GPU
  and the ranks exchange their top-k candidates (`vllm_msa.attention.index_parallel`), so
  the index capacity grows with the GPUs; "replicate" keeps the whole index on every rank.
  Selections are the same either way.
- `share_host`: true (default) keeps each bank's K̄/V̄ in the node's shared memory
  (/dev/shm), one copy for every engine process on the node that serves the bank
  (data-parallel replicas, other servers), falling back to private memory where it does
  not fit; false gives each process its own copy.
- `host_cache_gib`: serve banks from disk: instead of reading each bank's K̄/V̄ into host
  RAM, keep a page-locked cache of this many GiB per bank (per rank) and read documents
  from the bank files as requests select them, least recently selected out first
  (`vllm_msa.attention.host_cache`); for banks larger than host RAM. Absent: all in RAM.
  A bank entry's own `host_cache_gib` overrides it.
- `index_dtype`: "auto" (default: the routing index on the GPU in the bank's dtype), "int8"
  or "fp8_e4m3": the index in 8 bits (half the GPU memory of a bf16 index), quantised at
  load; routing then selects exactly what the full-precision index selects, re-scoring the
  documents whose 8-bit score is too close to the k-th from the bank files
  (`vllm_msa.attention.bounded_routing`). A bank entry's own `index_dtype` overrides it.
- `reserve_tokens`: room for about this many memory tokens of live adds per bank (the bank
  routes of `vllm serve`, `serving/llm_edits.py`), allocated at load in the host tier
  (page-locked, or in the shared tier) and in the routing index of the rank whose shard
  grows, so an add appends there instead of copying either (`attention/growth.py`).
  Default 0: the first add beyond the room copies them once, with this much room again.
- `staging_mib`: size of the device staging pool for selected documents' K̄/V̄; by default
  sized for `max_num_seqs` requests each holding the configured top-k largest documents of
  every router layer (capped at 4 GiB, logged).

Per request (`SamplingParams.extra_args`, or `vllm_xargs` over HTTP): `msa_bank` (`""` or
null: no memory, even with a `default_bank`), `msa_top_k`, `msa_return_selection`, and
`msa_routing` — explicit routing token ranges `[[start, end], ...]` (over HTTP the flat
`[start, end, start, end, ...]`, which `vllm_xargs` accepts) for prompts whose routing query
is not one contiguous user text (Memory Interleave's re-routing rounds: the question plus the
latest retrieved texts). The front end validates them and records
the routing ranges (found in the prompt, see `vllm_msa.prompt`, or given) as `msa_span`, so
workers and the scheduler never re-derive them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .bank.format import INDEX_DTYPES
from .config import MSAParams

SCORE_MODES = ("auto", "dot", "cosine")
DECODE_GRAPH_MODES = ("auto", "piecewise")
INDEX_PARALLEL_MODES = ("shard", "replicate")
ENGINE_KEYS = ("banks", "default_bank", "top_k", "score", "staging_mib", "decode_graphs",
               "verify", "index_parallel", "share_host", "host_cache_gib", "index_dtype",
               "admin_key", "reserve_tokens")
_BANK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Keys a request may set; `msa_span` is written by the front end, never by callers.
REQUEST_KEYS = frozenset({"msa_bank", "msa_top_k", "msa_return_selection", "msa_routing"})
SPAN_KEY = "msa_span"
# Where a request's selected documents come back: `RequestOutput.kv_transfer_params[...]`
# offline, `kv_transfer_params` in OpenAI responses (vllm_msa.serving.connector sends them).
SELECTION_KEY = "msa_selection"


try:  # vLLM maps its client errors to HTTP 400 (and re-raises them unwrapped offline).
    from vllm.exceptions import VLLMValidationError as _ClientError
    _ERROR_BASES: tuple[type, ...] = (_ClientError, ValueError)
except ImportError:  # pragma: no cover - vLLM is optional for bank tools
    _ERROR_BASES = (ValueError,)


class MSARequestError(*_ERROR_BASES):
    """A request's MSA options are invalid: a ValueError offline, HTTP 400 over HTTP; the
    engine keeps serving."""


class MSAServingConfigError(ValueError):
    """`additional_config["msa"]` is invalid: the engine refuses to start."""


@dataclass(frozen=True)
class ServingConfig:
    banks: dict[str, str] = field(default_factory=dict)
    default_bank: str | None = None
    top_k: int | None = None
    score: str = "auto"
    staging_mib: int | None = None  # None: sized from the batch and the banks
    decode_graphs: str = "auto"  # "auto": full CUDA graphs for decode where supported
    verify: bool = True  # checksums and finite values checked while banks load
    index_parallel: str = "shard"  # the routing index over tensor-parallel ranks
    share_host: bool = True  # one host tier per node, in shared memory
    host_cache_gib: float | None = None  # the disk tier's cache per bank; None: all in RAM
    bank_cache_gib: dict[str, float] = field(default_factory=dict)  # per-bank overrides
    index_dtype: str = "auto"  # the routing index on the GPU: "auto", "int8", "fp8_e4m3"
    bank_index_dtype: dict[str, str] = field(default_factory=dict)  # per-bank overrides
    # The bank-edit routes' key (`serving/edits.py`; the VLLM_MSA_ADMIN_KEY variable wins).
    admin_key: str | None = field(default=None, repr=False)
    reserve_tokens: int = 0  # room for live adds in each bank's host tier
    bank_reserve_tokens: dict[str, int] = field(default_factory=dict)  # per-bank overrides

    def reserve_of(self, bank: str) -> int:
        """Memory tokens of room for live adds in `bank`'s host tier."""
        return self.bank_reserve_tokens.get(bank, self.reserve_tokens)

    def cache_gib(self, bank: str) -> float | None:
        """The disk tier's cache of `bank` in GiB (None: its K̄/V̄ all in host RAM)."""
        return self.bank_cache_gib.get(bank, self.host_cache_gib)

    def index_dtype_of(self, bank: str) -> str:
        """The dtype `bank`'s routing index is served in ("auto": the bank's own)."""
        return self.bank_index_dtype.get(bank, self.index_dtype)

    @classmethod
    def from_additional_config(cls, additional: Mapping[str, Any] | None) -> ServingConfig:
        raw = (additional or {}).get("msa")
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise MSAServingConfigError('additional_config["msa"] must be a JSON object')
        unknown = set(raw) - set(ENGINE_KEYS)
        if unknown:
            raise MSAServingConfigError(
                f'additional_config["msa"]: unknown keys {sorted(unknown)}; allowed: '
                + ", ".join(ENGINE_KEYS)
            )
        banks = raw.get("banks") or {}
        if not isinstance(banks, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str | Mapping) for k, v in banks.items()
        ):
            raise MSAServingConfigError('msa "banks" must map bank names to paths (strings), '
                                        'or to {"path": ..., "host_cache_gib": ..., '
                                        '"index_dtype": ...}')
        banks, bank_caches, bank_index, bank_reserve = _bank_entries(banks)
        for name in banks:
            if not _BANK_NAME.match(name):
                raise MSAServingConfigError(
                    f"bank name {name!r}: use letters, digits, '_', '.', '-' (max 64)"
                )
        default = raw.get("default_bank")
        if default is not None and default not in banks:
            raise MSAServingConfigError(
                f"default_bank {default!r} is not one of the banks {sorted(banks)}"
            )
        top_k = raw.get("top_k")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)
                                  or top_k < 1):
            raise MSAServingConfigError(f"msa top_k must be a positive integer, got {top_k!r}")
        score = raw.get("score", "auto")
        if score not in SCORE_MODES:
            raise MSAServingConfigError(f"msa score must be one of {SCORE_MODES}, got {score!r}")
        staging = raw.get("staging_mib")
        if staging is not None and (not isinstance(staging, int) or isinstance(staging, bool)
                                    or staging < 1):
            raise MSAServingConfigError(f"msa staging_mib must be a positive integer, "
                                        f"got {staging!r}")
        decode_graphs = raw.get("decode_graphs", "auto")
        if decode_graphs not in DECODE_GRAPH_MODES:
            raise MSAServingConfigError(f"msa decode_graphs must be one of "
                                        f"{DECODE_GRAPH_MODES}, got {decode_graphs!r}")
        verify = _flag(raw, "verify")
        index_parallel = raw.get("index_parallel", "shard")
        if index_parallel not in INDEX_PARALLEL_MODES:
            raise MSAServingConfigError(f"msa index_parallel must be one of "
                                        f"{INDEX_PARALLEL_MODES}, got {index_parallel!r}")
        share_host = _flag(raw, "share_host")
        cache = _cache_gib(raw.get("host_cache_gib"), "msa host_cache_gib")
        index_dtype = _index_dtype(raw.get("index_dtype", "auto"), "msa index_dtype")
        admin_key = raw.get("admin_key")
        if admin_key is not None and (not isinstance(admin_key, str) or len(admin_key) < 16):
            raise MSAServingConfigError("msa admin_key must be a string of at least 16 "
                                        "characters")
        reserve = _tokens(raw.get("reserve_tokens", 0), "msa reserve_tokens")
        return cls(dict(banks), default, top_k, score, staging, decode_graphs, verify,
                   index_parallel, share_host, cache, bank_caches, index_dtype, bank_index,
                   admin_key, reserve, bank_reserve)

    def configured_top_k(self, msa: MSAParams) -> int:
        """The top-k a request gets by default, and the global RoPE offset (msa-spec §3)."""
        return self.top_k if self.top_k is not None else msa.top_k


def _cache_gib(value: Any, what: str) -> float | None:
    if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)
                              or not 0 < value < float("inf")):
        raise MSAServingConfigError(f"{what} must be a positive number of GiB, got {value!r}")
    return value


def _tokens(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MSAServingConfigError(f"{what} must be an integer >= 0, got {value!r}")
    return value


def _index_dtype(value: Any, what: str) -> str:
    if value not in INDEX_DTYPES:
        raise MSAServingConfigError(f"{what} must be one of {INDEX_DTYPES}, got {value!r}")
    return value


def _bank_entries(banks: Mapping[str, Any]
                  ) -> tuple[dict[str, str], dict[str, float], dict[str, str], dict[str, int]]:
    """{name: path}, and the per-bank `host_cache_gib`, `index_dtype` and `reserve_tokens`
    of entries given as objects."""
    paths, caches, index, reserve = {}, {}, {}, {}
    for name, entry in banks.items():
        if isinstance(entry, str):
            paths[name] = entry
            continue
        unknown = set(entry) - {"path", "host_cache_gib", "index_dtype", "reserve_tokens"}
        if unknown or not isinstance(entry.get("path"), str):
            raise MSAServingConfigError(
                f'msa bank {name!r}: an entry is a path or {{"path": str, "host_cache_gib": '
                f'number, "index_dtype": str, "reserve_tokens": int}}, got keys '
                f'{sorted(entry)}')
        paths[name] = entry["path"]
        cache = _cache_gib(entry.get("host_cache_gib"), f"msa bank {name!r} host_cache_gib")
        if cache is not None:
            caches[name] = cache
        if "index_dtype" in entry:
            index[name] = _index_dtype(entry["index_dtype"], f"msa bank {name!r} index_dtype")
        if "reserve_tokens" in entry:
            reserve[name] = _tokens(entry["reserve_tokens"],
                                    f"msa bank {name!r} reserve_tokens")
    return paths, caches, index, reserve


def _flag(raw: Mapping[str, Any], key: str, default: bool = True) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise MSAServingConfigError(f"msa {key} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class RequestOptions:
    """One request's validated MSA options (what the workers act on)."""

    bank: str
    top_k: int
    ranges: tuple[tuple[int, int], ...]  # routing tokens: sorted, disjoint [start, end) ranges
    return_selection: bool

    @property
    def span_start(self) -> int:
        return self.ranges[0][0]

    @property
    def span_end(self) -> int:
        """One past the last routing token: routing happens in the step that computes it."""
        return self.ranges[-1][1]

    def to_extra_args(self) -> dict[str, Any]:
        return {
            "msa_bank": self.bank,
            "msa_top_k": self.top_k,
            SPAN_KEY: [[a, b] for a, b in self.ranges],
            "msa_return_selection": self.return_selection,
        }

    @classmethod
    def from_extra_args(cls, extra: Mapping[str, Any] | None) -> RequestOptions | None:
        """Options the front end already validated (None: the request has no memory)."""
        if not extra or SPAN_KEY not in extra:
            return None
        ranges = tuple((int(a), int(b)) for a, b in extra[SPAN_KEY])
        return cls(extra["msa_bank"], int(extra["msa_top_k"]), ranges,
                   bool(extra.get("msa_return_selection", False)))


def requested_bank(extra: Mapping[str, Any], serving: ServingConfig) -> str | None:
    """The bank a request asks for (explicitly or by default); None means no memory."""
    unknown = {k for k in extra if k.startswith("msa_")} - REQUEST_KEYS
    if unknown:
        raise MSARequestError(
            f"unknown MSA options {sorted(unknown)}; allowed: {sorted(REQUEST_KEYS)}"
        )
    if "msa_bank" in extra and extra["msa_bank"] in (None, ""):
        return None  # an explicit opt-out of the server's default bank
    name = extra.get("msa_bank", serving.default_bank)
    if name is None:
        return None
    if not isinstance(name, str):
        raise MSARequestError(f"msa_bank must be a bank name (string), got {name!r}")
    if name not in serving.banks:
        known = ", ".join(sorted(serving.banks)) or "none are attached"
        raise MSARequestError(f"unknown bank {name!r} (banks: {known})")
    return name


def parse_top_k(extra: Mapping[str, Any], default: int, num_documents: int) -> int:
    raw = extra.get("msa_top_k")
    if raw is None:
        return default
    if isinstance(raw, str) and raw.strip().isdigit():
        raw = int(raw)  # vllm_xargs values may arrive as strings
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 1:
        raise MSARequestError(f"msa_top_k must be a positive integer, got {raw!r}")
    if raw > num_documents:
        raise MSARequestError(
            f"msa_top_k {raw} is larger than the bank's {num_documents} documents"
        )
    return raw


def parse_bool(extra: Mapping[str, Any], key: str) -> bool:
    raw = extra.get(key, False)
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0"):
        return raw.lower() in ("true", "1")
    raise MSARequestError(f"{key} must be a boolean, got {raw!r}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_routing(extra: Mapping[str, Any], template_len: int, prompt_len: int
                  ) -> tuple[tuple[int, int], ...] | None:
    """Explicit routing ranges (`msa_routing`), checked against the prompt; None if absent.

    Three spellings: `[[start, end], ...]` (Python), the flat `[start, end, start, end, ...]`
    (vLLM's `vllm_xargs` schema over HTTP allows lists of numbers, not lists of lists) and
    either of them as a JSON string."""
    raw = extra.get("msa_routing")
    if raw is None:
        return None
    if isinstance(raw, str):  # vllm_xargs values may arrive as JSON strings
        import json

        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError):
            raise MSARequestError(f"msa_routing must be a list of [start, end] token ranges, "
                                  f"got {raw!r}") from None
    if isinstance(raw, (list, tuple)) and raw and all(_is_int(x) for x in raw):
        if len(raw) % 2:
            raise MSARequestError(f"msa_routing as a flat list needs start, end pairs, got "
                                  f"{len(raw)} numbers")
        raw = [raw[i:i + 2] for i in range(0, len(raw), 2)]
    shape_ok = isinstance(raw, (list, tuple)) and len(raw) > 0 and all(
        isinstance(r, (list, tuple)) and len(r) == 2
        and all(_is_int(x) for x in r) for r in raw)
    if not shape_ok:
        raise MSARequestError(
            f"msa_routing must be a non-empty list of [start, end] token ranges, got {raw!r}")
    ranges = tuple((int(a), int(b)) for a, b in raw)
    previous_end = template_len
    for a, b in ranges:
        if a < previous_end or b <= a or b > prompt_len:
            raise MSARequestError(
                f"msa_routing {[list(r) for r in ranges]}: ranges must be non-empty, sorted, "
                f"disjoint, after the {template_len}-token template head and inside the "
                f"{prompt_len}-token prompt")
        previous_end = b
    return ranges
