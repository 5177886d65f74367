"""Time to first token and decode speed with memory, over synthetic banks of several sizes,
against plain vLLM on the same prompts and engine settings, in one run.

Banks come from `vllm-msa bank synth` (the real format, random contents: speed does not depend
on what the documents say). Each engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0),
so a batch's B requests are all queued before its first step: with a separate engine process
they trickle in over ZMQ and the first step may prefill (and route) only some of them, which
made batch-8 TTFTs here twice what benchmarks/ttft.py measured. Per engine and batch size B:
TTFT = the wall time of B requests generating one token (prefill, routing, staging), the median
of `--ttft-runs` (the best of three up to 2026-12-01); decode tokens/s = B * (N - 1) / (last
token - first token), from the engine core's own per-request timestamps (vLLM's request
metrics, what its TPOT is made of), the median of `--decode-runs` runs of N tokens (the best
up to 2026-12-01; every run and the range are recorded): no prefill and no frontend in it
(results up to commit 7a010bf took the difference of two wall times instead, which the TTFT's
noise could swamp). Each engine gets a fresh child process, so one engine's GPU memory is gone
before the next starts. The HBM floor
of routing is one read of every router layer's routing keys at the device-copy bandwidth
measured here before the engines start; "TTFT overhead / floor" charges all of MSA's extra
prefill time (routing, staging, memory attention) to routing, so it bounds routing's share
from above (benchmarks/ttft.py measures routing's own share).

    python benchmarks/serve.py --shape msa-4b --bank-tokens 1M,10M --batches 1,8,64
    python benchmarks/serve.py --shape tiny --bank-tokens 20k --batches 1,4 --decode-tokens 8

A 4B engine starts in about a minute (compile + CUDA graphs), so on a machine with a per-call
time limit run the engines one call at a time with `--engines plain`, `--engines 1M`, ...:
each run adds its engines to `--partial` (in the work directory) and writes the table and
result of everything measured so far.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import time
from pathlib import Path

from bank_build import common_arguments, prepare, synthetic_bank, write_result
from report import (
    card_name,
    device_copy_bandwidth,
    device_seconds_by_name,
    host_seconds_by_function,
    pyplot,
)
from serving import questions

from vllm_msa.cli import parse_count


def measure_in_child(*args) -> list[dict]:
    """`measure` in a fresh process: an in-process engine frees its GPU memory only on exit."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(measure, args)


def memory_steps(worker) -> dict[str, int]:
    """Inside the worker: its steps with memory requests so far, by how they ran (a replayed
    full CUDA graph, or the op's Python)."""
    from vllm_msa.attention.runtime import current_runtime

    runtime = current_runtime()
    return dict(runtime.memory_steps) if runtime is not None else {}


def per_decode_step(seconds_by_name, decode: int) -> dict[str, float]:
    """Seconds per decode step of each name from `seconds_by_name(tokens)` (one profiled run
    of `tokens` tokens per request): a run of `decode` tokens less a run of one (its
    prefill), over its `decode - 1` steps."""
    prefill = seconds_by_name(1)
    full = seconds_by_name(decode)
    return {name: (seconds - prefill.get(name, 0.0)) / (decode - 1)
            for name, seconds in full.items()}


def largest_us(per_step: dict[str, float], top: int) -> dict[str, float]:
    """The `top` largest positive entries, in microseconds, largest first."""
    return dict(sorted(((n, t * 1e6) for n, t in per_step.items() if t > 0),
                       key=lambda kv: -kv[1])[:top])


