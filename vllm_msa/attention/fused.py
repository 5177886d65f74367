"""The GPU path of a router layer's memory requests: batched, three launches per layer.

1. local attention with its log-sum-exp, for every memory request of the step at once:
   vLLM's own flash-attention (`flash_attn_varlen_func(..., return_softmax_lse=True)`) on the
   paged cache through the requests' block-table rows, causal, the queries being the last
   tokens of each sequence (bottom-right alignment = the tokens of this step);
2. memory attention over each request's staged pool slots, merged with (1) by LSE and written
   into the layer output's rows: `vllm_msa.kernels.memory_attention` (one launch);
3. nothing else: no per-request Python, no gather of the local context.

Used when the platform backend is FLASH_ATTN (its cache layout and varlen kernel) and every
memory request's staged memory is in the pool; the plain-torch loop in `paths.py` covers
the rest (CPU, other backends, pool overflow). Index tensors depend only on the batch, so
they are built once per step (`StepPlan`) and, for the slot lists, reused across decode steps
while the batch's requests stay the same.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any

import torch

from .uploads import ranges, upload

FUSED_BACKENDS = frozenset({"FLASH_ATTN"})


def fused_enabled() -> bool:
    """VLLM_MSA_ATTENTION=torch forces the plain-torch loop (for comparisons)."""
    return os.environ.get("VLLM_MSA_ATTENTION", "fused") != "torch"


@dataclass(frozen=True)
class StepPlan:
    """This step's memory query rows, as the varlen attention wants them."""

    row_ids: tuple[int, ...]  # positions in runtime.rows of the requests with query rows
    q_rows: torch.Tensor  # [Tm] int64: rows of the step's tokens, requests in order
    cu_query: list[int]
    cu_query_dev: torch.Tensor  # [R+1] int32
    seq_lens: torch.Tensor  # [R] int32: tokens in the cache after this step
    block_table: torch.Tensor  # [R, max blocks] int32
    max_query: int
    max_seq: int

    @classmethod
    def build(cls, rows: list[Any], block_table: torch.Tensor) -> StepPlan | None:
        row_ids, spans, cu, lens, batch_rows = [], [], [0], [], []
        for i, row in enumerate(rows):
            skip = max(row.request.bank.template_len - row.first_position, 0)
            n = row.num_tokens - skip
            if n <= 0:
                continue
            row_ids.append(i)
            spans.append((row.token_start + skip, row.token_start + row.num_tokens))
            cu.append(cu[-1] + n)
            lens.append(row.first_position + row.num_tokens)
            batch_rows.append(row.batch_index)
        if not row_ids:
            return None
        device = block_table.device
        return cls(
            row_ids=tuple(row_ids),
            q_rows=upload(ranges(spans), device),
            cu_query=cu,
            cu_query_dev=upload(cu, device, torch.int32),
            seq_lens=upload(lens, device, torch.int32),
            block_table=block_table.index_select(0, upload(batch_rows, device)),
            max_query=max(b - a for a, b in itertools.pairwise(cu)),
            max_seq=max(lens),
        )


class FusedAttention:
    """Plans and runs the fused path; one per runtime."""

    def __init__(self) -> None:
        self.reset()
        self._batches: dict[int, tuple[tuple, list, Any]] = {}  # layer -> (key, staged, batch)
        self.calls = 0  # layers served by the fused path (tests check it ran)

    def reset(self) -> None:
        self.plan: StepPlan | None = None
        self._planned = False
        self._tiles: dict = {}  # tile tables of this step, shared by its router layers

    def usable(self, rows: list[Any], layer_idx: int, q: torch.Tensor, attn_layer: Any,
               pool: Any) -> bool:
        from ..kernels.memory_attention import kernel_supported

        return (fused_enabled() and q.is_cuda
                and attn_layer.attn_backend.get_name() in FUSED_BACKENDS
                and kernel_supported(q, pool.keys)
                and all(row.request.staged[layer_idx].slots is not None for row in rows))

    def run(self, rows: list[Any], layer_idx: int, q: torch.Tensor, output: torch.Tensor,
            attn_layer: Any, attn_metadata: Any, pool: Any, head_dim: int,
            staged: torch.cuda.Event | None = None) -> None:
        """`staged`: the end of this layer's fetch on its side stream; the local pass runs
        meanwhile and the memory attention waits for it."""
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        from ..kernels.memory_attention import memory_attention
        from .attend import paged_key_value

        if not self._planned:
            self.plan = StepPlan.build(rows, attn_metadata.block_table)
            self._planned = True
        plan = self.plan
        if plan is None:
            return
        heads = q.shape[-1] // head_dim
        scale = attn_layer.impl.scale
        query = q.view(-1, heads, head_dim).index_select(0, plan.q_rows)
        key_cache, value_cache = paged_key_value(attn_layer.kv_cache, head_dim)
        local_out, local_lse = flash_attn_varlen_func(
            q=query, k=key_cache, v=value_cache,
            max_seqlen_q=plan.max_query, cu_seqlens_q=plan.cu_query_dev,
            max_seqlen_k=plan.max_seq, seqused_k=plan.seq_lens,
            softmax_scale=scale, causal=True, block_table=plan.block_table,
            return_softmax_lse=True, fa_version=attn_layer.impl.vllm_flash_attn_version,
        )
        if staged is not None:  # slot lists and counts were written on the fetch's stream
            torch.cuda.current_stream().wait_event(staged)
        batch = self._memory_batch(rows, plan, layer_idx, q.device)
        memory_attention(query, pool.keys, pool.values, batch, scale,
                         local=(local_out, local_lse), out=output.view(-1, heads, head_dim),
                         out_rows=plan.q_rows)
        self.calls += 1

    def _memory_batch(self, rows: list[Any], plan: StepPlan, layer_idx: int,
                      device: torch.device) -> Any:
        """Slot lists of this layer; unchanged while the same staged entries are in the
        same order with the same query rows (every decode step of a stable batch)."""
        from ..kernels.memory_attention import MemoryBatch

        staged = [rows[i].request.staged[layer_idx] for i in plan.row_ids]
        key = (tuple(plan.cu_query), tuple(id(s) for s in staged))
        cached = self._batches.get(layer_idx)
        if cached is not None and cached[0] == key:
            return cached[2]
        table = staged[0].table
        if (table is not None and table.shape[0] == len(staged)
                and all(s.table is table and s.row == i for i, s in enumerate(staged))):
            # Staged together in this order (a prefill step): the reservation table itself is
            # the slot list, each request's range a whole row (counts bound what is read).
            width = table.shape[1]
            batch = MemoryBatch.build(plan.cu_query, [i * width for i in range(len(staged) + 1)],
                                      table.view(-1), counts=staged[0].counts,
                                      cache=self._tiles)
        else:
            cu_slots = [0]
            for s in staged:
                cu_slots.append(cu_slots[-1] + s.width)
            batch = MemoryBatch.build(plan.cu_query, cu_slots,
                                      torch.cat([s.slots for s in staged]),
                                      counts=torch.cat([s.count for s in staged]),
                                      cache=self._tiles)
        # The key holds ids of Staged objects; keeping them referenced keeps the ids unique.
        self._batches[layer_idx] = (key, staged, batch)
        return batch
