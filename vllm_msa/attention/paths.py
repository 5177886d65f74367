"""A router layer's attention paths for memory requests: staging the selected documents,
then local ⊕ memory attention, by the fused GPU path (`fused.py`) or the plain-torch loop
(CPU, other backends, requests staged outside the pool).
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

import torch

from .attend import (
    READABLE_PAGED_BACKENDS,
    SideKV,
    attention_with_lse,
    gather_paged,
    paged_key_value,
)
from .profiling import phase
from .requests import MemoryRequest, RoutedSelection, StepRow
from .router import select_pending
from .staging import Staged
from .tiers import ServedBank

if TYPE_CHECKING:
    from .runtime import MemoryRuntime


def attend(runtime: MemoryRuntime, layer_name: str, q: torch.Tensor, k: torch.Tensor,
           v: torch.Tensor, h: torch.Tensor, output: torch.Tensor, attn_layer: Any,
           attn_metadata: Any) -> None:
    """Overwrite memory requests' rows of `output` (the local attention) with local ⊕
    memory attention. `q`, `k` after RoPE, `v`; `h` is the layer's normed input. On a GPU
    with flash-attention: batched (`fused.py`); elsewhere one request at a time in torch."""
    layer = runtime.layers[layer_name]
    hd = runtime.head_dim
    with phase("msa.route"):
        select_pending(runtime, layer, q, h)
    with phase("msa.fetch"):
        staged = stage_pending(runtime, layer.layer_idx)
    with phase("msa.attention"):
        if runtime.fused.usable(runtime.rows, layer.layer_idx, q, attn_layer, runtime.pool):
            runtime.fused.run(runtime.rows, layer.layer_idx, q, output, attn_layer,
                              attn_metadata, runtime.pool, hd, staged)
            return
        if staged is not None:
            torch.cuda.current_stream().wait_event(staged)
        attend_per_request(runtime, layer.layer_idx, q, k, v, output, attn_layer,
                           attn_metadata)


def stage_pending(runtime: MemoryRuntime, layer_idx: int) -> torch.cuda.Event | None:
    """Stage this layer's selected documents for every request in the step that has none
    staged yet (just routed, or back from preemption): per bank, one copy, queued on the
    device without the host waiting for routing's result. With a fetch stream
    (`fetch_stream`) the copy runs there, overlapping the local attention; the returned
    event marks its end (the memory attention waits for it)."""
    pending: dict[str, list[MemoryRequest]] = {}
    for row in runtime.rows:
        if layer_idx not in row.request.staged:
            pending.setdefault(row.request.bank.name, []).append(row.request)
    if not pending:
        return None
    stream = fetch_stream(runtime)
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream())  # routing's result
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        for requests in pending.values():
            bank = requests[0].bank
            widths = [(r.req_id, bank.worst_case_chunks(r.options.top_k))
                      for r in requests]
            staged = stage_routed(runtime, bank, layer_idx, requests, widths)
            if staged is None:
                staged = stage_selected(runtime, bank, layer_idx, requests, widths)
            runtime.metrics.staged(bank.name, staged[0].counts)
            for request, entry in zip(requests, staged, strict=True):
                request.staged[layer_idx] = entry
    if stream is None:
        return None
    done = torch.cuda.Event()
    done.record(stream)
    return done


def stage_routed(runtime: MemoryRuntime, bank: ServedBank, layer_idx: int,
                 requests: list[MemoryRequest], widths: list[tuple[str, int]]
                 ) -> list[Staged] | None:
    """One staging launch straight from routing's sort keys, when these requests were
    routed together in this step (the usual prefill) and the pool holds them all."""
    selections = [r.selections[layer_idx] for r in requests]
    first = selections[0]
    if bank.host_cache is not None:
        return None  # the disk tier must learn the documents first: `stage_selected`
    if not (isinstance(first, RoutedSelection)
            and runtime.pool.reads_host_directly(bank.host_keys[layer_idx],
                                                 bank.host_values[layer_idx],
                                                 bank.scales(layer_idx))
            and len(first.batch.ks) == len(requests)
            and all(isinstance(s, RoutedSelection) and s.batch is first.batch
                    and s.row == i for i, s in enumerate(selections))):
        return None
    ks = first.batch.ks
    return runtime.pool.stage_routed(
        bank.host_keys[layer_idx], bank.host_values[layer_idx], first.batch,
        runtime.step_upload(("top-k", *ks), lambda: ks, runtime.pool.keys.device, torch.int32),
        widths, bank.max_document_chunks, bank.scales(layer_idx))


def stage_selected(runtime: MemoryRuntime, bank: ServedBank, layer_idx: int,
                   requests: list[MemoryRequest], widths: list[tuple[str, int]]
                   ) -> list[Staged]:
    """Staging from decoded document ids (device ops, then one copy): requests back from
    preemption, steps mixing them, pool overflow, CPU."""
    ids = [r.selections[layer_idx].doc_ids for r in requests]
    if any(layer_idx in r.located for r in requests):  # (selected under a past generation)
        located = [r.located.get(layer_idx) or bank.locate(i.view(1, -1))
                   for r, i in zip(requests, ids, strict=True)]
        positions, starts, counts = (padded([loc[part][0] for loc in located], pad)
                                     for part, pad in ((0, -1), (1, 0), (2, 0)))
    else:
        doc_ids = padded(ids, -1)
        positions, starts, counts = bank.locate(doc_ids)
    row_map = None
    if bank.host_cache is not None:  # read what is not cached yet (waits for the routing)
        bank.host_cache.ensure(layer_idx, (p for p in positions.flatten().tolist() if p >= 0))
        row_map = bank.host_cache.slot_table(layer_idx)
    return runtime.pool.stage_documents(bank.host_keys[layer_idx],
                                        bank.host_values[layer_idx], starts, counts, widths,
                                        bank.scales(layer_idx), row_map)


def padded(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    """[R, K] from R rows of up to K values, short rows padded with `value`."""
    if len({r.numel() for r in rows}) == 1:
        return torch.stack(rows)
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)


def fetch_stream(runtime: MemoryRuntime) -> torch.cuda.Stream | None:
    """The side stream host->device fetches may run on: VLLM_MSA_FETCH_STREAM=1 (GPU).
    Off by default: measured on an H100 (benchmarks/ttft.py, docs/performance.md), the only work a
    layer's fetch can overlap is its local pass, and the stream hand-offs cost more
    host time than that saves (TTFT 41 vs 44 ms at batch 1, 130 vs 144 ms at 64)."""
    if runtime.device.type != "cuda" or os.environ.get("VLLM_MSA_FETCH_STREAM", "0") != "1":
        return None
    if runtime.side_stream is None:
        runtime.side_stream = torch.cuda.Stream(runtime.device)
    return runtime.side_stream


def local_key_value(runtime: MemoryRuntime, layer_idx: int, row: StepRow, k: torch.Tensor,
                    v: torch.Tensor, attn_layer: Any, attn_metadata: Any
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The request's own K/V [0, seq_len) in this layer, this step's tokens included."""
    seq_len = row.first_position + row.num_tokens
    if attn_layer.attn_backend.get_name() in READABLE_PAGED_BACKENDS:
        key_cache, value_cache = paged_key_value(attn_layer.kv_cache, runtime.head_dim)
        blocks = attn_metadata.block_table[row.batch_index]
        return (gather_paged(key_cache, blocks, seq_len),
                gather_paged(value_cache, blocks, seq_len))
    tokens = slice(row.token_start, row.token_start + row.num_tokens)
    shape = (row.num_tokens, -1, runtime.head_dim)
    side = row.request.side_kv.get(layer_idx)
    if side is None:
        side = row.request.side_kv[layer_idx] = SideKV(k[tokens].view(shape))
    side.write(row.first_position, k[tokens].view(shape), v[tokens].view(shape))
    return side.keys[:seq_len], side.values[:seq_len]


