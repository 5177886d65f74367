"""A served bank's host tier is given back when the bank is dropped: an `LLM` deleted and made
again in one process (a notebook, a benchmark looping over engines) must not keep every
earlier bank's K̄/V̄ in RAM. On a GPU the K̄/V̄ are page-locked (`cudaHostRegister`), which
must be undone before the memory goes back; on CPU they are plain memory."""

from __future__ import annotations

import gc

import pytest
import torch

from vllm_msa.attention.tiers import ServedBank, release_freed_heap
from vllm_msa.bank import MemoryBank
from vllm_msa.bank.synth import plan_synth, synth_bank

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize("share", ["private", "shared", "shared on disk"])
@pytest.mark.parametrize("device", DEVICES)
def test_dropped_bank_releases_host_memory(checkpoints, tmp_path, monkeypatch, device, share):
    """Also for a host tier in shared memory (`host_share.py`), page-locked in place on a GPU
    (the last user of each file removes it), and for shared files outside tmpfs, which CUDA
    cannot page-lock: the tier is copied into pinned memory instead, and CUDA goes on."""
    import tempfile
    from pathlib import Path

    from vllm_msa.attention import host_share

    # A directory of its own on the node's tmpfs (CUDA page-locks shared mappings there; a
    # file on disk cannot be registered and would be copied into torch's pinned memory).
    tmpfs = Path("/dev/shm").is_dir() and share == "shared"
    shm = Path(tempfile.mkdtemp(dir="/dev/shm" if tmpfs else tmp_path))
    monkeypatch.setattr(host_share, "SHM_DIR", shm)
    bank = synth_bank(plan_synth(checkpoints(), 300_000, 500, dtype="float32"),
                      tmp_path / "bank", progress=False)
    host_bytes = bank.tier_bytes()["host_kv"]
    assert host_bytes > 64 * 2**20  # large enough to see in the process's RSS
    heads = slice(0, bank.model_info.num_kv_heads)

    def load() -> ServedBank:
        served = ServedBank.load("b", MemoryBank.open(bank.path), torch.device(device), heads,
                                 share_host=share != "private")
        assert len(served.shared_files) == (
            0 if share == "private" else 2 * len(bank.router_layers))
        if device == "cuda":
            assert all(t.is_pinned() for t in served.host_keys.values())
        return served

    load()  # first-use costs (imports, allocator and CUDA set-up) out of the way; dropped
    gc.collect()
    release_freed_heap()
    before = rss()
    for _ in range(4):
        served = load()
        if not (device == "cuda" and share == "shared on disk"):
            # (pinned by copy there: torch's pinned-memory cache hands the first load's
            # block back to the next, so the process's RSS does not grow again)
            assert rss() - before > 0.8 * host_bytes  # the K/V really are in RAM while served
        del served
        gc.collect()
    release_freed_heap()
    # Four loads kept would be 4x host_bytes; one leftover allocator arena is tolerated.
    assert rss() - before < 0.5 * host_bytes
    assert not list(shm.iterdir())  # the last user removed the shared files
    shm.rmdir()
