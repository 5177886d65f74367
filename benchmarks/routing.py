"""Routing throughput: the fused, batched Triton routing kernel on MSA-4B-shaped indexes.

One router layer's index (32 query heads, 8 KV heads, head_dim 128, one routing key per 64
memory tokens, documents of ~512 tokens = ~8 chunks, bf16 keys) for 1M / 10M / 100M memory
tokens, routed for 1 / 8 / 64 concurrent questions of ~48 routing tokens each. In the same run
it measures the two ceilings (a device-to-device copy of a buffer of the index's size, counting
bytes read plus bytes written, and a bf16 torch.matmul) and reports, per row: the time of one
layer (the whole `route_batched` call and the scoring kernel alone), 18 layers, the effective
index-read bandwidth (index bytes / time) and its ratio to the copy bandwidth, both floors
(index bytes at copy bandwidth; 2*T*H*C*D FLOPs at matmul peak) and which one binds, and the
plain-torch path (`route` per question) as baseline where it is affordable. No vLLM needed.

    python benchmarks/routing.py                       # full run (GPU), writes
                                                       # benchmarks/results/routing-<card>.json
    python benchmarks/routing.py --sizes 1e6 --questions 1 --no-sweep --out-dir /tmp  # quick
    python benchmarks/routing.py --sizes 1e7,2.5e7 --questions 1 --sweep-each-size --out-dir /tmp

The tile sweep times the scoring kernel alone (the tiles shape nothing else), at the largest
index size unless --sweep-each-size (results before 2026-11-26 evening timed the whole call).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a source checkout: vllm_msa (and vllm_msa.kernels) from here

from host_timing import host_microseconds  # noqa: E402  (benchmarks/, the script's folder)
from report import (  # noqa: E402
    card_name,
    card_slug,
    device_copy_bandwidth,
    matmul_rate,
    pyplot,
)
from vllm_msa.kernels.routing import (  # noqa: E402
    KernelConfig,
    chunk_scores_batched,
    default_config,
    prepare_index,
    route_batched,
    route_batched_reference,
    routing_flops,
)

from vllm_msa.attention.routing import RoutingIndex  # noqa: E402
from vllm_msa.config import MSAParams  # noqa: E402

# MSA-4B (msa-spec §1-3): 32 query heads, 8 KV heads, head_dim 128, pooling 64, 18 router
# layers, top-k 16, head mean / query max / chunk max, dot product scaled by head_dim^-0.5.
SHAPE = dict(heads=32, kv_heads=8, head_dim=128, pooling=64, doc_chunks=8, router_layers=18,
             top_k=16, hidden=2560)
MSA_4B = dict(head_reduce_method="mean", query_reduce_method="max", chunk_reduce_method="max",
              aux_loss_method="INFONCE_DECOUPLE", decouple_router=True)
DEVICE = "cuda"
SWEEP = [  # (block_c, num_warps, num_stages, most routing tokens per block)
    (128, 8, 3, 64), (128, 8, 4, 64), (128, 4, 3, 64), (64, 4, 4, 64), (128, 8, 2, 64),
    (128, 8, 3, 128), (128, 8, 2, 128), (64, 4, 3, 128), (128, 4, 2, 64), (64, 4, 2, 64),
]


def median_ms(fn, reps: int, warmup: int) -> float:
    """Median of `reps` calls' GPU times (a CUDA event pair around each call; calls are
    issued back to back, the host running ahead as in serving, then one synchronize), after
    `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def graph_us(fn, calls: int = 20, reps: int = 7) -> float:
    """GPU microseconds per call of `fn`, replayed from one CUDA graph of `calls` calls: no
    host launch gaps, so a stage of a few small kernels shows what it costs the GPU."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles, cached uploads) outside the capture
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    return median_ms(graph.replay, reps, 1) * 1e3 / calls


def stage_costs(q, cu, prepared, msa, top_k: int) -> dict[str, float]:
    """GPU microseconds of each stage of one routing call (`graph_us`), and of the selection
    stage for several document blocks, with the fused merge and with candidates + topk."""
    from vllm_msa.kernels import routing as rk

    keys = prepared.keys
    chunk = rk._chunk_scores(q, cu, prepared, msa, None)
    top = 1 << (top_k - 1).bit_length()
    out = {
        "prepare_queries": graph_us(
            lambda: rk.prepare_queries(q, cu, keys.shape[1], msa, keys.dtype)),
        "chunk_scores_incl_prepare": graph_us(lambda: rk._chunk_scores(q, cu, prepared, msa,
                                                                       None)),
        "route_batched_keys": graph_us(
            lambda: rk.route_batched_keys(q, cu, prepared, msa, top_k)),
    }
    # The router's query projection (bf16 GEMM, as vLLM's linear layers run it) for every
    # head, and folded to one query per KV head (vllm_msa.attention.runtime
    # folds_router_query), whose routing call then takes [T, kv_heads, D].
    hidden = torch.randn(q.shape[0], SHAPE["hidden"], device=DEVICE, dtype=torch.bfloat16)
    for name, heads in (("all_heads", SHAPE["heads"]), ("folded", SHAPE["kv_heads"])):
        weight = torch.randn(heads * SHAPE["head_dim"], SHAPE["hidden"], device=DEVICE,
                             dtype=torch.bfloat16)
        out[f"router_projection_{name}"] = graph_us(
            lambda w=weight: torch.nn.functional.linear(hidden, w))
    folded = q.view(q.shape[0], SHAPE["kv_heads"], -1, q.shape[2]).mean(2)
    out["route_batched_keys_folded"] = graph_us(
        lambda: rk.route_batched_keys(folded, cu, prepared, msa, top_k))
    for block_n in (128, 256, 512, 1024):
        if rk.merge_width(prepared.tiebreak.shape[0], top, block_n):
            out[f"select_merged_{block_n}"] = graph_us(
                lambda b=block_n: rk.document_keys_batched(chunk, prepared, msa, top, b,
                                                           merge=True))
        out[f"select_topk_{block_n}"] = graph_us(lambda b=block_n: torch.topk(
            rk.document_keys_batched(chunk, prepared, msa, top, b), top_k, dim=1))
    # The default block's launch shape: warps (the merge's 16 serial maxima are reductions
    # across the program) and chunks of a document per load.
    block_n = rk.document_block(prepared.tiebreak.shape[0], top)
    if rk.merge_width(prepared.tiebreak.shape[0], top, block_n):
        for warps, tile in itertools.product((1, 2, 4, 8), (4, 8, 16)):
            out[f"select_merged_{block_n}_w{warps}_c{tile}"] = graph_us(
                lambda w=warps, c=tile: rk.document_keys_batched(
                    chunk, prepared, msa, top, block_n, merge=True, num_warps=w, chunk_tile=c))
    return out


def median_ms_synced(fn, reps: int) -> float:
    """Median latency of a call from an idle GPU to its results (host work included)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def make_index(memory_tokens: int, gen: torch.Generator) -> RoutingIndex:
    chunks = memory_tokens // SHAPE["pooling"]
    keys = torch.randn(chunks, SHAPE["kv_heads"], SHAPE["head_dim"], device=DEVICE,
                       dtype=torch.bfloat16, generator=gen)
    # Documents of 6-10 chunks (mean 8: ~512 tokens), the last one cut to fit.
    counts = torch.randint(6, 11, (chunks // 6 + 1,), device=DEVICE, generator=gen)
    ends = torch.cumsum(counts, 0)
    num_docs = int((ends < chunks).sum()) + 1
    counts = counts[:num_docs].clone()
    counts[-1] -= int(ends[num_docs - 1]) - chunks
    doc_index = torch.repeat_interleave(torch.arange(num_docs, device=DEVICE), counts)
    doc_ids = torch.randperm(num_docs, device=DEVICE, generator=gen)
    return RoutingIndex(keys, doc_index, doc_ids)


def make_questions(n: int, tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    counts = [tokens] if n == 1 else torch.randint(
        tokens - 8, tokens + 9, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    cu = [0]
    for c in counts:
        cu.append(cu[-1] + c)
    q = torch.randn(cu[-1], SHAPE["heads"], SHAPE["head_dim"], device=DEVICE,
                    dtype=torch.bfloat16, generator=gen)
    return q, cu


def config_of(entry) -> KernelConfig:
    block_c, warps, stages, block_t = entry
    return KernelConfig(block_c=block_c, num_warps=warps, num_stages=stages, block_t=block_t)


def executed_flops(msa: MSAParams, cu: list[int], chunks: int, block_t: int) -> float:
    """Tensor-core FLOPs the kernel issues: the requests' tokens (only the last ones for
    "last") in blocks of block_t (the last block padded); head mean folds each group of query
    heads into its KV head (so KV instead of H products per token)."""
    heads = SHAPE["kv_heads"] if msa.head_reduce == "mean" else SHAPE["heads"]
    tokens = len(cu) - 1 if msa.query_reduce == "last" else cu[-1]
    block = min(block_t, max(16, 1 << (tokens - 1).bit_length()))
    return routing_flops(math.ceil(tokens / block) * block, heads, chunks, SHAPE["head_dim"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e6,1e7,1e8", help="memory tokens per index")
    parser.add_argument("--questions", default="1,8,64", help="concurrent questions")
    parser.add_argument("--tokens", type=int, default=48, help="routing tokens per question")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reference-up-to", type=float, default=1e7,
                        help="time the plain-torch path for indexes up to this many tokens")
    parser.add_argument("--no-sweep", action="store_true",
                        help="skip the tile-size sweep (use the kernel's defaults)")
    parser.add_argument("--sweep-each-size", action="store_true",
                        help="sweep the tiles at every index size (default: the largest only)")
    parser.add_argument("--no-stages", action="store_true",
                        help="skip the per-stage GPU times (CUDA-graph replays)")
    parser.add_argument("--head-max", action="store_true",
                        help="also time head_reduce=max (no head folding) at the largest size")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--json", help="result path (default OUT_DIR/routing-<card>.json)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/routing.py needs a CUDA GPU")

    import triton

    torch.manual_seed(0)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    card = card_name()
    sizes = args_sizes(args)
    questions = [int(n) for n in args.questions.split(",")]
    msa = MSAParams.from_dict(MSA_4B, num_layers=36)
    msa_max = dataclasses.replace(msa, head_reduce="max")
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    started = time.time()

    peak = matmul_rate(args.reps)
    print(f"{card}: bf16 matmul 8192^3 {peak / 1e12:.0f} TFLOP/s; L2 {l2_bytes >> 20} MiB",
          flush=True)

    results, sweeps, chosen = [], [], {}
    for size in sorted(sizes, reverse=True):  # largest first: the sweep runs there
        results += bench_size(size, size == max(sizes), args, questions, msa, msa_max, peak,
                              l2_bytes, gen, chosen, sweeps)
        torch.cuda.empty_cache()

    goal_rows = [r for r in results if r["memory_tokens"] == max(sizes)
                 and r["questions"] == min(questions) and r["head_reduce"] == "mean"]
    achieved = goal_rows[0]["bw_ratio"] if goal_rows else None
    out = {
        "benchmark": "routing",
        "card": card,
        "versions": {"torch": torch.__version__, "triton": triton.__version__,
                     "cuda": torch.version.cuda, "python": sys.version.split()[0]},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "shape": {**SHAPE, "routing_tokens_per_question": args.tokens, "keys": "bfloat16",
                  "queries": "bfloat16", "msa_config": MSA_4B},
        "matmul_bf16_flops": peak,
        "l2_bytes": l2_bytes,
        "notes": [
            "copy_bw counts bytes read plus bytes written (torch copy_ of a buffer of the "
            "index's size); read_bw = index bytes / time of one router layer",
            "times are GPU times per call, calls issued back to back (host running ahead); "
            "ms_latency_synced (1 question): wall time of one call from an idle GPU to its "
            "results, host work included",
            "ms_route: the whole route_batched call (queries prepared, fused scoring kernel, "
            "document reduce + sort keys, torch.topk); ms_kernel: the scoring kernel call "
            "alone (chunk_scores_batched)",
            "host_us_per_call (smallest index): host time to enqueue each stage; where it "
            "exceeds the GPU time, the host bounds the call",
            "18 layers = 18 x one layer (every router layer has its own index)",
            "stage_gpu_us: GPU microseconds per call of each stage, replayed from a CUDA "
            "graph of 20 calls (no host gaps); select_merged_B / select_topk_B: the "
            "document stage with blocks of B documents, with the fused merge / with "
            "candidates + torch.topk; select_merged_B_wW_cC: the default block B with W "
            "warps and C chunks of a document per load",
            "indexes smaller than 4x L2 are rotated over copies so each call reads HBM",
            "head_reduce=mean folds each group's query heads before the kernel: it issues "
            "2*T*KV*C*D (padded) FLOPs instead of 2*T*H*C*D",
        ],
        "rows": results,
        "sweep": sweeps,
        "goal_metric": "effective index-read bandwidth / device-to-device copy bandwidth, "
                       f"{max(sizes):,} memory tokens, {min(questions)} question, one router "
                       "layer, MSA-4B shape (whole route_batched call)",
        "goal": 0.8,
        "achieved": achieved,
        "seconds": time.time() - started,
    }
    path = Path(args.json) if args.json else Path(args.out_dir) / f"routing-{card_slug(card)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")

    print(f"\nrouting, one router layer, MSA-4B shape, {card}; copy bandwidth counts read + "
          f"write; bf16 matmul peak {peak / 1e12:.0f} TFLOP/s\n")
    head = (f"{'tokens':>6} {'head':>4} {'R':>3} {'route ms':>9} {'kernel ms':>9} "
            f"{'18 layers':>9} {'read TB/s':>9} {'xcopy':>6} {'mem floor':>9} "
            f"{'cmp floor':>9} {'binds':>7} {'torch ms':>9} {'speedup':>7} {'=ref':>5}")
    print(head)
    for r in results:
        ref = r.get("ms_reference")
        print(f"{r['memory_tokens'] / 1e6:5g}M {r['head_reduce']:>4} {r['questions']:>3} "
              f"{r['ms_route']:9.3f} {r['ms_kernel']:9.3f} {r['ms_route_18_layers']:9.2f} "
              f"{r['read_bw'] / 1e12:9.2f} {r['bw_ratio']:6.2f} {r['memory_floor_ms']:9.3f} "
              f"{r['compute_floor_ms']:9.3f} {r['binding_floor']:>7} "
              + (f"{ref:9.2f} {ref / r['ms_route']:6.0f}x {r['selection_overlap_reference']:5.2f}"
                 if ref else f"{'-':>9} {'-':>7} {'-':>5}"))
    print("=ref: share of the top-16 documents the plain-torch path (fp32 queries) also picks")
    print(f"\ngoal: {out['goal_metric']}: >= {out['goal']}; achieved {achieved:.3f}"
          if achieved is not None else "")
    print(f"wrote {path}")
    plot(results, path.with_suffix(".png"), card)


def bench_size(size, largest, args, questions, msa, msa_max, peak, l2_bytes, gen, chosen,
               sweeps) -> list[dict]:
    """Every row of one index size (tile sweep first where `chosen` lacks the mode/batch)."""

    results = []
    index = make_index(size, gen)
    prepared = prepare_index(index)
    keys = prepared.keys
    chunks, docs = keys.shape[0], index.num_documents
    index_bytes = keys.numel() * keys.element_size()
    copy_bw = device_copy_bandwidth(index_bytes, args.reps)
    # Small indexes fit in L2: rotate over copies so that every call reads HBM.
    copies = [prepared] + [
        dataclasses.replace(prepared, keys=keys.clone())
        for _ in range(max(0, math.ceil(4 * l2_bytes / index_bytes) - 1))]
    print(f"\n{size:,} memory tokens: {chunks:,} chunks, {docs:,} documents, index "
          f"{index_bytes / 1e9:.3f} GB/layer (x{len(copies)} copies); copy "
          f"{copy_bw / 1e12:.2f} TB/s (read + write)", flush=True)
    modes = [("mean", msa)] + ([("max", msa_max)] if args.head_max and largest else [])
    for (head_mode, params), n in itertools.product(modes, questions):
        q, cu = make_questions(n, args.tokens, gen)
        ks = [SHAPE["top_k"]] * n
        turn = [0]

        def call(cfg, which="route", q=q, cu=cu, ks=ks, params=params, turn=turn):
            turn[0] = (turn[0] + 1) % len(copies)
            idx = copies[turn[0]]
            if which == "route":
                return route_batched(q, cu, idx, params, ks, config=cfg)
            return chunk_scores_batched(q, cu, idx, params, config=cfg)

        key = (head_mode, n, size) if args.sweep_each_size else (head_mode, n)
        if key not in chosen:
            chosen[key] = None if args.no_sweep else sweep(call, head_mode, n, size, args,
                                                           sweeps)
        cfg = config_of(chosen[key]) if chosen[key] else None
        ms = median_ms(lambda cfg=cfg, call=call: call(cfg), args.reps, args.warmup)
        ms_kernel = median_ms(lambda cfg=cfg, call=call: call(cfg, "chunks"), args.reps,
                              args.warmup)
        latency = median_ms_synced(lambda cfg=cfg, call=call: call(cfg), 5) if n == 1 else None
        tokens = cu[-1]
        block_t = ((cfg or KernelConfig()).block_t
                   or default_config(torch.bfloat16, head_mode == "max").block_t)
        flops = routing_flops(tokens, SHAPE["heads"], chunks, SHAPE["head_dim"])
        flops_run = executed_flops(params, cu, chunks, block_t)
        memory_floor = index_bytes / copy_bw * 1e3
        compute_floor = flops / peak * 1e3
        row = {
            "memory_tokens": size, "chunks": chunks, "documents": docs,
            "index_bytes": index_bytes, "head_reduce": head_mode, "questions": n,
            "routing_tokens": tokens, "config": chosen[key],
            "ms_route": ms, "ms_kernel": ms_kernel, "ms_latency_synced": latency,
            "ms_route_18_layers": ms * SHAPE["router_layers"],
            "read_bw": index_bytes / (ms * 1e-3),
            "read_bw_kernel": index_bytes / (ms_kernel * 1e-3),
            "copy_bw": copy_bw,
            "bw_ratio": index_bytes / (ms * 1e-3) / copy_bw,
            "bw_ratio_kernel": index_bytes / (ms_kernel * 1e-3) / copy_bw,
            "flops_2THCD": flops, "flops_executed": flops_run,
            "memory_floor_ms": memory_floor, "compute_floor_ms": compute_floor,
            "compute_floor_executed_ms": flops_run / peak * 1e3,
            "binding_floor": "memory" if memory_floor >= compute_floor else "compute",
            "binding_floor_executed": ("memory" if memory_floor >= flops_run / peak * 1e3
                                       else "compute"),
        }
        if size <= args.reference_up_to and (n <= 8 or size <= 1e6):
            def ref(q=q, cu=cu, ks=ks, params=params):
                return route_batched_reference(q, cu, index, params, ks)

            row["ms_reference"] = median_ms(ref, 3, 1)
            got, want = call(cfg), ref()
            row["selections_equal_reference"] = sum(
                g.doc_ids.tolist() == w.doc_ids.tolist()
                for g, w in zip(got, want, strict=True)) / n
            row["selection_overlap_reference"] = sum(
                len(set(g.doc_ids.tolist()) & set(w.doc_ids.tolist()))
                for g, w in zip(got, want, strict=True)) / (n * SHAPE["top_k"])
        if head_mode == "mean" and not args.no_stages:
            row["stage_gpu_us"] = stage_costs(q, cu, copies[0], params, SHAPE["top_k"])
            print(f"  GPU us per stage (CUDA graph), R={n}: " + ", ".join(
                f"{k} {v:.1f}" for k, v in row["stage_gpu_us"].items()), flush=True)
        if size == min(args_sizes(args)) and head_mode == "mean" and n in (1, max(questions)):
            row["host_us_per_call"] = host_costs(q, cu, copies[0], params)
            print(f"  host time per call, R={n}: " + ", ".join(
                f"{k} {v:.0f} us" for k, v in row["host_us_per_call"].items()), flush=True)
        results.append(row)
        print(f"  {head_mode:>4} R={n:<3} route {ms:8.3f} ms (kernel {ms_kernel:8.3f})"
              f"  {row['read_bw'] / 1e12:5.2f} TB/s = {row['bw_ratio']:.2f}x copy"
              + (f"  torch {row['ms_reference']:.1f} ms" if "ms_reference" in row else ""),
              flush=True)
    return results


def args_sizes(args) -> list[int]:
    return [int(float(s)) for s in args.sizes.split(",")]


def host_costs(q, cu, prepared, msa, calls: int = 50) -> dict[str, float]:
    """Host (CPU) microseconds per call to enqueue each stage of route_batched: where the
    time goes when the GPU work is small (small indexes)."""
    from vllm_msa.kernels import routing as rk

    keys = prepared.keys
    stages = {
        "prepare_queries": lambda: rk.prepare_queries(q, cu, keys.shape[1], msa, keys.dtype),
        "upload_offsets": lambda: rk._int_tensor(cu, keys.device),
        "chunk_scores_incl_above": lambda: rk._chunk_scores(q, cu, prepared, msa, None),
        "route_batched": lambda: route_batched(q, cu, prepared, msa, SHAPE["top_k"]),
    }
    out = {}
    for name, fn in stages.items():
        out[name] = host_microseconds(fn, calls, warmup=3)
    return out


def sweep(call, head_mode, n, size, args, sweeps) -> tuple:
    """The fastest SWEEP entry for this call (entries that fail to build are recorded)."""
    best = None
    for entry in SWEEP:
        try:
            # The tiles shape the scoring kernel only: time it alone (the whole route call
            # is host-bound on small indexes, which would hide the differences).
            ms = median_ms(lambda e=entry: call(config_of(e), "chunks"),
                           max(5, args.reps // 3), 2)
        except Exception as e:  # out of shared memory, etc.
            sweeps.append({"head_reduce": head_mode, "questions": n, "config": entry,
                           "error": repr(e)[:200]})
            continue
        sweeps.append({"head_reduce": head_mode, "questions": n, "memory_tokens": size,
                       "config": entry, "ms": ms})
        print(f"  sweep {head_mode} R={n} {entry}: {ms:.3f} ms", flush=True)
        if best is None or ms < best[0]:
            best = (ms, entry)
    return best[1]


def plot(results: list[dict], path: Path, card: str) -> None:
    plt = pyplot()
    if plt is None:
        print("matplotlib not available: no plot")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for head in sorted({r["head_reduce"] for r in results}):
        for n in sorted({r["questions"] for r in results}):
            rows = sorted((r for r in results if r["questions"] == n
                           and r["head_reduce"] == head), key=lambda r: r["memory_tokens"])
            if not rows:
                continue
            x = [r["memory_tokens"] for r in rows]
            label = f"{n} question{'s' * (n > 1)}, head {head}"
            ax1.plot(x, [r["ms_route"] for r in rows], "o-", label=label)
            ax2.plot(x, [r["bw_ratio"] for r in rows], "o-", label=label)
    ax1.set(xscale="log", yscale="log", xlabel="memory tokens", ylabel="ms per router layer",
            title="route_batched time")
    ax2.axhline(0.8, color="gray", ls="--", lw=1)
    ax2.set(xscale="log", xlabel="memory tokens", ylabel="index read bw / copy bw",
            title="effective bandwidth")
    ax1.legend(fontsize=7)
    fig.suptitle(f"MSA routing, MSA-4B shape, {card}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
