"""The host tier shared by a node's engine processes (vllm_msa/attention/host_share.py): real
processes and real shared-memory files. One process fills a tier, every other maps the same
bytes; a creator killed while filling leaves nothing anyone trusts; the last user removes the
file; no room falls back to private memory. (Engines sharing a bank: test_memory_parallel.py.)
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import time

import pytest
import torch

from vllm_msa.attention import host_share

SHAPE = (64, 2, 16)


def fill_with(value: float, delay: float = 0.0):
    def fill(t: torch.Tensor) -> None:
        time.sleep(delay)
        t.copy_(torch.arange(t.numel(), dtype=t.dtype).view(t.shape) + value)
    return fill


def open_in_child(shm_dir, name, value, delay, ready, leave, out):
    os.environ["VLLM_MSA_SHM_DIR"] = str(shm_dir)
    import importlib

    importlib.reload(host_share)
    shared = host_share.shared_tensor(name, SHAPE, torch.float32, fill_with(value, delay))
    out.put((shared.created, float(shared.tensor.sum())))
    ready.set()
    leave.wait(30)


@pytest.fixture
def shm(tmp_path, monkeypatch):
    """A private directory standing in for /dev/shm (same code path, no cross-test clashes)."""
    path = tmp_path / "shm"
    path.mkdir()
    monkeypatch.setattr(host_share, "SHM_DIR", path)
    return path


def child(shm, name, value, delay=0.0):
    ctx = multiprocessing.get_context("spawn")
    ready, leave, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=open_in_child, args=(shm, name, value, delay, ready, leave, out))
    proc.start()
    return proc, ready, leave, out


def test_one_process_fills_every_other_maps_the_same_bytes(shm):
    proc, ready, leave, out = child(shm, "t", 1.0)
    assert ready.wait(60)
    created, total = out.get()
    mine = host_share.shared_tensor("t", SHAPE, torch.float32, fill_with(99.0))
    assert created and not mine.created  # filled once: the child's values, not ours
    assert float(mine.tensor.sum()) == total
    assert torch.equal(mine.tensor, torch.arange(64 * 32, dtype=torch.float32).view(SHAPE) + 1)
    assert [p.name for p in shm.iterdir()] == ["vllm-msa-t"]  # one copy on the node
    assert host_share.in_use(shm / "vllm-msa-t")
    leave.set()
    proc.join(30)
    assert (shm / "vllm-msa-t").exists()  # we still map it
    path = mine.path
    del mine  # the last user goes: the file goes
    import gc

    gc.collect()
    assert not path.exists()


def test_a_creator_killed_while_filling_leaves_nothing_trusted(shm):
    proc, *_ = child(shm, "k", 5.0, delay=30)
    deadline = time.monotonic() + 60
    while not (shm / "vllm-msa-k.partial").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    assert not (shm / "vllm-msa-k").exists()  # never published
    shared = host_share.shared_tensor("k", SHAPE, torch.float32, fill_with(7.0))
    assert shared.created  # the leftover was reaped and the tier rebuilt here
    assert float(shared.tensor[0, 0, 0]) == 7.0
    assert sorted(p.name for p in shm.iterdir()) == ["vllm-msa-k"]


def test_a_failed_fill_publishes_nothing(shm):
    def broken(t):
        raise ValueError("NaN in the bank")

    with pytest.raises(ValueError, match="NaN"):
        host_share.shared_tensor("f", SHAPE, torch.float32, broken)
    assert list(shm.iterdir()) == []


def test_no_room_falls_back_to_private_memory(shm, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    assert host_share.shared_tensor("n", SHAPE, torch.float32, fill_with(0.0)) is None
    assert list(shm.iterdir()) == []


def test_clean_removes_only_unused_files(shm):
    kept = host_share.shared_tensor("used", SHAPE, torch.float32, fill_with(0.0))
    (shm / "vllm-msa-stale").write_bytes(b"x" * 10)  # left by killed engines
    (shm / "other-file").write_bytes(b"y")
    assert [p.name for p, _ in host_share.clean(dry_run=True)] == ["vllm-msa-stale"]
    assert (shm / "vllm-msa-stale").exists()
    assert [p.name for p, _ in host_share.clean()] == ["vllm-msa-stale"]
    assert sorted(p.name for p in shm.iterdir()) == ["other-file", "vllm-msa-used"]
    assert kept.tensor.shape == SHAPE
