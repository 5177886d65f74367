"""8-bit routing index: what the exact selections cost, on MSA-4B-shaped router layers.

For one router layer's index (32 query heads, 8 KV heads, head_dim 128, documents of ~8
chunks) of each size and 1 / 8 / 64 questions of ~48 routing tokens, in the same run:

* full    the full-precision (bf16) index routed by the Triton kernels (the baseline);
* kernel  the chunk-score kernel alone over the 8-bit index: int8 queries in two levels on
          int8 tensor cores ("int8 x2"), or the 8-bit keys widened to bf16 ("widened keys");
* bounds  the whole bounded pass (`bounded_routing.bounded_candidates`: queries, kernel,
          intervals, document bounds, the candidate set), GPU time;
* re-score gpu  the exact re-score's kernels over the candidates' full-precision keys;
* gpu     bounds + re-score gpu, each replayed from a CUDA graph (the GPU's own time, no
          host launches in between; the event timings above include them where the host
          is slower), against the floor: one read of the whole 8-bit index (values,
          scales, document bounds) at the device-copy bandwidth;
* total   the whole 8-bit routing call (`bounded_routing.route_compressed`): bounds, the
          candidates, their exact keys gathered from host memory (as from a bank file in the
          page cache) and moved to the GPU, and the kernels over them; latency from an idle
          GPU to the sort keys, host work included;
* the documents re-scored (the union over the batch's questions) and the bytes read back.

Every call's sort keys are checked equal to the full-precision kernels' (ids, order, scores).
Two kinds of keys: "iid" (independent Gaussian keys and queries: no document stands out, the
hardest case for the bounds) and "topical" (each document's chunks share a topic direction and
each question leans towards one document's: a few documents stand out, as routing is trained
for). No vLLM needed.

    python benchmarks/compressed_routing.py                      # GPU; writes
        # benchmarks/results/compressed-routing-<card>.json and .png
    python benchmarks/compressed_routing.py --sizes 1e6 --questions 1 --out-dir /tmp  # quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import card_name, card_slug, device_copy_bandwidth, pyplot  # noqa: E402
from routing import MSA_4B, SHAPE, make_index, make_questions, median_ms  # noqa: E402
from vllm_msa.kernels.routing import prepare_index, route_batched_keys  # noqa: E402

from vllm_msa.attention.bounded_routing import (  # noqa: E402
    CompressedRoutingIndex,
    bound_queries,
    bounded_candidates,
    candidate_index,
    route_compressed,
)
from vllm_msa.attention.compressed_index import compress  # noqa: E402
from vllm_msa.config import MSAParams  # noqa: E402

DEVICE = "cuda"


def topical(index, gen: torch.Generator, weight: float = 0.7):
    """`index` with each document's chunks pulled towards a topic of its own."""
    keys = index.routing_keys.float()
    n = index.num_documents
    topics = torch.randn(n, *keys.shape[1:], device=keys.device, generator=gen)
    keys = (1 - weight) * keys + weight * topics[index.chunk_doc_index]
    return type(index)(keys.to(torch.bfloat16), index.chunk_doc_index, index.doc_ids)


def aimed(q: torch.Tensor, cu: list[int], index, gen: torch.Generator) -> torch.Tensor:
    """Questions leaning towards one document each: its first chunk's keys, every head."""
    group = SHAPE["heads"] // SHAPE["kv_heads"]
    docs = torch.randint(0, index.num_documents, (len(cu) - 1,), generator=gen, device=DEVICE)
    starts = prepare_index(index).doc_start[docs]
    target = index.routing_keys[starts].float().repeat_interleave(group, 1)  # [R, H, D]
    rows = torch.repeat_interleave(torch.arange(len(cu) - 1, device=DEVICE),
                                   torch.tensor(cu).diff().to(DEVICE))
    return (0.5 * q.float() + target[rows]).to(q.dtype)


