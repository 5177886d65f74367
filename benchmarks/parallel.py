"""Memory Parallel's routing: one router layer's routing time vs tensor-parallel size and bank
size, the candidate exchange, and the memory each GPU and node holds (MSA-4B shape).

Each rank routes its share of the index (`vllm_msa.attention.index_parallel`: whole documents,
balanced by chunks) with the serving kernels, then the ranks exchange their top-k sort keys
(one all-gather) and take the global top-k. TP sizes up to the GPUs present run for real, one
process per GPU over NCCL (torch.distributed, the exchange vLLM's TP group makes); larger ones
are emulated on GPU 0 (the largest shard's routing plus the top-k of TP x k candidates: no
network) and marked so. TP=1 is serving's own path (no exchange). No vLLM needed.

    python benchmarks/parallel.py                                  # 10M and 25M, TP 1/2/4/8
    python benchmarks/parallel.py --bank-tokens 10M --tp 1,2 --questions 1 --runs 20

Goal (issue: Memory Parallel): routing time at TP=N <= 1.25 x (TP=1 time / N) for banks of
>= 10M tokens; `achieved` is the worst ratio (TP=N time) / (TP=1 time / N) over those rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import card_name, card_slug, event_seconds, pyplot  # noqa: E402
from routing import MSA_4B, SHAPE, make_index, make_questions  # noqa: E402
from vllm_msa.kernels.routing import prepare_index, route_batched_keys, top_candidates  # noqa: E402

from vllm_msa.attention.index_parallel import IndexShard  # noqa: E402
from vllm_msa.attention.routing import RoutingIndex  # noqa: E402
from vllm_msa.config import MSAParams  # noqa: E402

GOAL = 1.25
ROUTING_TOKENS = 48  # per question, as benchmarks/routing.py


def parse_tokens(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1], 1)
    return int(float(text.rstrip("KMG")) * scale)


def spread_ms(fn, runs: int, warmup: int = 5) -> dict[str, float]:
    """Median and 10th/90th percentiles of `runs` calls' GPU times (CUDA events)."""
    times = sorted(t * 1e3 for t in event_seconds(fn, runs, warmup))
    return {"median": statistics.median(times), "p10": times[len(times) // 10],
            "p90": times[(9 * len(times)) // 10], "runs": runs}


def shard_of(index: RoutingIndex, rank: int, size: int) -> RoutingIndex:
    offsets = _offsets(index)
    shard = IndexShard.of(offsets, rank, size)
    keys = index.routing_keys[shard.chunks].clone()
    return RoutingIndex.of_shard(keys, index.chunk_doc_index, index.doc_ids,
                                 torch.from_numpy(offsets), shard)


def memory_bytes(bank_tokens: int, tp: int, shard_chunks: int) -> dict[str, int]:
    """MSA-4B bf16, all 18 router layers: the largest rank's device index and the node's host
    tier (one TP group; K̄/V̄ split by its 8 KV heads)."""
    per_chunk = SHAPE["router_layers"] * SHAPE["kv_heads"] * SHAPE["head_dim"] * 2
    chunks = bank_tokens // SHAPE["pooling"]
    return {"gpu_index_per_gpu": shard_chunks * per_chunk,
            "host_per_node": 2 * chunks * per_chunk}


def measure(index: RoutingIndex, rank: int, tp: int, questions: int, runs: int, exchange,
            msa: MSAParams) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(questions)
    q, cu = make_questions(questions, ROUTING_TOKENS, gen)
    shard = prepare_index(shard_of(index, rank, tp) if tp > 1 else index)
    top_k = [SHAPE["top_k"]] * questions
    route = spread_ms(lambda: route_batched_keys(q, cu, shard, msa, top_k, exchange=exchange),
                      runs)
    candidates = torch.zeros(questions, SHAPE["top_k"], dtype=torch.int64, device="cuda")
    swap = (spread_ms(lambda: top_candidates(exchange(candidates), SHAPE["top_k"]), runs)
            if exchange is not None else None)
    return {"routing_ms": route, "exchange_ms": swap, "shard_chunks": shard.keys.shape[0]}


def nccl_worker(rank: int, tp: int, store: str, args, queue) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=tp)

    def exchange(keys: torch.Tensor) -> torch.Tensor:
        out = keys.new_empty(tp, *keys.shape)
        dist.all_gather_into_tensor(out, keys.contiguous())
        return out.permute(1, 0, 2).reshape(keys.shape[0], -1)

    msa = MSAParams.from_dict(MSA_4B, num_layers=36)
    rows = []
    for tokens in args.sizes:
        index = make_index(tokens, torch.Generator(device="cuda").manual_seed(tokens))
        for questions in args.questions:
            rows.append({"bank_tokens": tokens, "questions": questions,
                         **measure(index, rank, tp, questions, args.runs, exchange, msa)})
        del index
        torch.cuda.empty_cache()
    queue.put((rank, rows))
    dist.destroy_process_group()


def run_nccl(tp: int, args) -> list[dict]:
    """One process per GPU; the slowest rank's time is the layer's (ranks wait in the
    all-gather for the last)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store = tempfile.mktemp(prefix="msa-parallel-")
    procs = [ctx.Process(target=nccl_worker, args=(r, tp, store, args, queue)) for r in range(tp)]
    for p in procs:
        p.start()
    results = dict(queue.get() for _ in procs)
    for p in procs:
        p.join()
    rows = []
    for i in range(len(results[0])):
        every = [results[r][i] for r in range(tp)]
        slowest = max(every, key=lambda r: r["routing_ms"]["median"])
        rows.append({**slowest, "shard_chunks": max(r["shard_chunks"] for r in every)})
    return rows


def run_emulated(tp: int, args) -> list[dict]:
    """On GPU 0: the largest shard's routing, exchanging by repeating its own candidates
    (the same [R, tp * k] top-k as after a real all-gather, without the network)."""
    msa = MSAParams.from_dict(MSA_4B, num_layers=36)
    rows = []

    def exchange(keys):
        return keys.repeat(1, tp) if tp > 1 else keys

    for tokens in args.sizes:
        index = make_index(tokens, torch.Generator(device="cuda").manual_seed(tokens))
        chunks = [IndexShard.of(_offsets(index), r, tp).num_chunks for r in range(tp)]
        rank = max(range(tp), key=chunks.__getitem__)
        for questions in args.questions:
            rows.append({"bank_tokens": tokens, "questions": questions,
                         **measure(index, rank, tp, questions, args.runs,
                                   exchange if tp > 1 else None, msa)})
        del index
        torch.cuda.empty_cache()
    return rows


def _offsets(index: RoutingIndex):
    counts = torch.bincount(index.chunk_doc_index.cpu(), minlength=index.num_documents)
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bank-tokens", default="10M,25M")
    parser.add_argument("--tp", default="1,2,4,8", help="tensor-parallel sizes")
    parser.add_argument("--questions", default="1,64", help="concurrent questions per step")
    parser.add_argument("--runs", type=int, default=30, help="timed calls per row")
    parser.add_argument("--json", help="result path (default benchmarks/results/...)")
    args = parser.parse_args()
    args.sizes = [parse_tokens(t) for t in args.bank_tokens.split(",")]
    args.questions = [int(x) for x in args.questions.split(",")]
    sizes = [int(x) for x in args.tp.split(",")]
    gpus = torch.cuda.device_count()
    card = card_name()
    rows = []
    for tp in sizes:
        mode = "nccl" if 1 < tp <= gpus else ("one GPU" if tp == 1 else "emulated on one GPU")
        measured = run_nccl(tp, args) if mode == "nccl" else run_emulated(tp, args)
        for row in measured:
            rows.append({"tensor_parallel_size": tp, "mode": mode, **row,
                         **memory_bytes(row["bank_tokens"], tp, row["shard_chunks"])})
    base = {(r["bank_tokens"], r["questions"]): r["routing_ms"]["median"]
            for r in rows if r["tensor_parallel_size"] == 1}
    for r in rows:
        one = base.get((r["bank_tokens"], r["questions"]))
        r["vs_ideal"] = (r["routing_ms"]["median"] / (one / r["tensor_parallel_size"])
                         if one else None)
    graded = [r["vs_ideal"] for r in rows if r["tensor_parallel_size"] > 1
              and r["bank_tokens"] >= 10**7 and r["vs_ideal"] is not None]
    print(f"{'bank':>6} {'TP':>3} {'mode':>20} {'Q':>3} {'route ms (p10-p90)':>22} "
          f"{'exchange ms':>12} {'vs TP1/N':>8} {'index/GPU':>10} {'host/node':>10}")
    for r in rows:
        rt, ex = r["routing_ms"], r["exchange_ms"]
        print(f"{r['bank_tokens'] / 1e6:>5.0f}M {r['tensor_parallel_size']:>3} {r['mode']:>20} "
              f"{r['questions']:>3} {rt['median']:>8.3f} ({rt['p10']:.3f}-{rt['p90']:.3f}) "
              f"{(ex['median'] if ex else 0):>12.4f} {r['vs_ideal'] or 1:>8.2f} "
              f"{r['gpu_index_per_gpu'] / 2**30:>8.2f}G {r['host_per_node'] / 2**30:>8.1f}G")
    out = {
        "benchmark": "parallel", "card": card, "gpus": gpus,
        "tensor_parallel_size": sizes, "bank_tokens": args.sizes,
        "questions": args.questions, "routing_tokens_per_question": ROUTING_TOKENS,
        "shape": "msa-4b", "rows": rows,
        "goal_metric": "routing time at TP=N / (TP=1 time / N), worst over banks >= 10M "
                       "tokens (emulated rows: one GPU, no network)",
        "goal": GOAL, "achieved": max(graded) if graded else None,
        "versions": {"torch": torch.__version__},
        "command": "python " + " ".join(sys.argv),
    }
    slug = card_slug(card)
    path = Path(args.json) if args.json else ROOT / "benchmarks" / "results" / (
        f"parallel-msa-4b-{slug}.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    plot(rows, path.with_suffix(".png"), card)
    print(f"\ngoal: {out['goal_metric']} <= {GOAL}; achieved {out['achieved']}\nwrote {path}")


def plot(rows: list[dict], path: Path, card: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for tokens in sorted({r["bank_tokens"] for r in rows}):
        for q in sorted({r["questions"] for r in rows}):
            pts = sorted((r["tensor_parallel_size"], r["routing_ms"]["median"]) for r in rows
                         if r["bank_tokens"] == tokens and r["questions"] == q)
            if not pts:
                continue
            line, = ax.plot(*zip(*pts, strict=True), marker="o",
                            label=f"{tokens / 1e6:.0f}M tokens, {q} question(s)")
            ax.plot([p[0] for p in pts], [pts[0][1] / p[0] for p in pts], ls=":",
                    color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tensor-parallel size")
    ax.set_ylabel("routing, one router layer (ms, median)")
    ax.set_title(f"Memory Parallel routing on {card} (dotted: TP=1 / N)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
    main()