def attend_per_request(runtime: MemoryRuntime, layer_idx: int, q: torch.Tensor,
                       k: torch.Tensor, v: torch.Tensor, output: torch.Tensor, attn_layer: Any,
                       attn_metadata: Any) -> None:
    """The plain-torch path: local and memory attention of one request at a time, merged
    by vLLM's merge_attn_states."""
    from vllm.v1.attention.ops.merge_attn_states import merge_attn_states

    hd = runtime.head_dim
    heads = q.shape[-1] // hd
    for row in runtime.rows:
        request = row.request
        keys, values = local_key_value(runtime, layer_idx, row, k, v, attn_layer,
                                       attn_metadata)
        # Template-head tokens attend locally only.
        skip = max(request.bank.template_len - row.first_position, 0)
        n = row.num_tokens - skip
        if n <= 0:
            continue
        first = row.first_position + skip
        tokens = slice(row.token_start + skip, row.token_start + row.num_tokens)
        query = q[tokens].view(n, heads, hd)
        local, local_lse = attention_with_lse(query, keys, values, attn_layer.impl.scale,
                                              causal_offset=first)
        mem_k, mem_v = runtime.pool.read(request.staged[layer_idx])
        memory, memory_lse = attention_with_lse(query, mem_k, mem_v,
                                                attn_layer.impl.scale, None)
        merged = torch.empty(local.shape, dtype=local.dtype, device=local.device)
        merge_attn_states(merged, local, local_lse, memory, memory_lse)
        output[tokens] = merged.reshape(n, -1).to(output.dtype)
