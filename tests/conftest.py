"""Shared fixtures: tiny checkpoints and real vLLM engines (shared per module: a start costs
~40 s on two cores)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# CPU engines reserve memory up front; keep them small so one test machine runs them in turn.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test process is multi-threaded by the time engines start; forking it can deadlock.
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
# On GPUs, Triton rounds fp32 `tl.dot` inputs to TF32 by default (vLLM's Triton attention),
# which alone moves fp32 results by ~1e-3. The fp32 tests compare our code with the plain-torch
# reference at 1e-4, so they ask Triton for IEEE fp32 (vLLM's own matmul precision default is
# already "highest"). No effect on CPU.
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DOCS = REPO / "examples" / "sample_docs.jsonl"

ENGINE_DEFAULTS = {
    "dtype": "float32",
    "max_model_len": 1024,
    "gpu_memory_utilization": 0.3,
    "seed": 0,
}


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def shutdown_llm(llm) -> None:
    """Stop an engine's processes now, so the next module's engine has the memory."""
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@contextlib.contextmanager
def running_llm(**kwargs) -> Iterator:
    from vllm import LLM

    llm = LLM(**{**ENGINE_DEFAULTS, **kwargs})
    try:
        yield llm
    finally:
        shutdown_llm(llm)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """`checkpoints(**spec)` -> path of a tiny MSA checkpoint (made once per spec)."""
    from vllm_msa.tiny import TinySpec, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    made: dict[TinySpec, Path] = {}

    def get(**fields) -> Path:
        spec = TinySpec(**fields)
        if spec not in made:
            made[spec] = make_tiny_checkpoint(root / f"ckpt{len(made)}", spec)
        return made[spec]

    return get


SMALL_BANK_DOC_IDS = (2, 5, 11)  # fewer documents than the tiny checkpoints' top-k (4)


def build_banks(ckpt: Path, out: Path, small: bool = False, dtype: str = "float32") -> dict:
    """Banks of `ckpt` built by the real stage-1 engine (one encoder for all of them):
    "docs" (the 24 sample documents) and, with `small`, "small" (three of them); `dtype` is
    the engine's (a bank serves models of its own dtype)."""
    import json

    from vllm_msa.bank.build import build_bank, encoder_llm

    sources = {"docs": SAMPLE_DOCS}
    if small:
        lines = [json.loads(x) for x in SAMPLE_DOCS.read_text().splitlines() if x.strip()]
        path = out / "small.jsonl"
        out.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(d) + "\n" for d in lines
                                if d["id"] in SMALL_BANK_DOC_IDS))
        sources["small"] = path
    llm = encoder_llm(ckpt, **{**ENGINE_DEFAULTS, "dtype": dtype})
    try:
        return {name: build_bank(ckpt, docs, out / name, llm=llm, progress=False)
                for name, docs in sources.items()}
    finally:
        shutdown_llm(llm)


@pytest.fixture(scope="session")
def default_banks(checkpoints, tmp_path_factory):
    """The default tiny checkpoint's banks, shared by every serving test module."""
    return build_banks(checkpoints(), tmp_path_factory.mktemp("default-banks"), small=True)


# -- the OpenAI server ---------------------------------------------------------------------------
HTTP_STEP_BUDGET = 96  # the shared server's --max-num-batched-tokens (see tests/test_http.py)
HTTP_MAX_TOKENS = 5  # tokens the shared reference answers generate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    import httpx

    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError("server exited:\n" + log.read_text()[-3000:])
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise RuntimeError("server did not start:\n" + log.read_text()[-3000:])
        time.sleep(1)


