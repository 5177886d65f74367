"""Memory attention of one router layer, MSA-4B shape: the Triton memory kernel vs vLLM's
flash-attention + `merge_attn_states`, against plain local attention and the HBM floor.

Per case (decode batch 1/8/64, prefill), with a paged local context and 16 documents x ~8
chunks of staged memory per request, all bf16:

* plain      — flash-attention over the paged cache, no LSE: what plain vLLM computes here;
* fused      — what serving runs: flash-attention with LSE, then `memory_attention` (memory
               over pool slots read in place + LSE merge, written into the output rows);
* fa-memory  — the alternative: flash-attention with LSE, gather the pool slots into one
               contiguous K/V, flash-attention (non-causal, varlen) over it with LSE, then
               vLLM's `merge_attn_states`;
* kernel / fa-only — the memory parts alone (Triton memory_attention without merge vs
               gather + flash-attention), the choice the issue asks to measure;
* torch      — the portable per-request loop (`vllm_msa.attention.attend`), small batches;
* floor      — bytes every variant must read (local K/V + memory K/V) at the HBM copy
               bandwidth measured in the same run.

Needs a GPU with vLLM (flash-attention); on the lent H100: `bash benchmarks/gpu.sh attention`.
Prints a table, writes benchmarks/results/memory_attention-<card>.json and a plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from host_timing import host_microseconds
from report import card_name, card_slug, device_copy_bandwidth, pyplot

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Qwen3-4B / MSA-4B attention
BLOCK = 16


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=2048, help="local tokens per request")
    p.add_argument("--memory-slots", type=int, default=128, help="16 docs x ~8 chunks")
    p.add_argument("--decode", default="1,8,64", help="decode batch sizes")
    p.add_argument("--prefill", default="1x512,8x256", help="requests x query tokens")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--json", help="default benchmarks/results/memory_attention-<card>.json")
    return p.parse_args()


def fa_version() -> int:
    """The flash-attention version vLLM's backend uses on this card (3 on Hopper)."""
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

    return get_flash_attn_version()