def decode_profile(run, batch: int, decode: int, rate: float) -> dict:
    """Where a decode step's time goes at this batch size: device time per step (each kernel
    name's, and all of it) from profiled runs (`per_decode_step`), against the wall time per
    step of the unprofiled timed runs (`rate`, their decode tokens/s; the profiler's own host
    overhead would inflate a profiled run's). Device time close to the wall time: the GPU
    binds; well below it: the host does (or waits)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    # Device activity only: kernel durations are all this reads.
    activities = [ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU]

    def profiled(tokens: int) -> dict[str, float]:
        with profile(activities=activities) as prof:
            run(batch, tokens)
        return device_seconds_by_name(prof)

    per_step = per_decode_step(profiled, decode)
    return {"wall_ms_per_step": batch * 1e3 / rate if rate else None,
            "device_ms_per_step": sum(per_step.values()) * 1e3,
            "kernels_us_per_step": largest_us(per_step, 12)}


def host_profile(run, batch: int, decode: int, top: int = 15) -> dict:
    """Where a decode step's host time goes at this batch size: Python time per step (cProfile,
    each function's own time) from profiled runs (`per_decode_step`). The engine core runs in
    this process (see the module docstring), so this is the whole host loop: scheduler, model
    runner, the plugin's hooks, output processing. A decode step whose device time
    (`--profile-decode`) is well below its wall time is host-bound when this total is close to
    the wall time. cProfile slows Python down (roughly 1.5-2x), so compare engines, not
    absolute times."""
    per_step = per_decode_step(
        lambda tokens: host_seconds_by_function(lambda: run(batch, tokens))[1], decode)
    plugin = {name: t for name, t in per_step.items() if name.startswith("vllm_msa/")}
    return {"host_ms_per_step": sum(per_step.values()) * 1e3,
            "plugin_ms_per_step": sum(plugin.values()) * 1e3,
            "functions_us_per_step": largest_us(per_step, top),
            "plugin_functions_us_per_step": largest_us(plugin, top)}


def cache_stats(worker) -> dict | None:
    """Inside the worker: the disk tier's hit rate and read rate so far (None: in RAM)."""
    from vllm_msa.attention.runtime import current_runtime

    runtime = current_runtime()
    cache = runtime.banks["b"].host_cache if runtime is not None and runtime.banks else None
    return cache.stats() if cache is not None else None


