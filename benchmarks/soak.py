"""Soak: a real OpenAI server under bounded mixed load answers every valid request as it
answers it alone, survives clients that hang up, and gives back what the load took.

The load (`Soak`): completions with memory over several banks, plain completions, chat,
streamed completions, Memory Interleave (`/v1/msa/answer`, plain and streamed), and clients
that hang up (a stream closed after its first event, a non-streamed answer abandoned after a
fraction of a second), drawn in a seeded order and sent from a pool of concurrent clients.
Each kind of valid request is first run alone; under load it must come back with the same
tokens (logprobs within `tol`), texts, documents and answers. Start the server with a small
KV cache and preemption is part of the load too.

After the load, the workers' MSA state (`vllm_msa.worker_state`, through vLLM's dev-mode
`/collective_rpc`) must show the staging pool empty and no request held, device memory back
where it was, and the server's process tree RSS within `RSS_MARGIN` of the start (measured
after the solo runs, once every code path has warmed up).

The pytest soak (tests/test_soak.py) drives a tiny checkpoint on CPU with this module; run
alone it serves an MSA-4B-shaped random checkpoint over synthetic banks on a GPU:

    python3 benchmarks/soak.py --shape msa-4b --bank-tokens 1M,100K --requests 2000
    python3 benchmarks/soak.py --shape tiny --bank-tokens 20K,5K --requests 100   # CPU

It prints a table (requests by kind, failures, latency median and p99, memory) and writes
JSON (card, versions, command, goal_metric, goal, achieved).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

RSS_MARGIN = 0.10  # the server's RSS may end at most 10 % above where it started
GPU_MARGIN = 1 << 20  # device memory allocated by torch: back within 1 MiB
QUESTIONS = ["Which river flooded the old mill?", "Who repaired the lighthouse lamp?",
             "What did the baker sell?", "Where was the treaty signed?"]


@dataclass(frozen=True)
class Spec:
    """One kind of request: where it goes, its body, and whether it streams."""

    name: str
    path: str
    body: dict[str, Any]
    stream: bool = False


def request_specs(tokenizer: Any, model: str, banks: list[str], max_tokens: int,
                  questions: list[str] = QUESTIONS) -> list[Spec]:
    """The valid request kinds of the load (deterministic: temperature 0)."""
    from vllm_msa.prompt import build_prompt

    specs = []
    for i, question in enumerate(questions):
        ids = build_prompt(tokenizer, question)["prompt_token_ids"]
        base = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
                "logprobs": 1, "return_tokens_as_token_ids": True, "ignore_eos": True}
        bank = banks[i % len(banks)]
        specs.append(Spec(f"memory[{bank}] q{i}", "/v1/completions",
                          {**base, "vllm_xargs": {"msa_bank": bank,
                                                  "msa_return_selection": True}}))
        if i == 0:
            specs.append(Spec("plain q0", "/v1/completions", base))
            specs.append(Spec(f"stream[{bank}] q0", "/v1/completions",
                              {**base, "stream": True, "vllm_xargs": {"msa_bank": bank}},
                              stream=True))
            specs.append(Spec(f"chat[{bank}] q0", "/v1/chat/completions", {
                "model": model, "messages": [{"role": "user", "content": question}],
                "max_tokens": max_tokens, "temperature": 0, "logprobs": True,
                "ignore_eos": True, "vllm_xargs": {"msa_bank": bank}}))
        if i in (1, 2):
            answer = {"bank": bank, "question": question, "max_tokens": max_tokens,
                      "return_selection": True}
            specs.append(Spec(f"interleave[{bank}] q{i}", "/v1/msa/answer", answer))
            specs.append(Spec(f"interleave-stream[{bank}] q{i}", "/v1/msa/answer",
                              {**answer, "stream": True}, stream=True))
    return specs


def hang_up_specs(specs: list[Spec]) -> list[Spec]:
    """Clients that leave early: a stream closed after its first event, an answer abandoned."""
    stream = next(s for s in specs if s.stream and s.path == "/v1/completions")
    answer = next(s for s in specs if s.path == "/v1/msa/answer" and not s.stream)
    long = {"max_tokens": 250}
    return [Spec("hang-up stream", stream.path, {**stream.body, **long}, stream=True),
            Spec("hang-up answer", answer.path, {**answer.body, **long, "interleave": False})]


def outcome(response_json: dict[str, Any], spec: Spec) -> dict[str, Any]:
    """The comparable part of a response."""
    if spec.path == "/v1/msa/answer":
        data = response_json
        return {"answer": data.get("answer"), "text": data.get("text"),
                "error": data.get("error"),
                "steps": [(s["round"], s["phase"], s["text"], s["doc_ids"],
                           json.dumps(s.get("selection"), sort_keys=True))
                          for s in data.get("steps", [])]}
    choice = response_json["choices"][0]
    if spec.path == "/v1/chat/completions":
        content = choice["logprobs"]["content"]
        return {"text": choice["message"]["content"],
                "logprobs": [c["logprob"] for c in content]}
    return {"tokens": choice["logprobs"]["tokens"],
            "logprobs": choice["logprobs"]["token_logprobs"],
            "selection": json.dumps((response_json.get("kv_transfer_params") or {})
                                    .get("msa_selection"), sort_keys=True)}


def send(client: httpx.Client, base: str, spec: Spec) -> dict[str, Any]:
    """Run `spec` to its end; the comparable outcome (raises on a non-200)."""
    if not spec.stream:
        response = client.post(base + spec.path, json=spec.body)
        if response.status_code != 200:
            raise RuntimeError(f"{spec.name}: HTTP {response.status_code} {response.text[:300]}")
        return outcome(response.json(), spec)
    text, result = "", None
    with client.stream("POST", base + spec.path, json=spec.body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{spec.name}: HTTP {response.status_code}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if spec.path == "/v1/msa/answer":
                if event.get("type") == "error":
                    raise RuntimeError(f"{spec.name}: {event['message']}")
                if event.get("type") == "result":
                    result = outcome(event, spec)
            else:
                text += event["choices"][0]["text"]
    return result if spec.path == "/v1/msa/answer" else {"text": text}


def hang_up(base: str, spec: Spec) -> None:
    """Start `spec` and leave: after the first streamed event, or after 0.3 s."""
    if spec.stream:
        with httpx.Client(timeout=60) as client, \
                client.stream("POST", base + spec.path, json=spec.body) as response:
            for _ in response.iter_lines():
                break
        return
    with contextlib.suppress(httpx.TimeoutException):
        httpx.post(base + spec.path, json=spec.body, timeout=0.3)


def same(a: dict[str, Any], b: dict[str, Any], tol: float) -> bool:
    if set(a) != set(b):
        return False
    for key, value in a.items():
        if key == "logprobs":
            if len(value) != len(b[key]) or any(abs(x - y) > tol
                                                for x, y in zip(value, b[key], strict=True)):
                return False
        elif value != b[key]:
            return False
    return True


@dataclass
class SoakResult:
    sent: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # errors: no answer, or not a 200
    differing: list[str] = field(default_factory=list)  # answered, unlike the solo run
    latencies: dict[str, list[float]] = field(default_factory=dict)
    hang_ups: int = 0
    wall_s: float = 0.0


class Soak:
    """Solo runs of every kind, then the mixed load against them."""

    def __init__(self, base: str, specs: list[Spec], *, tol: float, seed: int = 0) -> None:
        self.base = base
        self.specs = specs
        self.hang_ups = hang_up_specs(specs)
        self.tol = tol
        self.seed = seed
        self.expected: dict[str, dict[str, Any]] = {}

    def solo(self) -> None:
        with httpx.Client(timeout=600) as client:
            for spec in self.specs:
                self.expected[spec.name] = send(client, self.base, spec)

    def storm(self, requests: int, concurrency: int, hang_up_every: int = 10) -> SoakResult:
        rng = random.Random(self.seed)
        plan = []
        for i in range(requests):
            if hang_up_every and i % hang_up_every == hang_up_every - 1:
                plan.append(rng.choice(self.hang_ups))
            else:
                plan.append(rng.choice(self.specs))
        result = SoakResult(sent=dict(collections.Counter(spec.name for spec in plan)),
                            hang_ups=sum(spec in self.hang_ups for spec in plan))

        def run(spec: Spec) -> None:
            if spec in self.hang_ups:
                hang_up(self.base, spec)
                return
            t = time.perf_counter()
            try:
                with httpx.Client(timeout=600) as client:
                    got = send(client, self.base, spec)
            except Exception as e:  # every failure is reported
                result.failures.append(f"{spec.name}: {type(e).__name__}: {e}")
                return
            result.latencies.setdefault(spec.name, []).append(time.perf_counter() - t)
            if not same(got, self.expected[spec.name], self.tol):
                result.differing.append(spec.name)

        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(run, plan))
        result.wall_s = time.perf_counter() - start
        return result


# ----------------------------------------------------------------------------- the server
def worker_states(base: str) -> list[dict[str, Any]]:
    """Every worker's `msa_state()` (needs VLLM_SERVER_DEV_MODE=1 and the worker extension)."""
    response = httpx.post(base + "/collective_rpc", json={"method": "msa_state"}, timeout=60)
    response.raise_for_status()
    return response.json()["results"]


