"""Routing's share of the time to first token: GPU time of each router-layer phase of a
prefill step with memory (routing; host->device fetch; memory attention with its local pass)
against routing's physical floors, all measured in the same run.

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so torch.profiler sees its
kernels; the runtime marks its phases (VLLM_MSA_PROFILE_RANGES=1) and every kernel counts
towards the phase whose range launched it (on whichever stream it ran). Floors of one step's
routing, all router layers together:
  HBM      one read of every layer's routing keys at the device-copy bandwidth measured here;
  compute  2·T·H'·C·D multiply-adds (T routing tokens of the batch, C chunks, D head_dim; H'
           the KV heads when heads are mean-reduced, since a group's queries are summed before
           the dot product, else all query heads) at the bf16 matmul rate measured here.
Batch 1 is memory-bound (the issue's goal: routing <= 1.2x the HBM floor); large batches are
compute-bound, so the table shows both floors. "overlap": the same TTFT with the fetch on its
own stream, overlapping the layer's local pass (VLLM_MSA_FETCH_STREAM=1; off by default).
Two more tables say where the rest goes: the host time spent inside each phase (perf_counter
around the same ranges, in the timed runs, which run without the profiler) and, for the
first batch size, routing's GPU time per kernel.

    python benchmarks/ttft.py --shape msa-4b --bank-tokens 10M --batches 1,8,64
    python benchmarks/ttft.py --shape tiny --bank-tokens 20k --batches 1,4   # CPU smoke run
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # before vLLM is imported
os.environ["VLLM_MSA_PROFILE_RANGES"] = "1"
os.environ.setdefault("VLLM_MSA_FETCH_STREAM", "0")

from bank_build import common_arguments, prepare, synthetic_bank, write_result
from report import (
    DEVICE_EVENTS,
    card_name,
    device_copy_bandwidth,
    host_seconds_by_function,
    matmul_rate,
    pyplot,
    trace_events,
)
from serving import questions

from vllm_msa.cli import parse_count

PHASES = {"msa.route": "route", "msa.fetch": "fetch", "msa.attention": "attention"}


def gpu_time_by_phase(prof) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds of device time per phase, plus "total" (every kernel, copy and memset of the
    step), and the routing phase's seconds per kernel name. A kernel belongs to the phase
    whose range was open on the launching thread when it was launched (matched through the
    trace's correlation ids: Triton's launches are not inside any torch op, so the
    profiler's own op tree does not hold them)."""
    events = trace_events(prof)
    ranges: dict[int, list[tuple[float, float, str]]] = {}
    launches: dict[int, tuple[int, float]] = {}
    device = []
    for e in events:
        cat = e.get("cat", "")
        if e.get("ph") != "X":
            continue
        if cat == "user_annotation" and e["name"] in PHASES:
            ranges.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"],
                                                    PHASES[e["name"]]))
        elif cat in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {}):
            launches[e["args"]["correlation"]] = (e["tid"], e["ts"])
        elif cat in DEVICE_EVENTS:
            device.append(e)
    times = dict.fromkeys(PHASES.values(), 0.0)
    route_kernels: dict[str, float] = {}
    total = 0.0
    for e in device:
        seconds = e["dur"] / 1e6
        total += seconds
        tid, ts = launches.get(e.get("args", {}).get("correlation"), (None, None))
        for start, end, name in ranges.get(tid, ()):
            if start <= ts <= end:
                times[name] += seconds
                if name == "route":
                    kernel = e["name"][:80]
                    route_kernels[kernel] = route_kernels.get(kernel, 0.0) + seconds
                break
    times["total"] = total
    return times, dict(sorted(route_kernels.items(), key=lambda kv: -kv[1]))


def profiled_host(fn, top: int = 15) -> tuple[float, dict[str, float]]:
    """(what `fn` returns, the `top` functions by own host time under cProfile, seconds):
    where a one-off slow call (the first request after start) spends its host time."""
    result, own = host_seconds_by_function(fn)
    return result, dict(sorted(own.items(), key=lambda kv: -kv[1])[:top])