def measure(ckpt, engine: dict, bank_path: str | None, batches: list[int], decode: int,
            prompts_text: list[str], staging_mib: int, eager: bool,
            profile_decode: bool = False, profile_host: bool = False,
            decode_runs: int = 5, ttft_runs: int = 5,
            host_cache_gib: float | None = None, index_dtype: str = "auto") -> list[dict]:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # before vLLM is imported (see above)
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc(memory_steps)
    from vllm import LLM, SamplingParams

    from vllm_msa.prompt import build_prompt

    extra = {}
    if bank_path:
        extra["additional_config"] = {"msa": {"banks": {"b": bank_path},
                                              "staging_mib": staging_mib}}
        if host_cache_gib:
            extra["additional_config"]["msa"]["host_cache_gib"] = host_cache_gib
        extra["additional_config"]["msa"]["index_dtype"] = index_dtype
    llm = LLM(model=str(ckpt), enforce_eager=eager, max_num_seqs=max(batches),
              disable_log_stats=False, **engine, **extra)  # stats: per-request timestamps
    tokenizer = llm.get_tokenizer()
    prompts = [build_prompt(tokenizer, q) for q in prompts_text]
    xargs = {"msa_bank": "b"} if bank_path else None

    def steps() -> dict[str, int]:
        return llm.collective_rpc(memory_steps)[0] if bank_path else {}

    def run(n: int, max_tokens: int) -> tuple[float, float, dict]:
        """(wall seconds, decode tokens/s from the engine core's timestamps, what else tells
        a slow decode apart: the spread of the first tokens, which is a prefill split over
        steps, and the steps with memory by how they ran)."""
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                extra_args=xargs)
        before = steps()
        t = time.perf_counter()
        outputs = llm.generate(prompts[:n], params, use_tqdm=False)
        wall = time.perf_counter() - t
        after = steps()
        stats = [o.metrics for o in outputs]
        first = [s.first_token_ts for s in stats]
        span = max(s.last_token_ts for s in stats) - min(first)
        tokens = sum(s.num_generation_tokens - 1 for s in stats)
        detail = {"first_token_spread_s": max(first) - min(first),
                  "memory_steps": {k: v - before.get(k, 0) for k, v in after.items()
                                   if v != before.get(k, 0)}}
        return wall, tokens / span if span > 0 else 0.0, detail

    rows = []
    try:
        run(max(batches), 4)  # warm-up: JIT, allocator, graphs
        for b in batches:
            run(b, 4)  # this batch size's kernels compiled and tuned before timing
            ttfts = sorted(run(b, 1)[0] for _ in range(ttft_runs))
            ttft = statistics.median(ttfts)
            timed = [run(b, decode) for _ in range(decode_runs)]
            rates = sorted(rate for _, rate, _ in timed)
            cache = llm.collective_rpc(cache_stats)[0] if bank_path else None
            rows.append({"batch": b, "ttft_s": ttft, "ttft_runs_s": ttfts,
                         "host_cache": cache,
                         "total_s": statistics.median(w for w, _, _ in timed),
                         "decode_tokens_per_s": statistics.median(rates),
                         "decode_tokens_per_s_range": [rates[0], rates[-1]],
                         "decode_runs": [{"tokens_per_s": rate, **detail}
                                         for _, rate, detail in timed]})
            runs = "; ".join(
                f"{rate:,.0f} tok/s, first tokens within {d['first_token_spread_s'] * 1e3:.1f}"
                f" ms{', steps ' + str(d['memory_steps']) if d['memory_steps'] else ''}"
                for _, rate, d in timed)
            print(f"  [{'MSA' if bank_path else 'plain'}] batch {b}: TTFT median "
                  f"{ttft * 1e3:.1f} ms ({ttfts[0] * 1e3:.1f}-{ttfts[-1] * 1e3:.1f}), decode "
                  f"median {rows[-1]['decode_tokens_per_s']:,.0f} tok/s ({runs})", flush=True)
            if profile_decode and b == max(batches):
                prof = rows[-1]["decode_profile"] = decode_profile(
                    run, b, decode, rows[-1]["decode_tokens_per_s"])
                wall = prof["wall_ms_per_step"]
                print(f"    decode step: {wall or 0:.2f} ms wall, "
                      f"{prof['device_ms_per_step']:.2f} ms device; us per step: "
                      + ", ".join(f"{n[:40]} {t:.0f}"
                                  for n, t in prof["kernels_us_per_step"].items()),
                      flush=True)
            if profile_host and b == max(batches):
                prof = rows[-1]["host_profile"] = host_profile(run, b, decode)
                print(f"    decode step host (cProfile): {prof['host_ms_per_step']:.2f} ms "
                      f"Python, {prof['plugin_ms_per_step']:.2f} ms of it in vllm_msa; us "
                      "per step: " + ", ".join(f"{n} {t:.0f}" for n, t in
                                               prof["functions_us_per_step"].items())
                      + "; vllm_msa's: " + ", ".join(
                          f"{n} {t:.0f}" for n, t in prof["plugin_functions_us_per_step"].items()),
                      flush=True)
    finally:
        llm.llm_engine.engine_core.shutdown()
    return rows


def plot(result: dict, path: Path) -> str:
    """Decode tokens/s and TTFT per batch size, plain vLLM next to each bank."""
    plt = pyplot()
    if plt is None:
        return "matplotlib is not installed: no plot"
    engines = list(dict.fromkeys(r["engine"] for r in result["rows"]))
    batches = sorted({r["batch"] for r in result["rows"]})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(engines)
    for j, engine in enumerate(engines):
        rows = {r["batch"]: r for r in result["rows"] if r["engine"] == engine}
        xs = [i + j * width for i in range(len(batches))]
        # An engine run at only some batch sizes (`--batches`) gets no bar at the others.
        axes[0].bar(xs, [rows[b]["decode_tokens_per_s"] if b in rows else 0 for b in batches],
                    width, label=engine)
        axes[1].bar(xs, [rows[b]["ttft_s"] * 1e3 if b in rows else 0 for b in batches], width,
                    label=engine)
    for ax, label in zip(axes, ("decode tokens/s", "time to first token, ms"), strict=True):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(batches))])
        ax.set_xticklabels([f"batch {b}" for b in batches])
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"MSA-4B shape serving vs plain vLLM, {result['card']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot: {path}"


