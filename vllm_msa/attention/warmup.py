"""Compile the memory path's Triton kernels at engine start, not on the first requests.

Triton compiles a kernel on its first launch with each set of compile-time constants, which
takes a second or more. vLLM warms its own kernels before serving and then watches for
compiles during inference (`--jit-monitor-mode`, a warning per compile by default); but a
router layer's routing, staging and memory attention run only for requests with memory, so
none of vLLM's dummy runs reaches them, and each variant used to compile in front of the first
user who needed it.

Each of these kernels is launched here once per variant a request can reach, on the worker's
device, with the banks' own tensors (the same sizes, strides and dtypes, so the same
specialisation) and throwaway queries. Sizes that change from step to step (token and request
counts, their strides) are not specialised by the kernels (`do_not_specialize`), so the
variants are few:

- routing (`kernels/routing.py`): query preparation, and chunk scoring per token block
  (16 up to the config's block, as far as a step's routing tokens reach); the document stage
  for the engine's top-k (per bank: its merge width). A request's own `msa_top_k` of another
  power-of-two class compiles its document-stage and staging variants on first use;
- staging from routing's keys (`kernels/stage.py`) and from document ids (`kernels/fetch.py`:
  into the pool, and privately when the pool is full);
- memory attention with its LSE merge (`kernels/memory_attention.py`): decode tiles (one
  query row) and prefill tiles (16), as the fused path calls it.

Skipped where vLLM skips its own warm-up (`kernel_config.enable_jit_warmup`: off with
`enforce_eager`) and where the kernels do not run (CPU).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import torch

from ..config import MSAParams
from .bounded_routing import CompressedRoutingIndex, route_compressed
from .staging import StagingPool
from .tiers import ServedBank

logger = logging.getLogger(__name__)

WARMUP_OWNER = "msa-kernel-warmup"  # the staging pool's owner of the slots used here


def routing_shapes(block_t: int, last_token_only: bool, max_tokens: int, max_requests: int
                   ) -> list[tuple[int, int]]:
    """(routing tokens, requests) of one call per token block the scoring kernel can use:
    it scores blocks of min(block_t, max(16, next power of two of the tokens)) tokens, where
    the tokens are the routing-span tokens of the step, or with query_reduce "last" one per
    request. A block is reachable when a step can hold more tokens than the block below."""
    limit = max_requests if last_token_only else max_tokens
    shapes, block = [], 16
    while block <= block_t:
        if (1 if block == 16 else block // 2 + 1) > limit:
            break
        tokens = min(block, limit)
        shapes.append((tokens, tokens if last_token_only else 1))
        block *= 2
    return shapes


def warm_up_kernels(banks: Mapping[str, ServedBank], pool: StagingPool, routing: MSAParams,
                    top_k: int, num_heads: int, local_heads: int, head_dim: int,
                    dtype: torch.dtype, max_tokens: int, max_requests: int) -> list[str]:
    """Launch every kernel variant the memory path can reach (see the module docstring);
    returns what ran, one line per launch group. `num_heads`: the routing query's heads (all
    ranks' heads, or one per KV head when folded); `local_heads`: this rank's query heads
    (memory attention); `dtype`: the model's."""
    done: list[str] = []
    with torch.no_grad():
        for name, bank in banks.items():
            done += _warm_bank(name, bank, pool, routing, top_k, num_heads, head_dim, dtype,
                               max_tokens, max_requests)
        if banks:
            done += _warm_memory_attention(pool, local_heads, head_dim, dtype)
    return done


def _warm_rescores(prep: CompressedRoutingIndex, qr: torch.Tensor, cu: list[int],
                   routing: MSAParams, top_k: int, requests: int) -> None:
    """The exact re-score of a compressed index routes over a sub-index of its candidates,
    whose chunk count varies with the data, and Triton compiles one variant for counts that
    are multiples of 16 and one for the rest: route over one candidate set of each kind
    (at least top-k documents), as `route_compressed` does."""
    from ..kernels import routing as rk
    from .bounded_routing import candidate_index

    n = prep.num_documents
    chunks = prep.prepared.doc_start.diff().cumsum(0).tolist()
    wanted, picked = {True, False}, []
    for d in range(max(top_k, 1), n + 1):
        aligned = chunks[d - 1] % 16 == 0
        if aligned in wanted:
            wanted.discard(aligned)
            picked.append(d)
    top = rk.triton.next_power_of_2(max(1, min(top_k, prep.prepared.num_bank_documents, n)))
    config = rk.KernelConfig(block_n=rk.document_block(max(n, 1), top))
    device = prep.keys.values.device
    for d in picked:
        sub, _, _ = candidate_index(prep, torch.arange(d, device=device), device)
        rk.route_batched_keys(qr, cu, sub, routing, [top_k] * requests, config)


