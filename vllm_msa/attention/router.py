"""Routing orchestration (msa-spec §3): which requests of a step route in a router layer, their
routing queries, and one batched routing call per bank.

The routing math itself is in `vllm_msa.kernels.routing` (Triton) and `.routing` (plain
torch); this module decides what to route and hands each request its selection.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..config import MSAParams
from .requests import RoutedSelection, StepRow
from .uploads import ranges

if TYPE_CHECKING:
    from .runtime import MemoryRuntime


@dataclass(frozen=True)
class RouterLayer:
    layer_idx: int
    attn: Any  # Qwen3Attention with router projections


def routing_params(msa: MSAParams, score: str) -> MSAParams:
    """`msa` with the scoring the server asked for: "auto" keeps the checkpoint's (msa-spec
    §3), "cosine" normalises routing queries (keys are normalised at load) and does not scale,
    "dot" scales the raw dot product by head_dim^-0.5."""
    if score == "cosine":
        return dataclasses.replace(msa, aux_loss_method="INFONCE", decouple_router=True)
    if score == "dot":
        return dataclasses.replace(msa, aux_loss_method="")
    return msa


def single_run(spans: list[tuple[int, int]]) -> slice | None:
    """The half-open `spans` as one slice where each starts where the last ended."""
    if not spans or any(end != start for (_, end), (start, _) in itertools.pairwise(spans)):
        return None
    return slice(spans[0][0], spans[-1][1])


def folds_router_query(routing: MSAParams, num_heads: int, num_kv_heads: int,
                       tp_size: int) -> bool:
    """Whether routing may project each KV head's group mean of Qr instead of every head.

    With decoupled routing, unnormalised dot products and the head mean (MSA-4B's released
    configuration), a chunk's score is linear in Qr = W h:
    mean_h Qr_h . K_kv(h) = mean_kv (mean_(h in kv) W_h) h . K_kv. So one projection by the
    group-mean weight (`router_q_fold`, made at load) gives the same scores with a quarter of
    MSA-4B's router GEMM (its weight read was 10.7 us of the ~139 us a 10M-token router layer
    routes in, on the H100) and a smaller query for the kernels. Cosine scores normalise each
    head and "max" takes a maximum over heads: neither is linear, so they project every head.
    Each rank folds its own heads, so KV heads must split evenly across ranks.
    VLLM_MSA_ROUTER_FOLD=0 turns it off (for comparisons)."""
    return (routing.decouple_router and not routing.normalize_routing
            and routing.head_reduce == "mean" and num_heads % num_kv_heads == 0
            and num_kv_heads % tp_size == 0
            and os.environ.get("VLLM_MSA_ROUTER_FOLD", "1") != "0")


def token_rows(runtime: MemoryRuntime, spans: list[tuple[int, int]], device: torch.device
               ) -> torch.Tensor | slice:
    """The step rows of these token spans: a slice where they are one run (one request
    with one routing range: a view, no gather launch), else an index tensor."""
    run = single_run(spans)
    if run is not None:
        return run
    return runtime.step_upload(("routing rows", *spans), lambda: ranges(spans), device)


def routing_query(runtime: MemoryRuntime, layer: RouterLayer, q: torch.Tensor,
                  h: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
    """Qr of the routing-span tokens: [tokens, routing_heads, head_dim] (all heads, or
    each KV head's group mean with `fold_router_query`)."""
    if runtime.fold_router_query:
        qr, _ = layer.attn.router_q_fold(h[rows])
    elif runtime.msa.decouple_router:
        qr, _ = layer.attn.router_q_proj(h[rows])
    else:
        qr = q[rows]
    if runtime.tp_size > 1:
        from vllm.distributed import tensor_model_parallel_all_gather

        qr = tensor_model_parallel_all_gather(qr.contiguous(), dim=-1)
    return qr.view(qr.shape[0], runtime.routing_heads, runtime.head_dim)


def select_pending(runtime: MemoryRuntime, layer: RouterLayer, q: torch.Tensor,
                   h: torch.Tensor) -> None:
    """Route every request whose routing span is in this step and that has no selection
    in this layer yet: per bank, one batched routing call (the index is read once for all
    of them; `vllm_msa.kernels.routing`, plain torch where Triton cannot run)."""
    from ..kernels.routing import route_batched, route_batched_keys
    from .bounded_routing import CompressedRoutingIndex, route_compressed

    pending: dict[str, list[StepRow]] = {}
    for row in runtime.rows:
        if layer.layer_idx not in row.request.selections:
            pending.setdefault(row.request.bank.name, []).append(row)
    for rows in pending.values():
        started = time.perf_counter()
        spans, cu = [], [0]
        for row in rows:
            shift = row.token_start - row.first_position  # request token i -> step row
            spans.extend((a + shift, b + shift) for a, b in row.request.options.ranges)
            cu.append(cu[-1] + sum(b - a for a, b in row.request.options.ranges))
        qr = routing_query(runtime, layer, q, h, token_rows(runtime, spans, q.device))
        index = rows[0].request.bank.prepared_index(layer.layer_idx)
        top_ks = [r.request.options.top_k for r in rows]
        if isinstance(index, CompressedRoutingIndex):  # 8-bit pass, exact re-score
            routed = route_compressed(qr, cu, index, runtime.routing, top_ks,
                                      exchange=runtime.exchange, keys_only=True)
            if isinstance(routed, list):  # the torch path's decoded selections
                routed, selections = None, routed
        else:
            routed = route_batched_keys(qr, cu, index, runtime.routing, top_ks,
                                        exchange=runtime.exchange)
            if routed is None:  # no Triton here: plain torch, decoded selections
                selections = route_batched(qr, cu, index, runtime.routing, top_ks,
                                           exchange=runtime.exchange)
        if routed is not None:  # left on the device as sort keys, for the staging kernel
            selections = [RoutedSelection(routed, i) for i in range(len(rows))]
        for row, selection in zip(rows, selections, strict=True):
            row.request.selections[layer.layer_idx] = selection
        bank = rows[0].request.bank
        runtime.metrics.routed(bank.name, sum(min(k, bank.num_documents) for k in top_ks),
                               time.perf_counter() - started)