def timed(fn, reps: int) -> float:
    """Median CUDA-event milliseconds of fn() from an idle GPU."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class Case:
    """One layer's batch: requests with `queries` new tokens after `context` cached ones."""

    def __init__(self, requests: int, queries: int, context: int, slots: int) -> None:
        g = torch.Generator(device="cuda").manual_seed(requests * 1000 + queries)
        dev, bf16 = "cuda", torch.bfloat16
        self.requests, self.queries = requests, queries
        seq = context + queries
        blocks_per = -(-seq // BLOCK)
        num_blocks = requests * blocks_per + 8
        self.kv_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, 2 * HEAD_DIM, device=dev,
                                    dtype=bf16, generator=g)
        # K|V side by side per token, split the way vLLM's flash-attention backend does.
        self.key_cache, self.value_cache = self.kv_cache.split(HEAD_DIM, dim=-1)
        perm = torch.randperm(num_blocks, device=dev, generator=g)[: requests * blocks_per]
        self.block_table = perm.view(requests, blocks_per).to(torch.int32)
        self.seq_lens = torch.full((requests,), seq, dtype=torch.int32, device=dev)
        self.cu_q_list = [i * queries for i in range(requests + 1)]
        self.cu_q = torch.tensor(self.cu_q_list, dtype=torch.int32, device=dev)
        self.max_seq = seq
        total = requests * queries
        self.query = torch.randn(total, HEADS, HEAD_DIM, device=dev, dtype=bf16, generator=g)
        pool = requests * slots * 2
        self.pool_k = torch.randn(pool, KV_HEADS, HEAD_DIM, device=dev, dtype=bf16, generator=g)
        self.pool_v = torch.randn_like(self.pool_k)
        self.slots = torch.randperm(pool, device=dev, generator=g)[: requests * slots]
        self.cu_s_list = [i * slots for i in range(requests + 1)]
        self.cu_s = torch.tensor(self.cu_s_list, dtype=torch.int32, device=dev)
        self.output = torch.empty(total, HEADS, HEAD_DIM, device=dev, dtype=bf16)
        self.rows = torch.arange(total, device=dev)
        self.scale = HEAD_DIM**-0.5
        self.bytes = 2 * (requests * seq + requests * slots) * KV_HEADS * HEAD_DIM * 2

    # -- variants
    def local(self, lse: bool):
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(
            q=self.query, k=self.key_cache, v=self.value_cache, max_seqlen_q=self.queries,
            cu_seqlens_q=self.cu_q, max_seqlen_k=self.max_seq, seqused_k=self.seq_lens,
            softmax_scale=self.scale, causal=True, block_table=self.block_table,
            return_softmax_lse=lse, fa_version=fa_version())

    def batch(self):
        from vllm_msa.kernels.memory_attention import MemoryBatch

        return MemoryBatch.build(self.cu_q_list, self.cu_s_list, self.slots)

    def fused(self, batch) -> None:
        from vllm_msa.kernels.memory_attention import memory_attention

        local = self.local(True)
        memory_attention(self.query, self.pool_k, self.pool_v, batch, self.scale, local=local,
                         out=self.output, out_rows=self.rows)

    def kernel_only(self, batch) -> None:
        from vllm_msa.kernels.memory_attention import memory_attention

        lse = torch.empty(HEADS, self.query.shape[0], device="cuda")
        memory_attention(self.query, self.pool_k, self.pool_v, batch, self.scale,
                         out=self.output, out_lse=lse)

    def fa_only(self):
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        k = self.pool_k.index_select(0, self.slots)
        v = self.pool_v.index_select(0, self.slots)
        return flash_attn_varlen_func(
            q=self.query, k=k, v=v, max_seqlen_q=self.queries, cu_seqlens_q=self.cu_q,
            max_seqlen_k=self.cu_s_list[1], cu_seqlens_k=self.cu_s, softmax_scale=self.scale,
            causal=False, return_softmax_lse=True, fa_version=fa_version())

    def fa_memory(self) -> None:
        from vllm.v1.attention.ops.merge_attn_states import merge_attn_states

        local_out, local_lse = self.local(True)
        mem_out, mem_lse = self.fa_only()
        merge_attn_states(self.output, local_out, local_lse, mem_out, mem_lse)

    def torch_loop(self) -> None:
        from vllm.v1.attention.ops.merge_attn_states import merge_attn_states

        from vllm_msa.attention.attend import attention_with_lse, gather_paged

        for r in range(self.requests):
            q = self.query[self.cu_q_list[r]:self.cu_q_list[r + 1]]
            keys = gather_paged(self.key_cache, self.block_table[r], self.max_seq)
            values = gather_paged(self.value_cache, self.block_table[r], self.max_seq)
            local, local_lse = attention_with_lse(q, keys, values, self.scale,
                                                  causal_offset=self.max_seq - self.queries)
            mine = self.slots[self.cu_s_list[r]:self.cu_s_list[r + 1]]
            mem, mem_lse = attention_with_lse(q, self.pool_k[mine], self.pool_v[mine],
                                              self.scale, None)
            merged = torch.empty_like(local)
            merge_attn_states(merged, local, local_lse, mem, mem_lse)
            self.output[self.cu_q_list[r]:self.cu_q_list[r + 1]] = merged.to(self.output.dtype)


