"""Stage 1 inside the serving engine: documents encoded by prefill-only requests.

A bank edit of a running server (`serving/encode.py`) sends each new document as a request
with `extra_args["msa_encode"]` and one output token. It is a plain request to the model (no
bank, no RoPE offset: positions from 0, attention inside the document only, msa-spec §2), so
the forward computes exactly what the stage-1 encoder (`encoder.py`) computes. In every router
layer the router-attention op hands this module the request's K (after k_norm and RoPE), V
and normed input h; it keeps, per chunk of `pooling_kernel_size` positions, float32 sums of
K, V and the routing key (`router_k_proj(h)`, or K itself without a decoupled router) for
this rank's KV heads and this stage's router layers. When the request has finished, the API
server takes the pooled result (`take`): the chunk means, L2-normalised routing keys where
the checkpoint routes by cosine, in the model's dtype — the `[chunks, router layers, 3, kv
heads, head_dim]` rows the bank writer stores, as `BankChunkPoolerHead` makes them.

Prefill may come in several chunks (chunked prefill) and a preempted request recomputes
from its first token: positions already captured are skipped, so each position is summed
once, in order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import MSAParams

# extra_args key of an encode request: {"bank": name, "key": capture key, "nonce": ...}. The
# capture key is the API server's (the engine's request ids get a suffix of the engine's).
ENCODE_KEY = "msa_encode"
MAX_HELD_SECONDS = 600.0  # a capture nobody took (its API call died) is dropped after this


@dataclass
class DocumentCapture:
    """One encode request's pooled sums so far."""

    layers: list[int]  # the router layers captured here, in order
    sums: torch.Tensor  # [chunks, layers, 3, local kv, hd] float32 (grows)
    captured: int = 0  # positions [0, captured) are in `sums`
    started: float = field(default_factory=time.monotonic)

    def add(self, layer_slot: int, first_position: int, k: torch.Tensor, v: torch.Tensor,
            r: torch.Tensor, pooling: int) -> None:
        """Sum one layer's rows of positions first_position.. (those not captured yet)."""
        skip = max(self.captured - first_position, 0)
        if skip >= k.shape[0]:
            return
        k, v, r = k[skip:], v[skip:], r[skip:]
        start = first_position + skip
        chunk = torch.arange(start, start + k.shape[0], device=k.device) // pooling
        need = (start + k.shape[0] - 1) // pooling + 1  # (on the host: no device sync)
        if need > self.sums.shape[0]:
            grown = self.sums.new_zeros((max(need, 2 * self.sums.shape[0]),
                                         *self.sums.shape[1:]))
            grown[: self.sums.shape[0]] = self.sums
            self.sums = grown
        rows = torch.stack([k, v, r], dim=1).float()  # [n, 3, kv, hd]
        self.sums[:, layer_slot].index_add_(0, chunk, rows)

    def advance(self, first_position: int, num_tokens: int) -> None:
        """After every layer of a step: its positions are captured."""
        self.captured = max(self.captured, first_position + num_tokens)

    def pooled(self, msa: MSAParams, dtype: torch.dtype) -> torch.Tensor:
        """The chunk means as the bank stores them (module docstring)."""
        pooling = msa.pooling_kernel_size
        chunks = -(-self.captured // pooling)
        counts = torch.full((chunks,), float(pooling), dtype=torch.float32)
        if self.captured % pooling:
            counts[-1] = float(self.captured % pooling)
        means = self.sums[:chunks].cpu() / counts.view(-1, 1, 1, 1, 1)
        if msa.normalize_routing:
            means[:, :, 2] = torch.nn.functional.normalize(means[:, :, 2], p=2, dim=-1)
        return means.to(dtype)


class EncodeCaptures:
    """The encode requests of one worker, from their first step until the API server takes
    them."""

    def __init__(self, msa: MSAParams, layers: list[int], kv_heads: slice, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype) -> None:
        self.msa, self.dtype = msa, dtype
        self.layers = list(layers)
        self.slot = {layer: i for i, layer in enumerate(self.layers)}
        self.kv_heads = range(num_kv_heads)[kv_heads]
        self.head_dim = head_dim
        self.captures: dict[str, DocumentCapture] = {}
        self.rows: list[tuple[DocumentCapture, int, int, int]] = []  # this step's

    @staticmethod
    def is_encode(extra: dict | None) -> bool:
        return bool(extra) and ENCODE_KEY in extra

    @staticmethod
    def key_of(extra: dict) -> str:
        return str(extra[ENCODE_KEY]["key"])

    def begin_row(self, key: str, token_start: int, num_tokens: int,
                  first_position: int, device: torch.device) -> None:
        """An encode request's tokens in this step (`key`: its capture key)."""
        capture = self.captures.get(key)
        if capture is None:
            capture = self.captures[key] = DocumentCapture(
                self.layers, torch.zeros((1, len(self.layers), 3, len(self.kv_heads),
                                          self.head_dim), dtype=torch.float32, device=device))
        self.rows.append((capture, token_start, num_tokens, first_position))

    def capture(self, layer: int, attn: Any, k: torch.Tensor, v: torch.Tensor,
                h: torch.Tensor) -> None:
        """This step's encode rows of one router layer (the op's K after RoPE, V, normed h)."""
        heads, hd = len(self.kv_heads), self.head_dim
        for capture, start, n, first in self.rows:
            rows = slice(start, start + n)
            kr = k[rows].view(n, heads, hd)
            vr = v[rows].view(n, heads, hd)
            if self.msa.decouple_router:
                r = attn.router_k_proj(h[rows])[0].view(n, heads, hd)
            else:
                r = kr
            capture.add(self.slot[layer], first, kr, vr, r, self.msa.pooling_kernel_size)

    def end_step(self) -> None:
        for capture, _, n, first in self.rows:
            capture.advance(first, n)
        self.rows = []

    def take(self, keys: list[str]) -> dict[str, Any]:
        """The pooled rows of the requests with these capture keys (and forget them), with
        what the API server needs to put every rank's part together. The API server asks
        once their outputs came back: the step that computed their last prompt tokens has
        run."""
        now = time.monotonic()
        for key in [k for k, c in self.captures.items() if now - c.started > MAX_HELD_SECONDS]:
            del self.captures[key]
        documents = {}
        for key in keys:
            capture = self.captures.pop(key, None)
            if capture is None:
                continue
            documents[key] = {"tokens": capture.captured,
                                 "rows": capture.pooled(self.msa, self.dtype)}
        return {"layers": self.layers, "kv_heads": [self.kv_heads.start, self.kv_heads.stop],
                "documents": documents}