def main() -> None:
    parser = common_arguments(__doc__.splitlines()[0])
    parser.set_defaults(doc_tokens=512)
    parser.add_argument("--bank-tokens", default="1M,10M",
                        help="comma-separated bank sizes in tokens (suffixes k, M, G)")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--decode-runs", type=int, default=5,
                        help="timed decode runs per batch size; the median counts and the "
                        "range is recorded (at batch 64 a decode step is as host-bound as it "
                        "is device-bound, so a slow spell of the host shows in single runs)")
    parser.add_argument("--ttft-runs", type=int, default=5,
                        help="timed one-token runs per batch size (the median counts)")
    parser.add_argument("--question-words", type=int, default=12)
    parser.add_argument("--staging-mib", type=int, default=2048)
    parser.add_argument("--eager", action="store_true", help="enforce_eager for every engine")
    parser.add_argument("--engines", help="run only these: 'plain' and/or bank sizes "
                        "(default: plain and every --bank-tokens size)")
    parser.add_argument("--profile-decode", action="store_true",
                        help="at the largest batch, profile a decode run: device time per "
                        "step and per kernel against the wall time per step")
    parser.add_argument("--profile-host", action="store_true",
                        help="at the largest batch, cProfile a decode run: host Python time "
                        "per step, the plugin's share and the top functions")
    parser.add_argument("--host-cache-gib", type=float,
                        help="serve the banks from disk through a host cache of this size "
                        '(additional_config["msa"]["host_cache_gib"]): hit rate and read '
                        "rate are recorded per batch size")
    parser.add_argument("--partial", help="engine results kept across runs (default: "
                        "<work>/serve-<shape>-partial.json)")
    args = parser.parse_args()
    work, ckpt, engine = prepare(args)

    batches = [int(b) for b in args.batches.split(",")]
    sizes = [parse_count(s) for s in args.bank_tokens.split(",")]
    wanted = ({"plain", *sizes} if not args.engines else
              {e if e == "plain" else parse_count(e) for e in args.engines.split(",")})
    texts = questions(max(batches), args.question_words)
    partial_path = Path(args.partial or work / f"serve-{args.shape}-partial.json")
    partial = json.loads(partial_path.read_text()) if partial_path.exists() else {}
    # Only the banks this call serves are written: a bank near the machine's capacity fills
    # its disk (delete the others' directories first); earlier calls' banks are described
    # by what they recorded.
    described = {int(size): info for size, info in partial.get("banks", {}).items()}
    banks = {}
    for size in sizes:
        if size not in wanted:
            continue
        t = time.perf_counter()
        bank = synthetic_bank(args, ckpt, size, engine.get("dtype"), work)
        banks[size] = str(bank.path)
        described[size] = {"tokens": bank.num_tokens, "documents": bank.num_documents,
                           "bytes": bank.tier_bytes(), "tiers": bank.dtypes.to_json(),
                           "virtual": args.virtual}
        print(f"synthetic bank of {size:,} tokens ready in {time.perf_counter() - t:.0f} s")
    index_bytes = {size: info["bytes"]["gpu_index"] for size, info in described.items()}
    # A layer's index size, but never a small buffer (the copy rate sags below ~256 MiB):
    # the first call of a series may run before any bank exists.
    bandwidth = partial.get("bandwidth") or device_copy_bandwidth(
        max(max(index_bytes.values(), default=0) // 18, 1 << 28))
    runs = partial.get("runs", {})

    if "plain" in wanted:
        runs["plain vLLM"] = measure_in_child(ckpt, engine, None, batches, args.decode_tokens,
                                              texts, args.staging_mib, args.eager,
                                              args.profile_decode, args.profile_host,
                                              args.decode_runs, args.ttft_runs)
    for size, path in banks.items():
        runs[f"MSA, {size:,}-token bank"] = measure_in_child(
            ckpt, engine, path, batches, args.decode_tokens, texts, args.staging_mib,
            args.eager, args.profile_decode, args.profile_host, args.decode_runs,
            args.ttft_runs, args.host_cache_gib, args.index_dtype)
    partial_path.write_text(json.dumps({"bandwidth": bandwidth, "runs": runs,
                                        "banks": {str(s): d for s, d in described.items()}},
                                       indent=1))
    if "plain vLLM" not in runs:
        print(f"no plain-vLLM run yet (run --engines plain); kept results in {partial_path}")
        return

    card = card_name()
    plain = {r["batch"]: r for r in runs["plain vLLM"]}
    print(f"\n{card}, {args.shape} shape, {args.decode_tokens} tokens per request; device "
          f"copy {bandwidth / 1e12 if bandwidth else 0:.2f} TB/s\n")
    print(f"{'engine':<28} {'batch':>5} {'TTFT ms':>9} {'decode tok/s':>13} "
          f"{'(range of runs)':>17} {'vs plain':>9} {'TTFT overhead / floor':>22}")
    print("(medians of the runs: TTFT of --ttft-runs, decode of --decode-runs)")
    rows = []
    for name, results in runs.items():
        size = next((s for s in sizes if name == f"MSA, {s:,}-token bank"), None)
        if name != "plain vLLM" and size is None:
            continue  # measured in an earlier run with other --bank-tokens
        floor = index_bytes[size] / bandwidth if size and bandwidth else None
        for r in results:
            base = plain[r["batch"]]
            r = {**r, "engine": name, "bank_tokens": size,
                 "decode_vs_plain": r["decode_tokens_per_s"] / base["decode_tokens_per_s"],
                 "routing_floor_s": floor,
                 "ttft_overhead_vs_floor": (r["ttft_s"] - base["ttft_s"]) / floor
                 if floor else None}
            rows.append(r)
            ratio = f"{r['ttft_overhead_vs_floor']:.1f}x" if floor else "-"
            low, high = r.get("decode_tokens_per_s_range") or [r["decode_tokens_per_s"]] * 2
            print(f"{name:<28} {r['batch']:>5} {r['ttft_s'] * 1e3:>9.1f} "
                  f"{r['decode_tokens_per_s']:>13,.0f} {f'{low:,.0f}-{high:,.0f}':>17} "
                  f"{r['decode_vs_plain']:>8.2f}x {ratio:>22}")
    measured = [s for s in sizes if f"MSA, {s:,}-token bank" in runs]
    largest = f"MSA, {max(measured, default=0):,}-token bank"
    headline = [r for r in rows if r["engine"] == largest and r["batch"] == max(batches)]
    result = {
        "benchmark": "serve",
        "card": card,
        "shape": args.shape,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "banks": {str(s): described[s] for s in measured},
        "bank_tokens": max(measured, default=None),
        "bank_dtype": args.bank_dtype,
        "host_cache_gib": args.host_cache_gib,
        "index_dtype": args.index_dtype,
        "decode_tokens": args.decode_tokens,
        "rows": rows,
        "goal_metric": f"median decode tokens/s with memory / plain vLLM, batch {max(batches)}, "
                       f"largest bank ({max(measured, default=0):,} tokens)",
        "goal": 0.9,
        "achieved": headline[0]["decode_vs_plain"] if headline else None,
    }
    path = write_result(result, args)
    print(plot(result, path.with_suffix(".png")))


if __name__ == "__main__":
    main()