def run_case(case: Case, reps: int, bw: float) -> dict:
    batch = case.batch()
    row = {"requests": case.requests, "queries": case.queries, "bytes": case.bytes,
           "floor_ms": case.bytes / bw / 1e6}
    row["plain_ms"] = timed(lambda: case.local(False), reps)
    row["fused_ms"] = timed(lambda: case.fused(batch), reps)
    fused_out = case.output.clone()
    row["fa_memory_ms"] = timed(case.fa_memory, reps)
    row["max_diff_fused_vs_fa"] = (fused_out.float() - case.output.float()).abs().max().item()
    row["kernel_only_ms"] = timed(lambda: case.kernel_only(batch), reps)
    row["fa_only_ms"] = timed(case.fa_only, reps)
    if case.requests * case.queries <= 512:
        row["torch_ms"] = timed(case.torch_loop, max(5, reps // 10))
    row["host_fused_us"] = host_microseconds(lambda: case.fused(batch), calls=200, warmup=1)
    row["host_fa_memory_us"] = host_microseconds(case.fa_memory, calls=200, warmup=1)
    return row


def plot(result: dict, path: Path) -> str:
    plt = pyplot()
    if plt is None:
        return "matplotlib is not installed: no plot"
    rows = result["rows"]
    names = [("floor_ms", "HBM floor"), ("plain_ms", "plain FA (no memory)"),
             ("fused_ms", "fused (FA+LSE, Triton memory+merge)"),
             ("fa_memory_ms", "FA+LSE, gather+FA memory, merge_attn_states")]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    for j, (key, label) in enumerate(names):
        ax.bar([i + j * width for i in range(len(rows))], [r[key] * 1e3 for r in rows], width,
               label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([f"{r['requests']} req x {r['queries']} q" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("µs per router layer")
    ax.set_title(f"MSA-4B memory attention, one layer, {result['card']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot: {path}"


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("memory_attention.py needs a GPU (flash-attention and Triton)")
    import triton
    import vllm

    card = card_name()
    bw = device_copy_bandwidth(2**30, 20) / 1e9  # GB/s
    cases = [(int(b), 1) for b in args.decode.split(",")]
    cases += [tuple(int(x) for x in p.split("x")) for p in args.prefill.split(",") if p]
    rows = []
    print(f"{card}; HBM copy {bw:.0f} GB/s; context {args.context}, memory "
          f"{args.memory_slots} slots/request; times in µs per router layer")
    header = (f"{'req':>4} {'q':>4} {'floor':>7} {'plain':>7} {'fused':>7} {'fa-mem':>7} "
              f"{'kernel':>7} {'fa-only':>7} {'torch':>8} {'host fused':>10}")
    print(header)
    for requests, queries in cases:
        row = run_case(Case(requests, queries, args.context, args.memory_slots), args.reps, bw)
        rows.append(row)
        torch_us = f"{row['torch_ms'] * 1e3:8.0f}" if "torch_ms" in row else f"{'-':>8}"
        print(f"{requests:>4} {queries:>4} {row['floor_ms'] * 1e3:7.1f} "
              f"{row['plain_ms'] * 1e3:7.1f} {row['fused_ms'] * 1e3:7.1f} "
              f"{row['fa_memory_ms'] * 1e3:7.1f} {row['kernel_only_ms'] * 1e3:7.1f} "
              f"{row['fa_only_ms'] * 1e3:7.1f} {torch_us} {row['host_fused_us']:10.0f}")
    head = next(r for r in rows if r["requests"] == max(int(b) for b in args.decode.split(","))
                and r["queries"] == 1)
    result = {
        "benchmark": "memory_attention", "card": card,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                     "triton": triton.__version__, "vllm": vllm.__version__,
                     "flash_attn": fa_version()},
        "command": "python3 " + " ".join(sys.argv),
        "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                  "dtype": "bfloat16", "block_size": BLOCK, "context": args.context,
                  "memory_slots": args.memory_slots},
        "hbm_copy_gbps": bw,
        "rows": rows,
        "goal_metric": (f"decode batch {head['requests']}: fused time / flash-attention "
                        "alternative time for local+memory+merge (lower is better; "
                        "< 1 means the Triton kernel is the right choice)"),
        "goal": 1.0,
        "achieved": head["fused_ms"] / head["fa_memory_ms"],
    }
    out = Path(args.json or Path(__file__).parent / "results"
               / f"memory_attention-{card_slug(card)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(plot(result, out.with_suffix(".png")))
    print(f"achieved {result['achieved']:.2f} ({result['goal_metric']}); wrote {out}")


if __name__ == "__main__":
    main()
