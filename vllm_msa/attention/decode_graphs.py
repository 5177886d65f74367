"""Memory attention inside vLLM's full CUDA graphs, for decode steps.

A full graph replays the captured kernels without running any Python, so the router
layers' memory attention must be captured in a form whose per-step inputs live in
fixed buffers:

* the local pass with its LSE: vLLM's flash-attention over the step's rows with the backend's
  own metadata tensors (query_start_loc, seq_lens, block_table, scheduler metadata), which the
  runner refreshes in place before every replay — the same call the backend makes, plus LSE;
* memory attention + LSE merge (`kernels/memory_attention.py`) over `tiles` / `slots`
  buffers here: one tile per batch row (its token, 1 if it reads memory else 0, its
  reserved slot range and where its count of staged chunks is), one slot list and one
  count list per router layer. `prepare` rewrites them before a replay when
  the batch's requests or their staged memory changed; plain rows and padding are empty tiles,
  so the kernel leaves their (backend-computed) output alone.

Only steps where no request routes or stages may replay a full graph: the runner hook
(`patches/model_runner.py`) keeps those on piecewise graphs, where the op runs its Python.
Capture, warm-up and replay all take this path; eager and piecewise steps take `fused.py`.
"""

from __future__ import annotations

from typing import Any

import torch

from .uploads import upload


class DecodeGraphs:
    def __init__(self, router_layers: list[int], max_rows: int, max_slots: int,
                 device: torch.device) -> None:
        self.position = {layer: i for i, layer in enumerate(router_layers)}
        self.tiles = torch.zeros(len(router_layers), max_rows, 5, dtype=torch.int32,
                                 device=device)
        self.slots = torch.zeros(len(router_layers), max(max_slots, 1), dtype=torch.int32,
                                 device=device)
        # Chunks staged per row (tile i reads counts[layer, i]); written on the device.
        self.counts = torch.zeros(len(router_layers), max_rows, dtype=torch.int64,
                                  device=device)
        self._key: tuple | None = None
        self.captured = 0  # router-layer calls captured or warmed (tests check it ran)
        self.single_local = 0  # of those, with the local pass computed once (no backend's)
        self.replays = 0  # steps that replayed a full graph with these buffers

    @property
    def max_rows(self) -> int:
        return self.tiles.shape[1]

    def prepare(self, rows: list[Any], pool_version: int) -> None:
        """Point the buffers at this step's memory rows (each has every layer staged)."""
        self.replays += 1
        key = (pool_version, tuple((row.request.req_id, row.token_start) for row in rows))
        if key == self._key:
            return
        if any(row.token_start >= self.max_rows for row in rows):
            raise RuntimeError("a decode row beyond the captured batch size")
        tiles = [[[0, 0, 0, 0, -1] for _ in range(self.max_rows)] for _ in self.position]
        row_index = upload([row.token_start for row in rows], self.counts.device)
        for layer, i in self.position.items():
            start, parts, counts = 0, [], []
            for row in rows:
                staged = row.request.staged[layer]
                n = staged.slots.numel()
                tiles[i][row.token_start] = [row.token_start, row.num_tokens, start, start + n,
                                             row.token_start]
                parts.append(staged.slots)
                counts.append(staged.count)
                start += n
            if parts:
                if start > self.slots.shape[1]:
                    raise RuntimeError("staged slots exceed the decode-graph slot buffer")
                self.slots[i, :start].copy_(torch.cat(parts))  # device to device
                self.counts[i].index_copy_(0, row_index, torch.cat(counts))
        self.tiles.copy_(upload(tiles, self.tiles.device, torch.int32))
        self._key = key

    def attend(self, layer_idx: int, q: torch.Tensor, output: torch.Tensor, attn_layer: Any,
               metadata: Any, pool: Any, head_dim: int, local_in_output: bool = False
               ) -> None:
        """Local (flash-attention, LSE) then memory + merge for every row of the step.
        `local_in_output`: the backend's attention did not run; the local pass writes every
        row's output (rows without memory keep it) and the merge overwrites it in place."""
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        from ..kernels.memory_attention import MemoryBatch, memory_attention
        from .attend import paged_key_value

        if metadata.max_query_len != 1:
            raise RuntimeError("MSA full decode graphs need one query token per request "
                               "(set additional_config msa.decode_graphs to 'piecewise')")
        n = metadata.num_actual_tokens
        if n > self.max_rows:
            raise RuntimeError(f"decode graph of {n} rows exceeds the buffers' {self.max_rows}")
        heads = q.shape[-1] // head_dim
        query = q[:n].view(n, heads, head_dim)
        key_cache, value_cache = paged_key_value(attn_layer.kv_cache, head_dim)
        impl = attn_layer.impl
        rows = output[:n].view(n, heads, head_dim)
        local_out, local_lse = flash_attn_varlen_func(
            q=query, k=key_cache, v=value_cache, out=rows if local_in_output else None,
            max_seqlen_q=metadata.max_query_len, cu_seqlens_q=metadata.query_start_loc,
            max_seqlen_k=metadata.max_seq_len, seqused_k=metadata.seq_lens,
            softmax_scale=impl.scale, causal=True, block_table=metadata.block_table,
            return_softmax_lse=True, scheduler_metadata=metadata.scheduler_metadata,
            num_splits=metadata.max_num_splits, fa_version=impl.vllm_flash_attn_version,
        )
        i = self.position[layer_idx]
        batch = MemoryBatch.from_buffers(self.slots[i], self.tiles[i, :n], block_m=1,
                                         counts=self.counts[i])
        memory_attention(query, pool.keys, pool.values, batch, impl.scale,
                         local=(local_out, local_lse), out=rows)
        self.captured += 1
        self.single_local += local_in_output
