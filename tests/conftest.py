"""Shared fixtures: tiny checkpoints and real vLLM engines (shared per module: a start costs
~40 s on two cores)."""

from __future__ import annotations

import contextlib
import gc
import os
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