def server_command(ckpt: Path, msa: dict, port: int, *extra: str) -> list[str]:
    """`vllm serve` as tests run it (`python -m vllm.entrypoints.openai.api_server`: the CPU
    build's console script does not start)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt),
            "--dtype", "float32", "--max-model-len", "1024", "--gpu-memory-utilization", "0.3",
            "--enforce-eager", "--port", str(port), "--additional-config",
            json.dumps({"msa": msa}), *extra]


def msa_serve_command(ckpt: Path, msa: dict, port: int, *extra: str) -> list[str]:
    """The same server through `vllm-msa serve` (banks as --bank flags, the rest of the
    options as vLLM's)."""
    banks = [f"--bank={name}={path}" for name, path in msa["banks"].items()]
    rest = {k: v for k, v in msa.items() if k != "banks"}
    vllm = server_command(ckpt, rest, port, *extra)[3:]  # vLLM's options, "--model" first
    return [sys.executable, "-m", "vllm_msa.cli", "serve", str(ckpt), *banks, *vllm[2:]]


def server_env() -> dict[str, str]:
    """The route plugin on, tests/ importable (the scripted-outputs logits processor)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "VLLM_PLUGINS": "msa,msa_answer", "PYTHONPATH": path}


def kill_group_when(proc: subprocess.Popen, ready, timeout: float, what: str,
                    poll: float = 0.005) -> None:
    """SIGKILL `proc`'s whole process group (started with `start_new_session`) as soon as
    `ready()` holds, as when a machine dies mid-write; fails if it exits or times out first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, f"no {what} in time"
        time.sleep(poll)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def stop_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal the server's whole process group (API server, engine core, workers)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


@contextlib.contextmanager
def running_server(ckpt: Path, msa: dict, log: Path, *extra: str,
                   env: dict[str, str] | None = None, front: bool = False) -> Iterator[dict]:
    """A real OpenAI server over `ckpt` with `msa` as its additional_config, in a process
    group of its own (`env`: more environment variables; `front`: started by `vllm-msa
    serve`); yields {"base", "proc", "log"}."""
    port = free_port()
    handle = open(log, "w")  # noqa: SIM115 - closed below
    # cwd: not the checkout, which `python -m` would put first on sys.path: the server must
    # import the installed vllm_msa, as vLLM's own processes do.
    command = (msa_serve_command if front else server_command)(ckpt, msa, port, *extra)
    proc = subprocess.Popen(command,
                            env={**server_env(), **(env or {})}, cwd=log.parent,
                            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log)
        yield {"base": base, "proc": proc, "log": log}
    finally:
        stop_server(proc)
        handle.close()


@pytest.fixture(scope="session")
def server(checkpoints, default_banks, tmp_path_factory):
    """One server for the HTTP tests and the fuzzing: the "docs" bank, a 96-token step
    budget and the scripted-outputs logits processor (tests/test_http.py says why)."""
    ckpt = checkpoints()
    bank = default_banks["docs"]
    log = tmp_path_factory.mktemp("http") / "server.log"
    banks = {"docs": str(bank.path),  # and the same bank from an 8-bit routing index
             "docs-int8": {"path": str(bank.path), "index_dtype": "int8"}}
    with running_server(ckpt, {"banks": banks}, log,
                        "--max-num-batched-tokens", str(HTTP_STEP_BUDGET), "--max-num-seqs",
                        "8", "--logits-processors", "scripted_outputs:ScriptedOutputs") as srv:
        yield {**srv, "ckpt": ckpt, "bank": bank}


@pytest.fixture(scope="session")
def tokenizer(server):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(server["ckpt"]))


@pytest.fixture(scope="session")
def reference(server, tokenizer):
    """`reference(ids, span, top_k=4, memory=True)`: the float64 answer over the server's bank."""
    from msa_reference import reference_answer
    from reference import ReferenceMSA
    from test_serving import bank_docs

    ref = ReferenceMSA(server["ckpt"])
    docs = bank_docs(tokenizer, server["bank"])

    def answer(ids, span, *, top_k=4, memory=True):
        return reference_answer(ref, ids, span, docs if memory else None, top_k=top_k,
                                rope_offset_k=4, template_len=3, max_tokens=HTTP_MAX_TOKENS)

    answer.router_layers = ref.router_layers
    return answer
