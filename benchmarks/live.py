"""Live memory: adding and removing documents of a served bank while requests decode.

One in-process `AsyncLLM` (what `vllm serve` runs) serves a synthetic bank of files. Each edit
goes through the same functions as the bank routes (`serving/edits.py`): the documents are
encoded by the serving engine itself (`serving/encode.py`), committed as the bank's next
generation (`bank.edit.add_encoded`, durable), and every worker switches to it
(`edits.switch_workers`); an edit is timed from its start until that returns, when the next
request routes over the new generation. Phases:

  A  `--decode-batch` requests decode with memory, no edits (tokens/s over a window);
  B  the same decode while `--adds` single documents of `--doc-tokens` are added one after
     another (each add's latency; decode tokens/s over the same window);
  C  a batched add of `--batched-docs` documents (tokens/s), against `bank build` of the same
     documents by the stage-1 encoder engine, in this run (before the server starts);
  D  `--removals` single removals, one after another (latency).

    python benchmarks/live.py --shape msa-4b --bank-tokens 10M --bank-dtype fp8_e4m3
    python benchmarks/live.py --shape tiny --bank-tokens 20k --decode-batch 4 --adds 3 \
        --batched-docs 16 --removals 3 --doc-tokens 100        # CPU smoke run
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import time
import uuid
from pathlib import Path

from bank_build import common_arguments, make_docs, prepare, synthetic_bank, write_result
from report import card_name, pyplot
from serving import questions

from vllm_msa.cli import parse_count

ENCODE_SLOTS = 8  # max_num_seqs room for the adds' encode requests


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def build_baseline(ckpt: Path, docs: Path, work: Path, engine: dict) -> float:
    """`bank build` tokens/s of `docs` (after a warm-up build of a few of them)."""
    from vllm_msa.bank.build import build_bank, encoder_llm, shutdown_engine

    llm = encoder_llm(ckpt, **engine)
    try:
        warm = work / "live-warm-docs.jsonl"
        warm.write_text("".join(docs.read_text().splitlines(keepends=True)[:8]))
        for path in (work / "live-warm-bank", work / "live-build"):
            shutil.rmtree(path, ignore_errors=True)
        build_bank(ckpt, warm, work / "live-warm-bank", llm=llm, progress=False)
        t = time.perf_counter()
        bank = build_bank(ckpt, docs, work / "live-build", llm=llm, progress=False)
        return bank.num_tokens / (time.perf_counter() - t)
    finally:
        shutdown_engine(llm)


class Decoding:
    """`n` requests with memory decoding until stopped; counts their tokens as they come."""

    def __init__(self, engine, prompts: list[dict], max_tokens: int) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self.engine, self.prompts = engine, prompts
        self.params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                     output_kind=RequestOutputKind.DELTA,
                                     extra_args={"msa_bank": "b"})
        self.tokens = 0
        self.finished = 0  # requests done (a window must end before any is: same batch)
        self.tasks: list[asyncio.Task] = []

    async def _one(self, prompt: dict) -> None:
        async for out in self.engine.generate(prompt, self.params, f"decode-{uuid.uuid4().hex}"):
            self.tokens += len(out.outputs[0].token_ids)
        self.finished += 1

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._one(p)) for p in self.prompts]

    async def rate_over(self, seconds: float | None = None, during=None) -> tuple[float, float]:
        """(decode tokens/s, seconds) over a window of `seconds`, or of awaiting `during`."""
        before, t = self.tokens, time.perf_counter()
        if during is not None:
            await during
        else:
            await asyncio.sleep(seconds)
        elapsed = time.perf_counter() - t
        return (self.tokens - before) / elapsed, elapsed

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def add(engine, path: str, documents, info, phases: list | None = None
              ) -> tuple[float, int]:
    """One add as the POST route makes it: (seconds until routable, tokens). `phases` gets
    its parts: encode (engine), commit (durable on disk), switch (every worker), and the
    workers' own host time by part."""
    from vllm_msa.bank.edit import add_encoded
    from vllm_msa.serving.edits import switch_workers
    from vllm_msa.serving.encode import encode_documents

    t = time.perf_counter()
    encoded = await encode_documents(engine, "b", documents, info)
    t_encoded = time.perf_counter()
    bank = await asyncio.to_thread(add_encoded, path, encoded,
                                   {d.id: d.text for d in documents}, synthetic_ok=True)
    t_committed = time.perf_counter()
    workers = await switch_workers(engine, "b", bank)
    done = time.perf_counter()
    if phases is not None:
        phases.append({"encode": t_encoded - t, "commit": t_committed - t_encoded,
                       "switch": done - t_committed, "worker": worker_seconds(workers)})
    return done - t, sum(d.num_tokens for d in encoded)