def settled(base: str, timeout: float = 60) -> list[dict[str, Any]]:
    """Worker states once no request holds staging (workers hear of finished and aborted
    requests in the next step; bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        states = worker_states(base)
        if all(s["slots_in_use"] == 0 and s["requests"] == 0 for s in states) or \
                time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def tree_rss(pid: int) -> int:
    """RSS of a process and all its descendants (API server, engine core, workers)."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def soak_extra_args() -> list[str]:
    """Server options the soak needs: the worker extension that reports MSA state."""
    return ["--worker-extension-cls", "vllm_msa.worker_state.MSAWorkerState"]


def leak_report(base: str, pid: int, rss_start: int, states_start: list[dict[str, Any]]
                ) -> dict[str, Any]:
    """What is left after the load, against the start."""
    states = settled(base)
    rss_end = tree_rss(pid)
    report = {"rss_start": rss_start, "rss_end": rss_end,
              "rss_growth": rss_end / rss_start - 1, "states_start": states_start,
              "states_end": states,
              "staging_empty": all(s["slots_in_use"] == 0 and s["requests"] == 0
                                   for s in states)}
    if "gpu_allocated" in states[0]:
        report["gpu_allocated_growth"] = max(
            e["gpu_allocated"] - s["gpu_allocated"]
            for s, e in zip(states_start, states, strict=True))
    return report