def host_keys(index):
    """The exact keys in pinned host memory, read back by chunk ranges (one gather)."""
    host = index.routing_keys.cpu().pin_memory()

    def exact(ranges):
        starts = torch.tensor([a for a, _ in ranges])
        counts = torch.tensor([b - a for a, b in ranges])
        first = torch.cumsum(counts, 0) - counts
        rows = torch.arange(int(counts.sum())) + torch.repeat_interleave(starts - first, counts)
        return host.index_select(0, rows)

    return exact


def git_commit() -> str | None:
    """The checkout's commit (None outside a git checkout, e.g. a copied tree)."""
    run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                         capture_output=True, text=True)
    return run.stdout.strip() or None


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def graph_ms(fn, reps: int, runs: int) -> dict[str, float] | None:
    """GPU time of `fn` alone: captured once in a CUDA graph, replayed (median and range over
    `runs` medians of `reps` replays). Without host launches in the way, this is what the
    GPU spends; None where `fn` cannot be captured."""
    try:
        fn()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:
        print(f"  (no CUDA graph: {type(e).__name__}: {e})")
        return None
    return spread([median_ms(graph.replay, reps, 2) for _ in range(runs)])


def sweep(index, bq, msa, configs: list[str], args) -> list[dict]:
    """GPU time of the chunk-score kernel alone over the 8-bit index, per tile config
    (block_c x block_t x warps x stages)."""
    from vllm_msa.kernels.routing import KernelConfig, launch_chunk_scores

    out = []
    for text in configs:
        c, t, w, st = (int(x) for x in text.split("x"))
        cfg = KernelConfig(block_c=c, block_t=t, num_warps=w, num_stages=st)
        try:
            times = [median_ms(lambda cfg=cfg: launch_chunk_scores(
                bq.kernel_q, bq.cu, bq.head_max, msa.query_reduce == "mean", index.keys.values,
                index.keys.scale, cfg, bq.integer), args.reps, 2) for _ in range(args.runs)]
        except Exception as e:  # a config that does not fit: say so, go on
            print(f"  config {text}: {type(e).__name__}")
            continue
        out.append({"config": text, "kernel_ms": spread(times)})
        print(f"  config {text:>14}: kernel {statistics.median(times):.3f} ms", flush=True)
    return out