async def remove(engine, path: str, doc_id: int, phases: list | None = None) -> float:
    from vllm_msa.bank.edit import remove_documents
    from vllm_msa.serving.edits import switch_workers

    t = time.perf_counter()
    bank = await asyncio.to_thread(remove_documents, path, [doc_id])
    t_committed = time.perf_counter()
    workers = await switch_workers(engine, "b", bank)
    done = time.perf_counter()
    if phases is not None:
        phases.append({"commit": t_committed - t, "switch": done - t_committed,
                       "worker": worker_seconds(workers)})
    return done - t


def worker_seconds(workers: list[dict]) -> dict[str, float]:
    """The slowest worker's host time in each part of its switch (`apply_generation`)."""
    parts = [w.get("seconds") or {} for w in workers]
    return {k: max(p.get(k, 0.0) for p in parts) for k in sorted({k for p in parts for k in p})}


def phase_medians(phases: list[dict]) -> dict[str, float]:
    """Median ms of each phase (and worker part) over `phases`."""
    keys = sorted({k for p in phases for k in p if k != "worker"})
    out = {k: statistics.median(p[k] for p in phases) * 1e3 for k in keys}
    parts = sorted({k for p in phases for k in p.get("worker", {})})
    out.update({f"worker_{k}": statistics.median(p["worker"].get(k, 0.0) for p in phases) * 1e3
                for k in parts})
    return out


async def measure(args, ckpt: Path, engine_args: dict, bank_path: str, new_docs) -> dict:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from vllm_msa.bank.reader import MemoryBank
    from vllm_msa.prompt import build_prompt

    msa = {"banks": {"b": bank_path}, "verify": False, "index_dtype": args.index_dtype,
           "reserve_tokens": args.reserve_tokens}
    if args.staging_mib is not None:
        msa["staging_mib"] = args.staging_mib
    # Sequence slots beyond the decoding batch: an add is encoded by engine requests, which
    # would otherwise wait for a decoding request to finish (a server at max_num_seqs does).
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(ckpt), max_num_seqs=args.decode_batch + ENCODE_SLOTS, enforce_eager=args.eager,
        additional_config={"msa": msa}, **engine_args))
    try:
        info = MemoryBank.open(bank_path).model_info
        tokenizer = engine.get_tokenizer()
        prompts = [build_prompt(tokenizer, q) for q in questions(args.decode_batch, 12)]
        singles, batched = new_docs[:args.adds + 1], new_docs[args.adds + 1:]
        await add(engine, bank_path, singles[:1], info)  # warm-up: the encode path, a switch
        decoding = Decoding(engine, prompts, args.max_decode_tokens)
        decoding.start()
        await asyncio.sleep(args.settle_s)  # every request past its prefill
        rate_a, window_a = await decoding.rate_over(args.window_s)
        print(f"A: decode {rate_a:,.0f} tok/s without edits", flush=True)
        latencies, add_phases, removal_phases = [], [], []

        async def adds() -> None:
            for doc in singles[1:]:
                latencies.append((await add(engine, bank_path, [doc], info, add_phases))[0])
                print(f"B: add {latencies[-1] * 1e3:.1f} ms", flush=True)

        rate_b, window_b = await decoding.rate_over(during=adds())
        print(f"B: decode {rate_b:,.0f} tok/s during adds", flush=True)
        finished_in_windows = decoding.finished
        if finished_in_windows:
            print(f"warning: {finished_in_windows} decoding requests finished before the "
                  "windows ended (raise --max-decode-tokens): the rates compare other batches",
                  flush=True)
        await decoding.stop()
        seconds, tokens = await add(engine, bank_path, batched, info)
        print(f"C: batched add {tokens / seconds:,.0f} tok/s", flush=True)
        gone = [d.id for d in singles[1:1 + args.removals]]
        removals = [await remove(engine, bank_path, doc_id, removal_phases)
                    for doc_id in gone]
        print("D: removals " + ", ".join(f"{r * 1e3:.1f}" for r in removals) + " ms",
              flush=True)
        states = await engine.collective_rpc("msa_state")
    finally:
        engine.shutdown()
    return {"decode_no_edits_tokens_per_s": rate_a, "decode_no_edits_window_s": window_a,
            "decoding_finished_in_windows": finished_in_windows,
            "decode_during_adds_tokens_per_s": rate_b, "decode_during_adds_window_s": window_b,
            "add_latencies_s": latencies, "batched_add_tokens": tokens,
            "batched_add_s": seconds, "removal_latencies_s": removals,
            "add_phases": add_phases, "removal_phases": removal_phases,
            "worker_state": states[0] if states else None}


