"""`vllm-msa bank build` killed with SIGKILL mid-build leaves nothing that loads, and the same
command run again finishes the bank, equal to the reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from bank_checks import assert_bank_matches_reference, read_docs
from conftest import SAMPLE_DOCS, kill_group_when

from vllm_msa.bank import BankError, MemoryBank

pytestmark = pytest.mark.slow


def build_command(ckpt, docs, out) -> list[str]:
    return [
        sys.executable, "-m", "vllm_msa.cli", "bank", "build",
        "--model", str(ckpt), "--docs", str(docs), "--out", str(out),
        "--dtype", "float32", "--max-model-len", "1024", "--gpu-memory-utilization", "0.3",
        "--max-num-seqs", "2", "--segment-mb", "0.004", "--no-progress",
    ]


def committed_segments(out) -> int:
    try:
        return len(json.loads((out / "build-state.json").read_text())["segments"])
    except (OSError, ValueError, KeyError):
        return 0


def test_killed_build_never_loads_and_rerun_finishes(checkpoints, tmp_path):
    ckpt = checkpoints()
    out = tmp_path / "bank"
    # 48 documents, about one per segment: a build long enough to be killed in the middle
    # (after 2 segments), short enough that the rerun and the reference stay cheap.
    samples = read_docs(SAMPLE_DOCS)
    docs = [{"id": 1000 + i, "text": samples[i % len(samples)]["text"]} for i in range(48)]
    docs_path = tmp_path / "docs.jsonl"
    docs_path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    cmd = build_command(ckpt, docs_path, out)
    # A process group of its own: SIGKILL reaches the engine core and workers too, as when a
    # machine dies; nothing gets to clean up.
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    kill_group_when(proc, lambda: committed_segments(out) >= 2, 400, "segment committed",
                    poll=0.05)
    done_at_kill = committed_segments(out)
    assert 2 <= done_at_kill < len(docs)

    with pytest.raises(BankError, match="unfinished bank build"):
        MemoryBank.open(out)
    result = subprocess.run([sys.executable, "-m", "vllm_msa.cli", "bank", "info", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "unfinished bank build" in result.stderr

    rerun = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    _, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr[-3000:]
    # The build stopped its engine before it exited: nothing of it is left in its group
    # (its exited engine processes are reaped by init within moments).
    deadline = time.monotonic() + 30
    while _group_alive(rerun.pid):
        assert time.monotonic() < deadline, "an engine process outlived the build"
        time.sleep(0.5)
    bank = MemoryBank.open(out, ckpt, dtype="float32")
    assert bank.verify() == []
    assert len(bank.manifest["segments"]) > done_at_kill

    # The resumed bank holds every document, each equal to the reference.
    from transformers import AutoTokenizer

    assert_bank_matches_reference(bank, ckpt, docs, AutoTokenizer.from_pretrained(ckpt), 1e-4)



def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_build_progress_moves_per_document():
    """`bank build`'s bar advances as vLLM finishes each document of a segment (vLLM drives
    `DocumentProgress` through `use_tqdm`), with tokens/s; a vLLM that drove nothing leaves
    the segment to `finish`."""
    import io

    from tqdm import tqdm

    from vllm_msa.bank.build import DocumentProgress

    out = io.StringIO()
    bar = tqdm(total=10, file=out, mininterval=0, unit="doc")
    progress = DocumentProgress(bar, time.monotonic() - 1.0, 0, 1000, 4)
    prompts = ["a", "b"]
    assert progress.factory(prompts, desc="Adding requests") is prompts  # passed through
    engine_bar = progress.factory(total=4, desc="Processed prompts")
    for n in (1, 2):
        engine_bar.update(1)
        assert bar.n == n
    assert "tok_s" in bar.postfix
    progress.finish()
    assert bar.n == 4
    progress.finish()
    assert bar.n == 4
