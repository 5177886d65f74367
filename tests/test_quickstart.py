"""The README's first command, `examples/quickstart.sh`, end to end on a CPU (its install step
skipped: CI's environment is the one it would set up): it builds, verifies and serves the
sample bank, answers offline and over HTTP, and prints only a short summary; vLLM's logs go
to files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_quickstart_prints_a_short_summary(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "SKIP_INSTALL": "1", "OUT": str(out), "PORT": str(free_port()),
           "VLLM_MSA_VENV": str(Path(sys.executable).parent.parent)}
    run = subprocess.run(["bash", "examples/quickstart.sh"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert len(lines) < 40, run.stdout  # a summary, not the engines' logs
    text = run.stdout
    assert "documents            24" in text  # the bank's info
    for how in ("offline (LLM class)", "vllm serve"):
        assert how in text
    assert text.count("question   Which river flooded the old mill?") == 2
    # Each router layer's picks, best first, the same offline and over HTTP.
    picks = [line.split("documents picked, ", 1)[1] for line in lines
             if "documents picked, " in line]
    assert len(picks) >= 2 and picks[0] == picks[len(picks) // 2]
    assert picks[0].startswith("layer 2: ") and " | layer 3: " in picks[0]
    for log in ("build", "offline", "server", "ask"):
        assert (out / "logs" / f"{log}.log").stat().st_size > 0
    assert "INFO" in (out / "logs" / "offline.log").read_text()  # vLLM's logs went here