def plot(result: dict, path: Path) -> str:
    plt = pyplot()
    if plt is None:
        return ""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    adds = [s * 1e3 for s in result["add_latencies_s"]]
    ax.plot(range(1, len(adds) + 1), adds, "o-", label="add (encode, commit, switch)")
    ax.axhline(result["goals"]["add_p50_ms"]["goal"], color="gray", ls="--", label="goal p50")
    ax.set_xlabel("add #, while requests decode")
    ax.set_ylabel("ms until routable")
    ax.set_title(f"live adds, {result['bank_tokens']:,}-token bank, {result['card']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)


def main() -> None:
    parser = common_arguments(__doc__.splitlines()[0])
    parser.set_defaults(doc_tokens=500)
    parser.add_argument("--bank-tokens", default="10M")
    parser.add_argument("--decode-batch", type=int, default=64)
    parser.add_argument("--adds", type=int, default=20)
    parser.add_argument("--batched-docs", type=int, default=1000)
    parser.add_argument("--removals", type=int, default=10)
    parser.add_argument("--window-s", type=float, default=5.0)
    parser.add_argument("--settle-s", type=float, default=3.0)
    parser.add_argument("--max-decode-tokens", type=int, default=3000)
    parser.add_argument("--reserve-tokens", type=int, default=2_000_000,
                        help='additional_config["msa"]["reserve_tokens"]: room for adds')
    parser.add_argument("--staging-mib", type=int,
                        help='additional_config["msa"]["staging_mib"]: the staging pool is '
                             "sized for the stored documents; added documents larger than "
                             "every stored one overflow a full batch's pool (those requests "
                             "then decode eagerly)")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--no-build-baseline", action="store_true")
    args = parser.parse_args()
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # (msa_state's nested figures)
    work, ckpt, engine = prepare(args)
    engine["max_model_len"] = max(engine["max_model_len"], 2 * args.doc_tokens + 64)
    size = parse_count(args.bank_tokens)
    t = time.perf_counter()
    shutil.rmtree(work / "live", ignore_errors=True)  # a fresh bank: the run edits it
    (work / "live").mkdir()
    bank = synthetic_bank(args, ckpt, size, engine.get("dtype"), work / "live")
    bank_path = bank.path
    print(f"synthetic bank of {size:,} tokens ready in {time.perf_counter() - t:.0f} s",
          flush=True)
    docs = work / "live-docs.jsonl"
    count = args.adds + 1 + args.batched_docs
    make_docs(docs, count, args.doc_tokens, seed=7)
    from vllm_msa.bank.documents import Document, read_documents

    first = bank.num_documents + 1_000_000  # ids the bank does not hold
    new_docs = [Document(first + d.id, d.text) for d in read_documents(docs)[0]]
    build_rate = None
    if not args.no_build_baseline:
        batch_docs = work / "live-batch-docs.jsonl"
        batch_docs.write_text("".join(docs.read_text().splitlines(keepends=True)[args.adds + 1:]))
        build_rate = build_baseline(ckpt, batch_docs, work, engine)
        print(f"bank build of the batch: {build_rate:,.0f} tokens/s", flush=True)
    runs = asyncio.run(measure(args, ckpt, engine, str(bank_path), new_docs))

    adds_ms = [s * 1e3 for s in runs["add_latencies_s"]]
    removals_ms = [s * 1e3 for s in runs["removal_latencies_s"]]
    add_rate = runs["batched_add_tokens"] / runs["batched_add_s"]
    decode_ratio = runs["decode_during_adds_tokens_per_s"] / runs["decode_no_edits_tokens_per_s"]
    goals = {
        "add_p50_ms": {"goal": 50.0, "achieved": statistics.median(adds_ms),
                       "p99": percentile(adds_ms, 0.99), "met": None},
        "decode_during_adds_vs_without": {"goal": 0.9, "achieved": decode_ratio},
        "batched_add_vs_bank_build": {"goal": 0.8, "achieved": add_rate / build_rate
                                      if build_rate else None},
        "removal_p50_ms": {"goal": 5.0, "achieved": statistics.median(removals_ms),
                           "p99": percentile(removals_ms, 0.99)},
    }
    for name, g in goals.items():
        if g["achieved"] is not None:
            g["met"] = (g["achieved"] <= g["goal"]) if name.endswith("_ms") else (
                g["achieved"] >= g["goal"])
    card = card_name()
    print(f"\nlive edits on {card}, {args.shape} shape, {size:,}-token bank "
          f"({bank.dtypes.kv} K/V, {args.index_dtype} index), {args.decode_batch} decoding\n")
    print(f"{'measure':<44} {'median':>10} {'p99 / spread':>16} {'goal':>8}")
    print(f"{'add of one ' + str(args.doc_tokens) + '-token document (ms)':<44} "
          f"{goals['add_p50_ms']['achieved']:>10.1f} {goals['add_p50_ms']['p99']:>16.1f} "
          f"{'<= 50':>8}")
    print(f"{'removal (ms)':<44} {goals['removal_p50_ms']['achieved']:>10.2f} "
          f"{goals['removal_p50_ms']['p99']:>16.2f} {'<= 5':>8}")
    print(f"{'decode tok/s, no edits':<44} {runs['decode_no_edits_tokens_per_s']:>10,.0f}")
    print(f"{'decode tok/s, during adds':<44} {runs['decode_during_adds_tokens_per_s']:>10,.0f}"
          f" {decode_ratio:>15.2f}x {'>= 0.9x':>8}")
    print(f"{'batched add tok/s':<44} {add_rate:>10,.0f}"
          + (f" {add_rate / build_rate:>15.2f}x {'>= 0.8x':>8}" if build_rate else ""))
    if build_rate:
        print(f"{'bank build tok/s (same documents)':<44} {build_rate:>10,.0f}")
    breakdown = {"add": phase_medians(runs["add_phases"]),
                 "removal": phase_medians(runs["removal_phases"])}
    late = (runs.get("worker_state") or {}).get("late_compiles") or []
    print(f"kernels compiled while serving: {len(late)}"
          + "".join(f"\n  {c['kernel']}" for c in late))
    for edit, parts in breakdown.items():
        print(f"{edit} phases, median ms: "
              + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    result = {
        "benchmark": "live", "card": card, "shape": args.shape, "bank_tokens": bank.num_tokens,
        "bank_dtype": bank.dtypes.kv, "index_dtype": args.index_dtype, "synthetic": True,
        "decode_batch": args.decode_batch, "doc_tokens": args.doc_tokens,
        "reserve_tokens": args.reserve_tokens, "staging_mib": args.staging_mib,
        "build_tokens_per_s": build_rate,
        "batched_add_tokens_per_s": add_rate, **runs, "phase_medians_ms": breakdown,
        "goals": goals,
        "goal_metric": "p50 ms from the start of a 500-token add until every worker routes "
                       "over it, while requests decode (other goals under goals)",
        "goal": 50.0, "achieved": goals["add_p50_ms"]["achieved"],
    }
    out = write_result(result, args)
    plotted = plot(result, out.with_suffix(".png"))
    if plotted:
        print(f"wrote {plotted}")


if __name__ == "__main__":
    main()
