"""The worker side of MSA serving: banks, per-request memory state, and the router layers'
attention (msa-spec §3).

One `MemoryRuntime` lives in each worker process, created with the model. Per step the model
runner hands it the batch rows in order (`begin_step`); the router layers' attention op then
routes requests whose routing span is in this step, stages the selected documents' K̄/V̄ and
merges memory attention into the platform backend's local attention. Requests without memory
go through the platform backend untouched, so they compute exactly what Qwen3 computes.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..bank.model_info import ModelInfo
from ..bank.reader import MemoryBank
from ..config import MSAParams
from ..serving.options import RequestOptions, ServingConfig
from .attend import (
    READABLE_PAGED_BACKENDS,
    SideKV,
    attention_with_lse,
    gather_paged,
    paged_key_value,
)
from .decode_graphs import DecodeGraphs
from .fused import FusedAttention
from .profiling import phase
from .routing import Selection
from .staging import Staged, StagingPool
from .tiers import ServedBank, local_kv_heads
from .uploads import ranges, upload
from .warmup import warm_up_runtime

logger = logging.getLogger(__name__)

_runtime: MemoryRuntime | None = None


def current_runtime() -> MemoryRuntime | None:
    return _runtime


@dataclass
class MemoryRequest:
    """A request that reads a bank: its options, selection per layer and staged memory."""

    req_id: str
    options: RequestOptions
    bank: ServedBank
    selections: dict[int, Selection | RoutedSelection] = field(default_factory=dict)
    staged: dict[int, Staged] = field(default_factory=dict)
    reported: set[int] = field(default_factory=set)  # layers whose selection was reported
    side_kv: dict[int, SideKV] = field(default_factory=dict)  # opaque-cache backends only


@dataclass(frozen=True)
class RoutedSelection:
    """A request's selection in one layer as routing left it: row `row` of a batch of top-k
    sort keys on the device. Staging reads the keys; ids and scores decode on first use."""

    batch: Any  # vllm_msa.kernels.routing.RoutedBatch
    row: int

    @property
    def doc_ids(self) -> torch.Tensor:
        return self.batch.selection(self.row).doc_ids

    @property
    def scores(self) -> torch.Tensor:
        return self.batch.selection(self.row).scores


@dataclass(frozen=True)
class StepRow:
    """One memory request's tokens in this step's flattened batch."""

    request: MemoryRequest
    batch_index: int  # row of the block table
    token_start: int  # first of its tokens in the step
    num_tokens: int
    first_position: int  # index in the request's sequence of its first token in the step


@dataclass(frozen=True)
class FullGraphStep:
    """What the last full-graph step set up, for the next one with the same batch layout."""

    batch_key: Any  # the runner's request ids and token offsets
    pool_version: int
    offsets: list[tuple[int, int]] | None  # token spans shifted by the RoPE offset
    has_memory: bool  # it had memory rows (counted in `memory_steps`)


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


class MemoryRuntime:
    def __init__(self, vllm_config: Any, msa: MSAParams, *, num_heads: int, num_kv_heads: int,
                 head_dim: int, device: torch.device) -> None:
        from vllm.distributed import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        self.msa = msa
        self.serving = ServingConfig.from_additional_config(vllm_config.additional_config)
        self.rope_offset = self.serving.configured_top_k(msa)
        self.routing = routing_params(msa, self.serving.score)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.device = device
        self.tp_size = get_tensor_model_parallel_world_size()
        self.kv_heads = local_kv_heads(num_kv_heads, get_tensor_model_parallel_rank(),
                                       self.tp_size)
        self.fold_router_query = folds_router_query(self.routing, num_heads, num_kv_heads,
                                                    self.tp_size)
        self.layers: dict[str, RouterLayer] = {}
        self.requests: dict[str, MemoryRequest] = {}
        self.rows: list[StepRow] = []
        self.num_preempted = 0  # memory requests preempted so far (they keep their selection)
        # Steps with memory requests, by how they ran: "full_graph" (a replayed full CUDA
        # graph) or "op_python" (the op's Python ran: eager, or a piecewise graph). Read by
        # benchmarks/serve.py to tell a slow decode from one that left the full graphs.
        self.memory_steps: collections.Counter[str] = collections.Counter()
        # Requests a step needs no Python for: plain ones, and memory requests with every
        # router layer staged (`needs_eager_step`; `begin_step` skips plain ones on sight).
        self._settled: set[str] = set()
        self._last_full: FullGraphStep | None = None  # begin_step's steady-decode shortcut
        self._offsets: list[tuple[int, int]] | None = None
        self._offset_key: tuple | None = None
        self._offset_delta: torch.Tensor | None = None
        self.fused = FusedAttention()
        self.eager_step = False  # this step routes or stages: no full CUDA graph
        self._stream: torch.cuda.Stream | None = None  # fetches (see _fetch_stream)
        self._uploads: dict[tuple, torch.Tensor] = {}  # this step's index tensors (step_upload)
        self.banks = self._open_banks(vllm_config)
        local_kv = self.kv_heads.stop - self.kv_heads.start
        dtype = vllm_config.model_config.dtype
        if not self.banks:
            self.pool = StagingPool(1, local_kv, head_dim, dtype, device)
        elif self.serving.staging_mib is not None:
            self.pool = StagingPool.sized(self.serving.staging_mib, local_kv, head_dim, dtype,
                                          device)
        else:
            self.pool = StagingPool.for_batch(
                vllm_config.scheduler_config.max_num_seqs * len(msa.router_layers)
                * max(bank.worst_case_chunks(self.rope_offset) for bank in self.banks.values()),
                local_kv, head_dim, dtype, device)
        self.graphs = self._decode_graphs(vllm_config, device) if self.banks else None
        self.warmed_up: list[str] = []  # kernel launches made at start (warmup.py)
        warm_up_runtime(self, vllm_config)

    def _decode_graphs(self, vllm_config: Any, device: torch.device) -> DecodeGraphs | None:
        """Buffers for memory attention inside full decode graphs, when vLLM will capture
        them (decided at engine set-up: patches/model_config.py `full_decode_graphs`)."""
        extra = getattr(vllm_config.kv_transfer_config, "kv_connector_extra_config", None) or {}
        compilation = vllm_config.compilation_config
        if not (extra.get("full_decode_graphs")
                and compilation.cudagraph_mode.has_full_cudagraphs()):
            return None
        rows = max(compilation.max_cudagraph_capture_size or 0,
                   vllm_config.scheduler_config.max_num_seqs)
        return DecodeGraphs(list(self.msa.router_layers), rows, self.pool.num_slots, device)

    def _open_banks(self, vllm_config: Any) -> dict[str, ServedBank]:
        if not self.serving.banks:
            return {}
        model_config = vllm_config.model_config
        info = ModelInfo.from_checkpoint(model_config.model, str(model_config.dtype))
        banks = {}
        # The model is built under vLLM's default-device context; bank tables are host data.
        with torch.device("cpu"):
            for name, path in self.serving.banks.items():
                banks[name] = self._open_bank(name, path, info)
        return banks

    def _open_bank(self, name: str, path: str, info: ModelInfo) -> ServedBank:
        from vllm.distributed import get_tensor_model_parallel_rank

        bank = MemoryBank.open(path, info)
        # Every rank reads every file; the first of each tensor-parallel group verifies them
        # (a corrupt bank stops the engine's start wherever it is found).
        served = ServedBank.load(name, bank, self.device, self.kv_heads,
                                 verify=self.serving.verify,
                                 checksums=get_tensor_model_parallel_rank() == 0)
        if self.serving.score == "cosine" and not info.normalized_routing_keys:
            served.index = {
                layer: dataclasses.replace(
                    idx, routing_keys=torch.nn.functional.normalize(
                        idx.routing_keys.float(), dim=-1).to(idx.routing_keys.dtype))
                for layer, idx in served.index.items()
            }
        return served

    # ------------------------------------------------------------------ lifecycle
    def register_layer(self, layer_name: str, layer_idx: int, attn: Any) -> None:
        self.layers[layer_name] = RouterLayer(layer_idx, attn)

    def finish(self, req_ids: Any) -> None:
        """Forget finished or aborted requests and free their staged memory."""
        for req_id in req_ids:
            self._settled.discard(req_id)
            if self.requests.pop(req_id, None) is not None:
                self.pool.release(req_id)

    def preempt(self, req_ids: Any) -> None:
        """Free a preempted request's staged memory; keep its selection for the recompute."""
        for req_id in req_ids:
            request = self.requests.get(req_id)
            if request is not None:
                self.num_preempted += 1
                self._settled.discard(req_id)
                request.staged.clear()
                self.pool.release(req_id)

    def all_settled(self, req_ids: list[str]) -> bool:
        """Whether none of these requests routes or stages in this step, from what earlier
        steps learnt (`needs_eager_step`): one set lookup per request, no argument parsing,
        for every decode step at full batch."""
        return self._settled.issuperset(req_ids)

    def needs_eager_step(self, requests: Any) -> bool:
        """Whether any of these (req_id, extra_args) routes or stages in this step, which
        only the op's Python can do: such a step must not replay a full CUDA graph. Notes
        the requests that never will again (plain, or every layer staged) for
        `all_settled`; preemption and finishing forget them."""
        layers = len(self.msa.router_layers)
        eager = False
        for req_id, extra in requests:
            if req_id in self._settled:
                continue
            request = self.requests.get(req_id)
            if request is None:
                if RequestOptions.from_extra_args(extra) is None:
                    self._settled.add(req_id)
                else:
                    eager = True
            elif len(request.staged) < layers:
                eager = True
            else:
                self._settled.add(req_id)
        return eager

    def begin_step(self, rows: Callable[[], list[tuple[str, dict | None, int, int, int, int]]],
                   full_graph: bool = False, batch_key: Any = None) -> None:
        """This step's batch: `rows()` builds (req_id, extra_args, batch_index, token_start,
        num_tokens, first_position) per scheduled request, in batch order. `full_graph`: the
        step replays a full CUDA graph, whose memory attention reads buffers set here.
        `batch_key` (the runner's request ids and token offsets) lets a steady decode skip
        the rows: a full-graph step with the last full-graph step's key
        and staging pool reads the same buffers and shifts the same token spans (its rows'
        positions only advanced, past every template head), so only its count is kept. At
        batch 64 building the rows is a per-request Python loop on the host's critical path
        of every decode step."""
        self.fused.reset()
        self._uploads.clear()
        last = self._last_full
        if full_graph and batch_key is not None and last is not None and \
                last.batch_key == batch_key and last.pool_version == self.pool.version:
            self.rows = []  # a full graph's op reads the buffers, never the rows
            self._offsets = last.offsets
            if last.has_memory:
                self.memory_steps["full_graph"] += 1
            self.graphs.replays += 1
            return
        self._last_full = None
        self.rows = []
        offsets = None
        for req_id, extra, batch_index, token_start, num_tokens, first_position in rows():
            request = self.requests.get(req_id)
            if request is None:
                if req_id in self._settled:
                    continue  # plain
                options = RequestOptions.from_extra_args(extra)
                if options is None:
                    self._settled.add(req_id)  # plain for good: not parsed again
                    continue
                bank = self.banks.get(options.bank)
                if bank is None:
                    raise RuntimeError(f"request {req_id}: bank {options.bank!r} is not "
                                       "attached to this worker")
                request = MemoryRequest(req_id, options, bank)
                self.requests[req_id] = request
            start, end = request.options.span_start, request.options.span_end
            if not request.selections and not (
                first_position <= start and end <= first_position + num_tokens
            ):
                raise RuntimeError(
                    f"request {req_id}: routing span [{start}, {end}) is not whole in this "
                    f"step's tokens [{first_position}, {first_position + num_tokens}); the "
                    "MSA scheduler should have prevented this")
            self.rows.append(StepRow(request, batch_index, token_start, num_tokens,
                                     first_position))
            first = max(request.bank.template_len - first_position, 0)
            if first < num_tokens:
                if offsets is None:
                    offsets = []
                offsets.append((token_start + first, token_start + num_tokens))
        self._offsets = offsets
        if self.rows:
            self.memory_steps["full_graph" if full_graph else "op_python"] += 1
        if full_graph and self.graphs is not None:
            layers = self.msa.router_layers
            if any(layer not in row.request.staged for row in self.rows for layer in layers):
                raise RuntimeError("a full CUDA graph step with a request that routes or "
                                   "stages; the runner hook should have prevented it")
            self.graphs.prepare(self.rows, self.pool.version)
            if batch_key is not None and all(
                    row.first_position >= row.request.bank.template_len for row in self.rows):
                self._last_full = FullGraphStep(batch_key, self.pool.version, offsets,
                                                bool(self.rows))

    def end_step(self) -> None:
        self.rows = []
        self.fused.reset()
        self._uploads.clear()
        self._offsets = None

    def offset_positions(self, positions: torch.Tensor) -> None:
        """The global RoPE offset (msa-spec §3), in place: memory requests' tokens after the
        template head move by the configured top-k. In place because compiled CUDA-graph
        pieces read positions from the runner's buffer, whatever tensor the model is given;
        the runner rewrites that buffer every step."""
        if not self._offsets:
            return
        # One add per step with a cached per-token delta (steady decode reuses it), not one
        # small kernel per request.
        key = (positions.shape[0], positions.device, tuple(self._offsets))
        if key != self._offset_key:
            delta = torch.zeros(positions.shape[0], dtype=positions.dtype)
            for a, b in self._offsets:
                delta[a:b] = self.rope_offset
            self._offset_delta = delta.to(positions.device)
            self._offset_key = key
        positions.add_(self._offset_delta)

    # ------------------------------------------------------------------ attention
    def _token_rows(self, spans: list[tuple[int, int]], device: torch.device
                    ) -> torch.Tensor | slice:
        """The step rows of these token spans: a slice where they are one run (one request
        with one routing range: a view, no gather launch), else an index tensor."""
        run = single_run(spans)
        if run is not None:
            return run
        return self.step_upload(("routing rows", *spans), lambda: ranges(spans), device)

    @property
    def routing_heads(self) -> int:
        """Query heads routing scores: every head, or one per KV head when folded."""
        return self.num_kv_heads if self.fold_router_query else self.num_heads

    def routing_query(self, layer: RouterLayer, q: torch.Tensor, h: torch.Tensor,
                      rows: torch.Tensor | slice) -> torch.Tensor:
        """Qr of the routing-span tokens: [tokens, routing_heads, head_dim] (all heads, or
        each KV head's group mean with `fold_router_query`)."""
        if self.fold_router_query:
            qr, _ = layer.attn.router_q_fold(h[rows])
        elif self.msa.decouple_router:
            qr, _ = layer.attn.router_q_proj(h[rows])
        else:
            qr = q[rows]
        if self.tp_size > 1:
            from vllm.distributed import tensor_model_parallel_all_gather

            qr = tensor_model_parallel_all_gather(qr.contiguous(), dim=-1)
        return qr.view(qr.shape[0], self.routing_heads, self.head_dim)

    def select_pending(self, layer: RouterLayer, q: torch.Tensor, h: torch.Tensor) -> None:
        """Route every request whose routing span is in this step and that has no selection
        in this layer yet: per bank, one batched routing call (the index is read once for all
        of them; `vllm_msa.kernels.routing`, plain torch where Triton cannot run)."""
        from ..kernels.routing import route_batched, route_batched_keys

        pending: dict[str, list[StepRow]] = {}
        for row in self.rows:
            if layer.layer_idx not in row.request.selections:
                pending.setdefault(row.request.bank.name, []).append(row)
        for rows in pending.values():
            spans, cu = [], [0]
            for row in rows:
                shift = row.token_start - row.first_position  # request token i -> step row
                spans.extend((a + shift, b + shift) for a, b in row.request.options.ranges)
                cu.append(cu[-1] + sum(b - a for a, b in row.request.options.ranges))
            qr = self.routing_query(layer, q, h, self._token_rows(spans, q.device))
            index = rows[0].request.bank.prepared_index(layer.layer_idx)
            top_ks = [r.request.options.top_k for r in rows]
            routed = route_batched_keys(qr, cu, index, self.routing, top_ks)
            if routed is None:  # no Triton here: plain torch, decoded selections
                selections = route_batched(qr, cu, index, self.routing, top_ks)
            else:  # left on the device as sort keys, for the staging kernel
                selections = [RoutedSelection(routed, i) for i in range(len(rows))]
            for row, selection in zip(rows, selections, strict=True):
                row.request.selections[layer.layer_idx] = selection

    def step_upload(self, key: tuple, values: Callable[[], Any], device: torch.device,
                    dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """An index tensor of this step, built (`values()`) and uploaded once: every router
        layer of a step routes and stages the same requests, so their token rows and top-k
        lists repeat."""
        tensor = self._uploads.get(key)
        if tensor is None:
            tensor = self._uploads[key] = upload(values(), device, dtype)
        return tensor

    def stage_pending(self, layer_idx: int) -> torch.cuda.Event | None:
        """Stage this layer's selected documents for every request in the step that has none
        staged yet (just routed, or back from preemption): per bank, one copy, queued on the
        device without the host waiting for routing's result. With a fetch stream
        (`_fetch_stream`) the copy runs there, overlapping the local attention; the returned
        event marks its end (the memory attention waits for it)."""
        pending: dict[str, list[MemoryRequest]] = {}
        for row in self.rows:
            if layer_idx not in row.request.staged:
                pending.setdefault(row.request.bank.name, []).append(row.request)
        if not pending:
            return None
        stream = self._fetch_stream()
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())  # routing's result
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for requests in pending.values():
                bank = requests[0].bank
                widths = [(r.req_id, bank.worst_case_chunks(r.options.top_k))
                          for r in requests]
                staged = self._stage_routed(bank, layer_idx, requests, widths)
                if staged is None:
                    staged = self._stage_selected(bank, layer_idx, requests, widths)
                for request, entry in zip(requests, staged, strict=True):
                    request.staged[layer_idx] = entry
        if stream is None:
            return None
        done = torch.cuda.Event()
        done.record(stream)
        return done

    def _stage_routed(self, bank: ServedBank, layer_idx: int,
                      requests: list[MemoryRequest], widths: list[tuple[str, int]]
                      ) -> list[Staged] | None:
        """One staging launch straight from routing's sort keys, when these requests were
        routed together in this step (the usual prefill) and the pool holds them all."""
        selections = [r.selections[layer_idx] for r in requests]
        first = selections[0]
        if not (isinstance(first, RoutedSelection)
                and self.pool.reads_host_directly(bank.host_keys[layer_idx],
                                                  bank.host_values[layer_idx])
                and len(first.batch.ks) == len(requests)
                and all(isinstance(s, RoutedSelection) and s.batch is first.batch
                        and s.row == i for i, s in enumerate(selections))):
            return None
        ks = first.batch.ks
        return self.pool.stage_routed(
            bank.host_keys[layer_idx], bank.host_values[layer_idx], first.batch,
            self.step_upload(("top-k", *ks), lambda: ks, self.pool.keys.device, torch.int32),
            widths, bank.max_document_chunks)

    def _stage_selected(self, bank: ServedBank, layer_idx: int,
                        requests: list[MemoryRequest], widths: list[tuple[str, int]]
                        ) -> list[Staged]:
        """Staging from decoded document ids (device ops, then one copy): requests back from
        preemption, steps mixing them, pool overflow, CPU."""
        ids = [r.selections[layer_idx].doc_ids for r in requests]
        doc_ids = (torch.stack(ids) if len({d.numel() for d in ids}) == 1 else
                   torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=-1))
        starts, counts = bank.selected_chunks(doc_ids)
        return self.pool.stage_documents(bank.host_keys[layer_idx],
                                         bank.host_values[layer_idx], starts, counts, widths)

    def _fetch_stream(self) -> torch.cuda.Stream | None:
        """The side stream host->device fetches may run on: VLLM_MSA_FETCH_STREAM=1 (GPU).
        Off by default: measured on an H100 (benchmarks/ttft.py, README), the only work a
        layer's fetch can overlap is its local pass, and the stream hand-offs cost more
        host time than that saves (TTFT 41 vs 44 ms at batch 1, 130 vs 144 ms at 64)."""
        if self.device.type != "cuda" or os.environ.get("VLLM_MSA_FETCH_STREAM", "0") != "1":
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def local_key_value(self, layer_idx: int, row: StepRow, k: torch.Tensor, v: torch.Tensor,
                        attn_layer: Any, attn_metadata: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The request's own K/V [0, seq_len) in this layer, this step's tokens included."""
        seq_len = row.first_position + row.num_tokens
        if attn_layer.attn_backend.get_name() in READABLE_PAGED_BACKENDS:
            key_cache, value_cache = paged_key_value(attn_layer.kv_cache, self.head_dim)
            blocks = attn_metadata.block_table[row.batch_index]
            return (gather_paged(key_cache, blocks, seq_len),
                    gather_paged(value_cache, blocks, seq_len))
        tokens = slice(row.token_start, row.token_start + row.num_tokens)
        shape = (row.num_tokens, -1, self.head_dim)
        side = row.request.side_kv.get(layer_idx)
        if side is None:
            side = row.request.side_kv[layer_idx] = SideKV(k[tokens].view(shape))
        side.write(row.first_position, k[tokens].view(shape), v[tokens].view(shape))
        return side.keys[:seq_len], side.values[:seq_len]

    def attend(self, layer_name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               h: torch.Tensor, output: torch.Tensor, attn_layer: Any, attn_metadata: Any
               ) -> None:
        """Overwrite memory requests' rows of `output` (the local attention) with local ⊕
        memory attention. `q`, `k` after RoPE, `v`; `h` is the layer's normed input. On a GPU
        with flash-attention: batched (`fused.py`); elsewhere one request at a time in torch."""
        layer = self.layers[layer_name]
        hd = self.head_dim
        with phase("msa.route"):
            self.select_pending(layer, q, h)
        with phase("msa.fetch"):
            staged = self.stage_pending(layer.layer_idx)
        with phase("msa.attention"):
            if self.fused.usable(self.rows, layer.layer_idx, q, attn_layer, self.pool):
                self.fused.run(self.rows, layer.layer_idx, q, output, attn_layer,
                               attn_metadata, self.pool, hd, staged)
                return
            if staged is not None:
                torch.cuda.current_stream().wait_event(staged)
            self._attend_per_request(layer.layer_idx, q, k, v, output, attn_layer,
                                     attn_metadata)

    def _attend_per_request(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, output: torch.Tensor, attn_layer: Any,
                            attn_metadata: Any) -> None:
        """The plain-torch path: local and memory attention of one request at a time, merged
        by vLLM's merge_attn_states."""
        from vllm.v1.attention.ops.merge_attn_states import merge_attn_states

        hd = self.head_dim
        heads = q.shape[-1] // hd
        for row in self.rows:
            request = row.request
            keys, values = self.local_key_value(layer_idx, row, k, v, attn_layer,
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
            mem_k, mem_v = self.pool.read(request.staged[layer_idx])
            memory, memory_lse = attention_with_lse(query, mem_k, mem_v,
                                                    attn_layer.impl.scale, None)
            merged = torch.empty(local.shape, dtype=local.dtype, device=local.device)
            merge_attn_states(merged, local, local_lse, memory, memory_lse)
            output[tokens] = merged.reshape(n, -1).to(output.dtype)

    # ------------------------------------------------------------------ reporting
    def take_reports(self) -> dict[str, dict[str, Any]]:
        """Selections made since the last call, for requests that asked for them."""
        reports = {}
        for req_id, request in self.requests.items():
            if not request.options.return_selection:
                continue
            new = set(request.selections) - request.reported
            if not new:
                continue
            request.reported |= new
            reports[req_id] = {"bank": request.options.bank, "layers": {
                str(layer): {"doc_ids": request.selections[layer].doc_ids.tolist(),
                             "scores": [s if math.isfinite(s) else None for s in
                                        request.selections[layer].scores.tolist()]}
                for layer in sorted(new)}}
        return reports


def create_runtime(vllm_config: Any, msa: MSAParams, **dims: Any) -> MemoryRuntime:
    global _runtime
    _runtime = MemoryRuntime(vllm_config, msa, **dims)
    return _runtime