def plot(result: dict, path: Path) -> str:
    plt = pyplot()
    if plt is None:
        return "matplotlib is not installed: no plot"
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(rows))
    bottom = [0.0] * len(rows)
    for key in ("route", "fetch", "attention", "other"):
        values = [r[f"gpu_{key}_s"] * 1e3 for r in rows]
        ax.bar(xs, values, 0.6, bottom=bottom, label=key)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.plot(xs, [r["ttft_s"] * 1e3 for r in rows], "ko-", label="TTFT (wall)")
    for key, style, label in (("routing_floor_hbm_s", "r_", "routing HBM floor"),
                              ("routing_floor_compute_s", "m_", "routing compute floor")):
        if all(r[key] is not None for r in rows):  # floors are measured on GPUs only
            ax.plot(xs, [r[key] * 1e3 for r in rows], style, markersize=30, label=label)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"batch {r['batch']}" for r in rows])
    ax.set_ylabel("ms (GPU time of one prefill step)")
    ax.legend(fontsize=7)
    ax.set_title(f"Prefill with a {result['bank_tokens']:,}-token bank, {result['card']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot: {path}"


def main() -> None:
    parser = common_arguments(__doc__.splitlines()[0])
    parser.set_defaults(doc_tokens=512)
    parser.add_argument("--bank-tokens", default="10M")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--runs", type=int, default=5,
                        help="timed runs per batch size (median and range reported)")
    parser.add_argument("--question-words", type=int, default=12)
    parser.add_argument("--profile-first-request", action="store_true",
                        help="run the first request after start under cProfile and list "
                        "the host functions it spends most in (its TTFT then includes the "
                        "profiler's overhead)")
    args = parser.parse_args()
    work, ckpt, engine = prepare(args)

    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams
    from vllm_msa.kernels.routing import routing_flops

    import vllm_msa
    from vllm_msa.attention import profiling
    from vllm_msa.bank.sizing import layout_bytes
    from vllm_msa.config import MSAParams
    from vllm_msa.prompt import build_prompt, find_routing_span
    from vllm_msa.worker_state import runtime_state

    size = parse_count(args.bank_tokens)
    t = time.perf_counter()
    bank = synthetic_bank(args, ckpt, size, engine.get("dtype"), work)
    print(f"synthetic bank of {size:,} tokens ready in {time.perf_counter() - t:.0f} s")
    index_bytes = layout_bytes(bank, index_dtype=args.index_dtype).gpu_index_per_rank
    layers = len(bank.router_layers)
    bandwidth = device_copy_bandwidth(index_bytes // layers)
    rate = matmul_rate()
    vllm_msa.register()  # AutoConfig knows "msa" checkpoints
    config = AutoConfig.from_pretrained(ckpt)
    msa = MSAParams.from_hf_config(config)
    batches = [int(b) for b in args.batches.split(",")]

    llm = LLM(model=str(ckpt), max_num_seqs=max(batches), **engine,
              additional_config={"msa": {"banks": {"b": str(bank.path)},
                                         "index_dtype": args.index_dtype}})
    tokenizer = llm.get_tokenizer()
    prompts = [build_prompt(tokenizer, q)
               for q in questions(max(batches), args.question_words)]
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    spans = [find_routing_span(p["prompt_token_ids"], bank.template_ids, end_id)
             for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=1, extra_args={"msa_bank": "b"})

    def ttft(n: int) -> float:
        t = time.perf_counter()
        llm.generate(prompts[:n], params, use_tqdm=False)
        return time.perf_counter() - t

    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    scored_heads = kv_heads if msa.head_reduce == "mean" else heads
    chunks = bank.num_chunks
    rows = []
    try:
        # The first request after start: with the runtime's kernel warm-up no Triton kernel
        # of ours compiles here (vllm_msa/attention/warmup.py); compare with the warm rows.
        if args.profile_first_request:
            first_request, first_request_host = profiled_host(lambda: ttft(1))
        else:
            first_request, first_request_host = ttft(1), None
        ttft(max(batches))  # warm-up: allocator, graphs
        for b in batches:
            ttft(b)  # untimed: any first-time work of this batch size
            profiling.host_seconds.clear()
            walls = [ttft(b) for _ in range(args.runs)]
            wall = statistics.median(walls)
            host = {name.removeprefix("msa."): seconds / args.runs
                    for name, seconds in profiling.host_seconds.items()}
            default = os.environ["VLLM_MSA_FETCH_STREAM"]
            os.environ["VLLM_MSA_FETCH_STREAM"] = "1"  # the fetch on its own stream
            side = statistics.median(ttft(b) for _ in range(args.runs))
            os.environ["VLLM_MSA_FETCH_STREAM"] = default
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                ttft(b)
            gpu, route_kernels = gpu_time_by_phase(prof)
            tokens = sum(e - s for s, e in spans[:b])
            hbm = index_bytes / bandwidth if bandwidth else None
            compute = (routing_flops(tokens, scored_heads, chunks, head_dim) * layers / rate
                       if rate else None)
            other = gpu["total"] - gpu["route"] - gpu["fetch"] - gpu["attention"]
            row = {"batch": b, "routing_tokens": tokens, "ttft_s": wall,
                   "ttft_min_s": min(walls), "ttft_max_s": max(walls), "ttft_runs_s": walls,
                   "ttft_fetch_side_stream_s": side,
                   "gpu_total_s": gpu["total"], "gpu_route_s": gpu["route"],
                   "gpu_fetch_s": gpu["fetch"], "gpu_attention_s": gpu["attention"],
                   "gpu_other_s": other, "routing_floor_hbm_s": hbm,
                   "routing_floor_compute_s": compute,
                   "route_vs_hbm_floor": gpu["route"] / hbm if hbm else None,
                   "route_vs_binding_floor": gpu["route"] / max(hbm, compute)
                   if hbm and compute else None,
                   # host time inside each phase (mean of the timed runs, no profiler)
                   **{f"host_{name}_s": host.get(name, 0.0)
                      for name in ("route", "fetch", "attention")},
                   "gpu_route_kernels_s": route_kernels}
            rows.append(row)
        # An 8-bit index: how many documents the bounded pass left to re-score, and the
        # time reading their exact keys took (the engine runs in this process).
        rescore = runtime_state()["bank_tiers"]["b"]["rescore"]
    finally:
        llm.llm_engine.engine_core.shutdown()

    card = card_name()
    print(f"\n{card}, {args.shape} shape, {size:,}-token bank ({layers} router layers, "
          f"index {index_bytes / 1e9:.2f} GB); device copy "
          f"{(bandwidth or 0) / 1e12:.2f} TB/s, bf16 matmul {(rate or 0) / 1e12:.0f} TFLOP/s\n")
    print(f"TTFT: median of {args.runs} runs [min-max]; overlap: the fetch on a side stream")
    print(f"{'batch':>5} {'TTFT ms':>8} {'range':>15} {'overlap':>7} {'GPU ms':>7} {'route':>7} "
          f"{'fetch':>7} "
          f"{'attn':>7} {'other':>7} {'HBM floor':>9} {'FLOP floor':>10} "
          f"{'route/HBM':>9} {'route/binding':>13}")
    ms = lambda x: f"{x * 1e3:.2f}" if x is not None else "-"  # noqa: E731
    ratio = lambda x: f"{x:.2f}x" if x is not None else "-"  # noqa: E731
    for r in rows:
        spread = f"[{ms(r['ttft_min_s'])}-{ms(r['ttft_max_s'])}]"
        print(f"{r['batch']:>5} {ms(r['ttft_s']):>8} {spread:>15} "
              f"{ms(r['ttft_fetch_side_stream_s']):>7} "
              f"{ms(r['gpu_total_s']):>7} "
              f"{ms(r['gpu_route_s']):>7} {ms(r['gpu_fetch_s']):>7} "
              f"{ms(r['gpu_attention_s']):>7} {ms(r['gpu_other_s']):>7} "
              f"{ms(r['routing_floor_hbm_s']):>9} {ms(r['routing_floor_compute_s']):>10} "
              f"{ratio(r['route_vs_hbm_floor']):>9} {ratio(r['route_vs_binding_floor']):>13}")
    print(f"\nhost time inside the router layers' phases, ms per step (no profiler):\n"
          f"{'batch':>5} {'route':>7} {'fetch':>7} {'attn':>7} {'sum':>7} {'TTFT':>7}")
    for r in rows:
        phases = [r[f"host_{name}_s"] for name in ("route", "fetch", "attention")]
        print(f"{r['batch']:>5} " + " ".join(f"{ms(x):>7}" for x in phases)
              + f" {ms(sum(phases)):>7} {ms(r['ttft_s']):>7}")
    print(f"\nfirst request after start (batch 1): {ms(first_request)} ms"
          + (" (under cProfile)" if first_request_host else ""))
    for name, seconds in (first_request_host or {}).items():
        print(f"  {seconds * 1e3:8.1f} ms  {name}")
    if rescore:
        print(f"\n{args.index_dtype} index: {rescore['candidates']:,} of "
              f"{rescore['documents']:,} documents re-scored "
              f"({rescore['rescored_fraction']:.1%}) over {rescore['calls']} routing calls; "
              f"{rescore['bytes_read'] / 1e9:.2f} GB of exact keys read in "
              f"{rescore['seconds']:.2f} s")
    for r in rows[:1]:
        print(f"\nrouting's kernels at batch {r['batch']}, GPU us per router layer:")
        for name, seconds in r["gpu_route_kernels_s"].items():
            print(f"  {seconds / layers * 1e6:8.1f}  {name}")
    first = rows[0] if rows else {}
    result = {
        "benchmark": "ttft",
        "card": card,
        "shape": args.shape,
        "bank_tokens": size,
        "bank_dtype": args.bank_dtype,
        "tiers": bank.dtypes.to_json(),
        "index_dtype": args.index_dtype,
        "rescore": rescore,
        "virtual": args.virtual,
        "index_bytes": index_bytes,
        "router_layers": layers,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "matmul_flops_per_s": rate,
        "rows": rows,
        "first_request_ttft_s": first_request,
        "first_request_host_s": first_request_host,
        "goal_metric": f"GPU time of routing in one prefill step / HBM floor (one read of the "
                       f"index), batch {first.get('batch')}, {size:,}-token bank",
        "goal": 1.2,
        "achieved": first.get("route_vs_hbm_floor"),
    }
    path = write_result(result, args)
    print(plot(result, path.with_suffix(".png")))


if __name__ == "__main__":
    main()