def print_table(result: SoakResult, leaks: dict[str, Any]) -> None:
    print(f"\n{'request kind':<32}{'sent':>6}{'median s':>10}{'p99 s':>8}")
    for name in sorted(result.sent):
        times = sorted(result.latencies.get(name, []))
        med = f"{statistics.median(times):.3f}" if times else "-"
        p99 = f"{times[min(len(times) - 1, int(0.99 * len(times)))]:.3f}" if times else "-"
        print(f"{name:<32}{result.sent[name]:>6}{med:>10}{p99:>8}")
    print(f"\n{sum(result.sent.values())} requests ({result.hang_ups} hung up) in "
          f"{result.wall_s:.1f} s; failed valid requests: {len(result.failures)}; answered "
          f"unlike their solo run: {len(result.differing)}")
    for failure in result.failures[:20]:
        print("  FAIL", failure)
    print(f"server RSS {leaks['rss_start'] / 2**20:.0f} -> {leaks['rss_end'] / 2**20:.0f} MiB "
          f"({100 * leaks['rss_growth']:+.1f} %, margin {100 * RSS_MARGIN:.0f} %); staging "
          f"empty: {leaks['staging_empty']}; preempted: "
          f"{sum(s['preempted'] for s in leaks['states_end'])}; overflows: "
          f"{sum(s['overflows'] for s in leaks['states_end'])}")
    if "gpu_allocated_growth" in leaks:
        print(f"GPU memory allocated: {leaks['gpu_allocated_growth']:+,} B after the load")


# ----------------------------------------------------------------------------- benchmark
def main() -> None:
    from bank_build import common_arguments, prepare, write_result
    from report import card_name

    from vllm_msa.cli import parse_count

    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--bank-tokens", default="1M,100K")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--kv-blocks", type=int, default=512,
                        help="--num-gpu-blocks-override (16 tokens each): small enough that "
                             "the load preempts")
    args = parser.parse_args()
    work, ckpt, engine = prepare(args)
    from transformers import AutoTokenizer

    from vllm_msa.bank.synth import plan_synth, synth_bank

    dtype = engine.get("dtype", "bfloat16")
    banks = {}
    for i, tokens in enumerate(args.bank_tokens.split(",")):
        path = work / f"soak-bank-{tokens}"
        if not (path / "manifest.json").exists():
            synth_bank(plan_synth(ckpt, parse_count(tokens), args.doc_tokens, dtype=dtype),
                       path, progress=False)
        banks[f"bank{i}"] = str(path)
    msa = {"banks": banks}
    port = 8311
    log = work / "soak-server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt),
           "--dtype", dtype, "--port", str(port), "--max-model-len", "4096",
           "--gpu-memory-utilization", str(args.gpu_memory_utilization),
           "--num-gpu-blocks-override", str(args.kv_blocks), "--additional-config",
           json.dumps({"msa": msa}), *soak_extra_args()]
    env = {**os.environ, "VLLM_PLUGINS": "msa,msa_answer", "VLLM_SERVER_DEV_MODE": "1"}
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 900
            while True:
                if proc.poll() is not None:
                    raise SystemExit("server exited:\n" + log.read_text()[-3000:])
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(base + "/health", timeout=2).status_code == 200:
                        break
                if time.time() > deadline:
                    raise SystemExit("server did not start:\n" + log.read_text()[-3000:])
                time.sleep(2)
            tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
            specs = request_specs(tokenizer, str(ckpt), list(banks), args.max_tokens)
            # bf16: a batch's numerics are not a lone request's (vLLM is not batch-invariant),
            # so a token can flip at a near-tie; such answers are counted, not failed.
            soak = Soak(base, specs, tol=float("inf"))
            soak.solo()
            rss_start, states_start = tree_rss(proc.pid), settled(base)
            result = soak.storm(args.requests, args.concurrency)
            leaks = leak_report(base, proc.pid, rss_start, states_start)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
            proc.wait(60)
    print_table(result, leaks)
    write_result({
        "benchmark": "soak", "card": card_name(), "bank_tokens": args.bank_tokens,
        "requests": sum(result.sent.values()), "hang_ups": result.hang_ups,
        "concurrency": args.concurrency, "wall_s": result.wall_s,
        "failures": result.failures, "differing": result.differing,
        "latencies": result.latencies, "leaks": leaks,
        "goal_metric": "failed or differing valid requests under the soak",
        "goal": 0, "achieved": len(result.failures),
    }, args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
