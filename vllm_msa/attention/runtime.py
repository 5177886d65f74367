"""The worker side of MSA serving: the banks a worker serves, the lifecycle of its memory
requests, and each step's batch (msa-spec §3).

One `MemoryRuntime` lives in each worker process, created with the model. Per step the model
runner hands it the batch rows in order (`begin_step`); the router layers' attention op then
calls `attend`, which routes the requests whose routing span is in this step (`router.py`),
stages their selected documents' K̄/V̄ and merges memory attention into the platform
backend's local attention (`paths.py`). Requests without memory go through the platform
backend untouched, so they compute exactly what Qwen3 computes. Per-request state is in
`requests.py`, what comes back to callers in `reports.py`.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any

import torch

from ..bank.model_info import ModelInfo
from ..bank.reader import MemoryBank
from ..config import MSAParams
from ..options import MSAServingConfigError, RequestOptions, ServingConfig
from .capture import EncodeCaptures
from .decode_graphs import DecodeGraphs
from .fused import FusedAttention
from .index_parallel import check_same_bank, exchange_candidates
from .paths import attend, padded
from .reports import selection_reports
from .requests import FullGraphStep, MemoryRequest, StepRow
from .router import RouterLayer, folds_router_query, routing_params
from .staging import StagingPool
from .step_metrics import StepMetrics
from .tiers import ServedBank, local_kv_heads
from .uploads import upload
from .warmup import warm_up_runtime

logger = logging.getLogger(__name__)

_runtime: MemoryRuntime | None = None


def current_runtime() -> MemoryRuntime | None:
    return _runtime


class MemoryRuntime:
    def __init__(self, vllm_config: Any, msa: MSAParams, *, num_heads: int, num_kv_heads: int,
                 head_dim: int, device: torch.device) -> None:
        from vllm.distributed import (
            get_pp_group,
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
        self.tp_rank = get_tensor_model_parallel_rank()
        self.pp_rank = get_pp_group().rank_in_group
        self.metrics = StepMetrics(device)  # the `vllm_msa_*` series' figures
        self.kv_heads = local_kv_heads(num_kv_heads, self.tp_rank, self.tp_size)
        # Memory Parallel: each rank routes over its share of every bank's documents and the
        # ranks exchange candidates (index_parallel.py); one rank needs no exchange.
        self.shard = ((self.tp_rank, self.tp_size)
                      if self.serving.index_parallel == "shard" else (0, 1))
        self.exchange = exchange_candidates if self.shard[1] > 1 else None
        # Pipeline parallelism: a stage routes (and loads the index of) its own router layers.
        self.router_layers = stage_router_layers(
            msa.router_layers, vllm_config.model_config.hf_config.num_hidden_layers)
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
        self.side_stream: torch.cuda.Stream | None = None  # fetches (paths.fetch_stream)
        self._uploads: dict[tuple, torch.Tensor] = {}  # this step's index tensors (step_upload)
        self.banks = self._open_banks(vllm_config)
        local_kv = self.kv_heads.stop - self.kv_heads.start
        dtype = vllm_config.model_config.dtype
        # Documents the API server encodes with this engine (live bank edits: capture.py).
        self.encodes = EncodeCaptures(msa, self.router_layers, self.kv_heads, num_kv_heads,
                                      head_dim, dtype)
        if not self.banks:
            self.pool = StagingPool(1, local_kv, head_dim, dtype, device)
        elif self.serving.staging_mib is not None:
            self.pool = StagingPool.sized(self.serving.staging_mib, local_kv, head_dim, dtype,
                                          device)
        else:
            self.pool = StagingPool.for_batch(
                vllm_config.scheduler_config.max_num_seqs * len(self.router_layers)
                * max(bank.worst_case_chunks(self.rope_offset) for bank in self.banks.values()),
                local_kv, head_dim, dtype, device)
        self.graphs = self._decode_graphs(vllm_config, device) if self.banks else None
        self.warmed_up: list[str] = []  # kernel launches made at start (warmup.py)
        self.late_compiles: list[dict[str, Any]] = []  # compiles after it (late_compiles.py)
        warm_up_runtime(self, vllm_config)
        self.metrics.baseline(self)

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
        return DecodeGraphs(list(self.router_layers), rows, self.pool.num_slots, device)

    def _open_banks(self, vllm_config: Any) -> dict[str, ServedBank]:
        if not self.serving.banks:
            return {}
        model_config = vllm_config.model_config
        info = ModelInfo.from_checkpoint(model_config.model, str(model_config.dtype))
        banks = {}
        # The model is built under vLLM's default-device context; bank tables are host data.
        with torch.device("cpu"):
            for name, path in self.serving.banks.items():
                banks[name] = self._open_bank(name, path, info,
                                              vllm_config.scheduler_config.max_num_seqs)
        return banks

    def _open_bank(self, name: str, path: str, info: ModelInfo, max_num_seqs: int
                   ) -> ServedBank:
        bank = MemoryBank.open(path, info)
        check_same_bank(name, bank, self.tp_size)
        # Every rank reads its part of every file; the first of each tensor-parallel group
        # verifies them (a corrupt bank stops the engine's start wherever it is found).
        served = ServedBank.load(name, bank, self.device, self.kv_heads,
                                 verify=self.serving.verify, checksums=self.tp_rank == 0,
                                 shard=self.shard, layers=self.router_layers,
                                 share_host=self.serving.share_host,
                                 host_cache_bytes=None if self.serving.cache_gib(name) is None
                                 else self.serving.cache_gib(name) * 2**30,
                                 index_dtype=self.serving.index_dtype_of(name),
                                 reserve_chunks=-(-self.serving.reserve_of(name)
                                                  // info.pooling_kernel_size),
                                 normalize=self.serving.score == "cosine"
                                 and not info.normalized_routing_keys)
        cache = served.host_cache
        if cache is not None:
            # One step stages at most max_num_seqs requests' top-k largest documents per layer.
            need = max_num_seqs * served.worst_case_chunks(self.rope_offset)
            if cache.rows < need:
                raise MSAServingConfigError(
                    f"bank {name!r}: host_cache_gib {self.serving.cache_gib(name)} holds "
                    f"{cache.rows} chunks per router layer; a full batch (max_num_seqs "
                    f"{max_num_seqs} x the top-{self.rope_offset} largest documents) can "
                    f"select {need}: raise host_cache_gib to at least "
                    f"{self.serving.cache_gib(name) * need / max(cache.rows, 1):.3g} or lower "
                    "max_num_seqs")
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

    def locate_selections(self, bank: str) -> None:
        """Before bank `bank` switches generation: every request's selections over it as
        stored positions (`MemoryRequest.located`), so a request staged again later reads
        what it selected, whatever the new generation removed or replaced. One `locate` for
        every request and layer (a switch while a full batch decodes)."""
        pending = [(request, layer, selection.doc_ids.view(-1))
                   for request in self.requests.values() if request.bank.name == bank
                   for layer, selection in request.selections.items()
                   if layer not in request.located]
        if not pending:
            return
        rows = padded([ids for *_, ids in pending], -1)
        located = pending[0][0].bank.locate(rows)  # (every request's ServedBank of `bank`)
        width = rows.shape[1]
        for i, (request, layer, ids) in enumerate(pending):
            # (`locate` sorts each row: the -1 padding comes first, the row's own k last)
            request.located[layer] = tuple(part[i:i + 1, width - ids.numel():]
                                           for part in located)

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
        layers = len(self.router_layers)
        eager = False
        for req_id, extra in requests:
            if req_id in self._settled:
                continue
            request = self.requests.get(req_id)
            if request is None:
                if EncodeCaptures.is_encode(extra):
                    eager = True  # (its prefill is captured by the op's Python)
                elif RequestOptions.from_extra_args(extra) is None:
                    self._settled.add(req_id)
                else:
                    eager = True
            elif len(request.staged) < layers or any(
                    staged.private is not None for staged in request.staged.values()):
                # (staged outside the pool: a full graph reads pool slots only)
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
                if EncodeCaptures.is_encode(extra):
                    self.encodes.begin_row(EncodeCaptures.key_of(extra), token_start,
                                           num_tokens, first_position, self.device)
                    continue
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
                self.metrics.request(bank.name)
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
            layers = self.router_layers
            if any(layer not in row.request.staged
                   or row.request.staged[layer].private is not None
                   for row in self.rows for layer in layers):
                raise RuntimeError("a full CUDA graph step with a request that routes, "
                                   "stages or was staged outside the pool; the runner hook "
                                   "should have prevented it")
            self.graphs.prepare(self.rows, self.pool.version)
            if batch_key is not None and all(
                    row.first_position >= row.request.bank.template_len for row in self.rows):
                self._last_full = FullGraphStep(batch_key, self.pool.version, offsets,
                                                bool(self.rows))

    def end_step(self) -> None:
        self.metrics.end_step()
        self.encodes.end_step()
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
    @property
    def routing_heads(self) -> int:
        """Query heads routing scores: every head, or one per KV head when folded."""
        return self.num_kv_heads if self.fold_router_query else self.num_heads

    def step_upload(self, key: tuple, values: Callable[[], Any], device: torch.device,
                    dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """An index tensor of this step, built (`values()`) and uploaded once: every router
        layer of a step routes and stages the same requests, so their token rows and top-k
        lists repeat."""
        tensor = self._uploads.get(key)
        if tensor is None:
            tensor = self._uploads[key] = upload(values(), device, dtype)
        return tensor


    def attend(self, layer_name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               h: torch.Tensor, output: torch.Tensor, attn_layer: Any, attn_metadata: Any
               ) -> None:
        """Local ⊕ memory attention of this step's memory requests in one router layer
        (`paths.attend`)."""
        attend(self, layer_name, q, k, v, h, output, attn_layer, attn_metadata)

    def capture(self, layer_name: str, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor
                ) -> None:
        """This step's encode requests' K, V and routing keys of one router layer."""
        layer = self.layers[layer_name]
        self.encodes.capture(layer.layer_idx, layer.attn, k, v, h)

    def take_reports(self) -> dict[str, dict[str, Any]]:
        """Selections made since the last call, for requests that asked for them."""
        return selection_reports(self.requests)


def stage_router_layers(router_layers: Any, num_layers: int) -> list[int]:
    """The router layers of this pipeline stage (vLLM's own split of the decoder layers:
    `get_pp_indices`, which honours VLLM_PP_LAYER_PARTITION); all of them without PP."""
    from vllm.distributed import get_pp_group
    from vllm.distributed.utils import get_pp_indices

    group = get_pp_group()
    if group.world_size == 1:
        return list(router_layers)
    start, end = get_pp_indices(num_layers, group.rank_in_group, group.world_size)
    return [layer for layer in router_layers if start <= layer < end]


def create_runtime(vllm_config: Any, msa: MSAParams, **dims: Any) -> MemoryRuntime:
    global _runtime
    _runtime = MemoryRuntime(vllm_config, msa, **dims)
    return _runtime