def bench(size: int, kind: str, dtype: str, questions: list[int], args, msa, bandwidth,
          gen) -> list[dict]:
    from vllm_msa.kernels.routing import launch_chunk_scores

    full = make_index(size, gen)
    if kind == "topical":
        full = topical(full, gen)
    prep = prepare_index(full)
    exact = host_keys(full)

    def compressed(shared):
        keys = compress(full.routing_keys, dtype, shared)
        return CompressedRoutingIndex.build(
            type(full)(keys.values, full.chunk_doc_index, full.doc_ids), keys, exact,
            torch.bfloat16)

    shared = compressed(None)
    # (index, int8 queries): both passes over the same keys, and per-head scales if asked
    paths = [(shared, False)]
    if shared.keys.shared_scale:
        paths = [(shared, True)] + ([] if args.integer_only else paths)
    if args.per_head and dtype == "int8":
        paths.append((compressed(False), False))
    full_bytes = full.routing_keys.numel() * 2
    rows = []
    for n in questions:
        q, cu = make_questions(n, args.tokens, gen)
        if kind == "topical":
            q = aimed(q, cu, full, gen)
        ks = [SHAPE["top_k"]] * n
        want = route_batched_keys(q, cu, prep, msa, ks)
        base = [median_ms(lambda q=q, cu=cu, ks=ks: route_batched_keys(q, cu, prep, msa, ks),
                          args.reps, 2) for _ in range(args.runs)]
        for index, integer in paths:
            keys = index.keys
            floor = index.nbytes / bandwidth * 1e3 if bandwidth else None
            got = route_compressed(q, cu, index, msa, ks, keys_only=True, integer=integer)
            if not torch.equal(want.keys, got.keys):
                raise AssertionError(f"{kind} {size:,} x{n}: 8-bit routing selected otherwise")
            before = index.stats.candidates, index.stats.calls, index.stats.seconds
            bq = bound_queries(q, cu, SHAPE["kv_heads"], msa, torch.bfloat16, integer)
            if args.configs and integer:
                swept = sweep(index, bq, msa, args.configs.split(","), args)
            else:
                swept = []
            kernel = [median_ms(lambda bq=bq, keys=keys: launch_chunk_scores(
                bq.kernel_q, bq.cu, bq.head_max, msa.query_reduce == "mean", keys.values,
                keys.scale, integer=bq.integer), args.reps, 2) for _ in range(args.runs)]
            bounds = [median_ms(lambda q=q, cu=cu, ks=ks, index=index, integer=integer:
                                bounded_candidates(q, cu, index, msa, ks, True, integer),
                                args.reps, 2) for _ in range(args.runs)]
            docs = bounded_candidates(q, cu, index, msa, ks, True, integer).nonzero().flatten()
            sub = candidate_index(index, docs, q.device)[0]
            rescore = [median_ms(lambda q=q, cu=cu, ks=ks, sub=sub: route_batched_keys(
                q, cu, sub, msa, ks), args.reps, 2) for _ in range(args.runs)]
            bounds_graph = graph_ms(lambda q=q, cu=cu, ks=ks, index=index, integer=integer:
                                    bounded_candidates(q, cu, index, msa, ks, True, integer),
                                    args.reps, args.runs)
            rescore_graph = graph_ms(lambda q=q, cu=cu, ks=ks, sub=sub: route_batched_keys(
                q, cu, sub, msa, ks), args.reps, args.runs)
            totals = []
            for _ in range(args.runs * args.reps):
                torch.cuda.synchronize()
                t = time.perf_counter()
                route_compressed(q, cu, index, msa, ks, keys_only=True,
                                 integer=integer).keys.sum().item()
                totals.append((time.perf_counter() - t) * 1e3)
            calls = index.stats.calls - before[1]
            candidates = (index.stats.candidates - before[0]) / calls
            if bounds_graph and rescore_graph:  # GPU time without the host's launches
                gpu = bounds_graph["median"] + rescore_graph["median"]
            else:
                gpu = statistics.median(bounds) + statistics.median(rescore)
            row = {"tokens": size, "keys": kind, "index_dtype": dtype,
                   "scales": "per chunk" if keys.shared_scale else "per chunk and KV head",
                   "queries": "int8 x2" if integer else "widened keys", "questions": n,
                   "documents": index.num_documents, "candidates": candidates,
                   "rescored_fraction": candidates / index.num_documents,
                   "rescore_host_ms": (index.stats.seconds - before[2]) / calls * 1e3,
                   "full_ms": spread(base), "kernel_ms": spread(kernel),
                   "bounds_ms": spread(bounds), "rescore_gpu_ms": spread(rescore),
                   "bounds_graph_ms": bounds_graph, "rescore_graph_ms": rescore_graph,
                   "gpu_ms": gpu, "total_ms": spread(totals),
                   "index_bytes": index.nbytes, "full_index_bytes": full_bytes,
                   "floor_8bit_ms": floor,
                   "kernel_vs_floor": statistics.median(kernel) / floor if floor else None,
                   "gpu_vs_floor": gpu / floor if floor else None, "sweep": swept}
            rows.append(row)
            print(f"{kind:>8} {dtype:>8} {row['scales'][:14]:>14} {row['queries']:>12} "
                  f"{size:>12,} {n:>3}  "
                  f"re-scored {candidates:>9,.0f} ({row['rescored_fraction']:6.1%})  "
                  f"full {row['full_ms']['median']:7.3f}  kernel "
                  f"{row['kernel_ms']['median']:7.3f}  bounds {row['bounds_ms']['median']:7.3f}"
                  f"  re-score gpu {row['rescore_gpu_ms']['median']:6.3f} "
                  f"(floor {floor or 0:6.3f}, gpu {row['gpu_vs_floor'] or 0:4.2f}x)  "
                  f"total {row['total_ms']['median']:8.2f} [{row['total_ms']['min']:.2f}-"
                  f"{row['total_ms']['max']:.2f}] ms", flush=True)
    return rows


