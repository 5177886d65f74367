"""A bounded soak of the real OpenAI server on CPU, then crash safety: kill -9 under load.

The load is benchmarks/soak.py's (the GPU benchmark runs the same code for longer): memory
requests over two banks, plain, chat, streamed, Memory Interleave (plain and streamed) and
clients that hang up, 120 requests from 8 concurrent clients, on a KV cache small enough that
requests are preempted. Every valid request must equal its solo run (fp32: tokens, texts,
documents exactly, logprobs within 1e-4); afterwards the staging pool is empty, no request is
held and the server's RSS is within benchmarks/soak.py's RSS_MARGIN of where it started.

Then the server is killed with SIGKILL (its whole process group, as when a machine dies)
while long requests run, started again with the same command, and every bank loads, verifies
and answers exactly as before the kill.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import REPO, running_server, stop_server

sys.path.insert(0, str(REPO / "benchmarks"))
from soak import (  # benchmarks/ is not a package: on sys.path above
    RSS_MARGIN,
    Soak,
    leak_report,
    request_specs,
    same,
    send,
    settled,
    soak_extra_args,
    tree_rss,
)

from vllm_msa.bank import MemoryBank

pytestmark = pytest.mark.slow

REQUESTS = 120
CONCURRENCY = 8
MAX_TOKENS = 24
# 11 blocks of 32 tokens (the fewest this server starts with): three requests of ~80 tokens
# fill them before they decode. The storm's preemptions depend on the clients' timing (they
# may hit plain requests only); `_preempt_memory_requests` makes sure memory requests are.
SERVER_ARGS = ("--max-num-seqs", "6", "--max-num-batched-tokens", "128", "--block-size", "32",
               "--num-gpu-blocks-override", "11", "--max-model-len", "320", *soak_extra_args())
DEV_MODE = {"VLLM_SERVER_DEV_MODE": "1"}  # vLLM's /collective_rpc, to read the MSA state


def test_soak_then_kill_and_restart(checkpoints, default_banks, tmp_path):
    from transformers import AutoTokenizer

    ckpt = checkpoints()
    msa = {"banks": {name: str(bank.path) for name, bank in default_banks.items()}}
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    specs = request_specs(tokenizer, str(ckpt), sorted(msa["banks"]), MAX_TOKENS)
    with running_server(ckpt, msa, tmp_path / "soak.log", *SERVER_ARGS, env=DEV_MODE) as srv:
        soak = Soak(srv["base"], specs, tol=1e-4)
        soak.solo()
        rss_start, states_start = tree_rss(srv["proc"].pid), settled(srv["base"])
        result = soak.storm(REQUESTS, CONCURRENCY)
        _preempt_memory_requests(srv["base"], specs)
        leaks = leak_report(srv["base"], srv["proc"].pid, rss_start, states_start)
        assert result.failures == [] and result.differing == [], (result.failures,
                                                                  result.differing)
        assert sum(result.sent.values()) == REQUESTS and result.hang_ups > 0
        assert leaks["staging_empty"], leaks["states_end"]
        assert sum(s["preempted"] for s in leaks["states_end"]) > 0, "no preemption"
        assert leaks["rss_growth"] <= RSS_MARGIN, leaks
        assert httpx.get(srv["base"] + "/health", timeout=10).status_code == 200

        # kill -9 under load: long requests in flight.
        long = [s for s in specs if s.path == "/v1/completions" and not s.stream]
        threads = [threading.Thread(target=_swallow, args=(srv["base"], spec), daemon=True)
                   for spec in long]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        stop_server(srv["proc"], signal.SIGKILL)
        assert srv["proc"].returncode == -signal.SIGKILL

    for name, bank in default_banks.items():
        assert MemoryBank.open(bank.path).verify() == [], name
    # Restarted by `vllm-msa serve` (banks as flags), with VLLM_PLUGINS naming another
    # plugin only: the front still loads the plugin and its /v1/msa/answer route.
    restart_env = {**DEV_MODE, "VLLM_PLUGINS": "lora_filesystem_resolver"}
    with running_server(ckpt, msa, tmp_path / "restart.log", *SERVER_ARGS, env=restart_env,
                        front=True) as srv, httpx.Client(timeout=600) as client:
        for spec in specs:  # the answers of the first server, the same options
            assert send(client, srv["base"], spec) == soak.expected[spec.name], spec.name


def _preempt_memory_requests(base: str, specs) -> None:
    """Memory requests long enough (~200 tokens, 7 of the 11 KV blocks) that any two running
    together outgrow the cache: some are preempted and recomputed whatever the clients'
    timing in the storm (which may preempt only plain requests); each must still equal its
    solo run (logprobs within 1e-4, as in the storm)."""
    burst = [dataclasses.replace(s, name=s.name + " long", body={**s.body, "max_tokens": 120})
             for s in specs if s.name.startswith("memory[")][:4]
    with httpx.Client(timeout=600) as client:
        solo = [send(client, base, spec) for spec in burst]

    def run(spec):
        with httpx.Client(timeout=600) as client:
            return send(client, base, spec)

    with ThreadPoolExecutor(len(burst)) as pool:
        together = list(pool.map(run, burst))
    for spec, got, want in zip(burst, together, solo, strict=True):
        assert same(got, want, 1e-4), spec.name


def _swallow(base: str, spec) -> None:
    """A request whose server is about to die: its error is expected."""
    body = {**spec.body, "max_tokens": 250}
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(base + spec.path, json=body, timeout=120)