def _warm_bank(name: str, bank: ServedBank, pool: StagingPool, routing: MSAParams, top_k: int,
               num_heads: int, head_dim: int, dtype: torch.dtype, max_tokens: int,
               max_requests: int) -> list[str]:
    from ..kernels import routing as rk

    # Every router layer of a bank has the same shapes: its first one here stands for all.
    if not bank.index:  # a pipeline stage without router layers
        return []
    layer = next(iter(bank.index))
    prep = bank.prepared_index(layer)
    compressed = isinstance(prep, CompressedRoutingIndex)  # (its re-score runs the kernels)
    device = prep.keys.values.device if compressed else prep.keys.device
    keys_dtype = prep.model_dtype if compressed else prep.keys.dtype
    top_k = min(top_k, bank.num_documents)
    block_t = rk.resolve_config(None, keys_dtype, routing.head_reduce == "max").block_t
    done, routed = [], None
    for tokens, requests in routing_shapes(block_t, routing.query_reduce == "last",
                                           max_tokens, max_requests):
        qr = torch.randn(tokens, num_heads, head_dim, dtype=dtype, device=device)
        cu = [tokens * r // requests for r in range(requests + 1)]
        if compressed:
            routed = route_compressed(qr, cu, prep, routing, [top_k] * requests,
                                      keys_only=True)
            routed = routed if isinstance(routed, rk.RoutedBatch) else None
            if routed is not None:
                _warm_rescores(prep, qr, cu, routing, top_k, requests)
        else:
            routed = rk.route_batched_keys(qr, cu, prep, routing, [top_k] * requests)
        if routed is None:  # no Triton for this index: routing runs in torch
            return done
        done.append(f"bank {name}: routing of {tokens} tokens, {requests} requests")
    if routed is None or top_k == 0:
        return done
    host_k, host_v = bank.host_keys[layer], bank.host_values[layer]
    scales = bank.scales(layer)  # (an FP8 tier compiles the dequantising variants)
    if not pool.reads_host_directly(host_k, host_v, scales):
        return done  # staging copies with torch ops
    width = bank.worst_case_chunks(top_k)
    first = rk.RoutedBatch(routed.keys[:1], routed.ks[:1], routed.prep)
    ks = torch.tensor([top_k], dtype=torch.int32, device=device)
    cache = bank.host_cache  # (the disk tier stages only from decoded ids, through its table)
    try:
        if cache is None and pool.stage_routed(host_k, host_v, first, ks,
                                               [(WARMUP_OWNER, width)],
                                               bank.max_document_chunks, scales) is not None:
            done.append(f"bank {name}: staging from routing keys")
    finally:
        pool.release(WARMUP_OWNER)
    # Staging from decoded ids (requests back from preemption): into the pool, and the
    # private copy of a request the full pool cannot hold. (Nothing is cached yet: the disk
    # tier's table turns every row into a hole, and the kernel is compiled all the same.)
    starts, counts = bank.selected_chunks(first.decoded[0])
    try:
        pool.stage_documents(host_k, host_v, starts, counts, [(WARMUP_OWNER, width)], scales,
                             cache.slot_table(layer) if cache is not None else None)
    finally:
        pool.release(WARMUP_OWNER)
    rows = torch.zeros(1, dtype=torch.int64, device=device)
    private = pool.keys.new_empty((1, *pool.keys.shape[1:]))
    StagingPool.copy_rows(host_k, host_v, rows, private, torch.empty_like(private), None,
                          scales)
    done.append(f"bank {name}: staging from document ids (pool, private)")
    return done


def _warm_memory_attention(pool: StagingPool, heads: int, head_dim: int, dtype: torch.dtype
                           ) -> list[str]:
    """Memory attention as the fused path (`fused.py`) launches it: the step's memory rows
    (contiguous), flash-attention's output and LSE [heads, rows] as the local part, written
    into rows of the layer's output, slot lists and device counts from the staging pool."""
    from ..kernels.memory_attention import MemoryBatch, kernel_supported, memory_attention

    device = pool.keys.device
    probe = torch.empty(0, dtype=dtype, device=device)
    if not kernel_supported(probe, pool.keys):
        return []
    done = []
    for rows in (1, 16):  # one query row per tile (decode), 16 (prefill)
        query = torch.randn(rows, heads, head_dim, dtype=dtype, device=device)
        local = (torch.randn_like(query), torch.zeros(heads, rows, dtype=torch.float32,
                                                     device=device))
        output = torch.empty(rows, heads * head_dim, dtype=dtype, device=device)
        slots = torch.zeros(1, dtype=torch.int64, device=device)
        counts = torch.zeros(1, dtype=torch.int64, device=device)
        batch = MemoryBatch.build([0, rows], [0, 1], slots, counts=counts)
        memory_attention(query, pool.keys, pool.values, batch, 1.0, local=local,
                         out=output.view(-1, heads, head_dim),
                         out_rows=torch.arange(rows, device=device))
        done.append(f"memory attention, {rows}-row tiles")
    return done


def warm_up_runtime(runtime, vllm_config) -> None:
    """`warm_up_kernels` for an engine's memory runtime, when vLLM warms its own kernels."""
    kernel_config = getattr(vllm_config, "kernel_config", None)
    if (runtime.device.type != "cuda" or not runtime.banks
            or not getattr(kernel_config, "enable_jit_warmup", True)):
        return
    scheduler = vllm_config.scheduler_config
    start = time.perf_counter()
    try:
        # Outside model construction's default-device context, as in a forward pass.
        with torch.device("cpu"):
            done = warm_up_kernels(
                runtime.banks, runtime.pool, runtime.routing, runtime.rope_offset,
                runtime.routing_heads, runtime.num_heads // runtime.tp_size, runtime.head_dim,
                runtime.pool.keys.dtype, scheduler.max_num_batched_tokens,
                scheduler.max_num_seqs)
        torch.cuda.synchronize(runtime.device)
    except Exception:  # an optimisation only: serving works without it (kernels compile late)
        logger.exception("MSA kernel warm-up failed; kernels will compile on first use")
        return
    runtime.warmed_up = done
    from .late_compiles import watch_late_compiles

    watch_late_compiles(runtime.late_compiles)
    logger.info("MSA kernel warm-up: %d launch groups in %.1f s", len(done),
                time.perf_counter() - start)