def plot(rows: list[dict], path: Path, card: str) -> str:
    plt = pyplot()
    if plt is None:
        return "(no matplotlib: no plot)"
    fig, ax = plt.subplots(figsize=(max(10, 0.45 * len(rows)), 5.5))
    short = {"int8 x2": "int8 q", "widened keys": "widened"}
    labels = [f"{r['keys']} {r['tokens'] / 1e6:g}M x{r['questions']} "
              f"{short.get(r.get('queries'), r.get('queries', ''))}"
              f"{'' if r.get('scales', 'per chunk') == 'per chunk' else ' /head'}"
              f" {r['index_dtype']}" for r in rows]
    x = range(len(rows))
    w = 0.27
    ax.bar([i - w for i in x], [r["full_ms"]["median"] for r in rows], w, label="bf16 index")
    ax.bar(list(x), [r["gpu_ms"] for r in rows], w, label="8-bit routing, GPU time")
    ax.bar([i + w for i in x], [r["total_ms"]["median"] for r in rows], w,
           label="8-bit total (with re-score)")
    ax.set_yscale("log")
    ax.set_xticks(list(x), labels, fontsize=7, rotation=90)
    ax.set_ylabel("ms per router layer (median)")
    ax.set_title(f"Exact routing from an 8-bit index, {card}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot: {path}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e7,1e8", help="memory tokens per index")
    parser.add_argument("--questions", default="1,8,64")
    parser.add_argument("--tokens", type=int, default=48, help="routing tokens per question")
    parser.add_argument("--kinds", default="iid,topical")
    parser.add_argument("--index-dtypes", default="int8,fp8_e4m3")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3, help="repeats of each timing (spread)")
    parser.add_argument("--configs", default="",
                        help="int8 kernel tiles to sweep, e.g. 128x16x4x3,"
                             "256x16x8x3 (block_c x block_t x warps x stages)")
    parser.add_argument("--integer-only", action="store_true",
                        help="int8: only the int8 x int8 pass (not also the widened keys)")
    parser.add_argument("--per-head", action="store_true",
                        help="int8: also an index with a scale per chunk and KV head")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    msa = MSAParams.from_dict(MSA_4B, num_layers=36)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    questions = [int(n) for n in args.questions.split(",")]
    bandwidth = device_copy_bandwidth(max(sizes) // SHAPE["pooling"] * SHAPE["kv_heads"]
                                      * SHAPE["head_dim"])
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows = []
    for size in sizes:
        for kind in args.kinds.split(","):
            for dtype in args.index_dtypes.split(","):
                rows.extend(bench(size, kind, dtype, questions, args, msa, bandwidth, gen))
                torch.cuda.empty_cache()  # (the last index is freed with the call)
    card = card_name()
    first = next((r for r in rows if r["tokens"] == max(sizes) and r["questions"] == 1
                  and r["index_dtype"] == "int8" and r["keys"] == "iid"), rows[0])
    import triton

    import vllm_msa

    result = {
        "benchmark": "compressed_routing", "card": card, "commit": git_commit(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__,
                     "vllm_msa": vllm_msa.__version__},
        "command": " ".join(sys.argv), "copy_bandwidth_bytes_per_s": bandwidth,
        "shape": SHAPE, "rows": rows, "selections_identical": True,
        "goal_metric": "routing's GPU time over the int8 index (bounded pass to the candidate "
                       "set, plus the exact re-score's kernels) / one read of the whole int8 "
                       "index (values, scales, document bounds) at the device-copy bandwidth, "
                       f"{first['keys']} keys, {first['queries']} queries, one question, "
                       f"{first['tokens']:,} tokens",
        "goal": 1.2, "achieved": first["gpu_vs_floor"],
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"compressed-routing-{card_slug(card)}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}\n{plot(rows, path.with_suffix('.png'), card)}")


if __name__ == "__main__":
    main()
