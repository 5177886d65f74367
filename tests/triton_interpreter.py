"""Kernel tests on a machine without a GPU: rerun a test file in a child process with
TRITON_INTERPRET=1 (Triton picks the interpreter when a kernel is defined, so it cannot be
switched on inside a process that has already imported the kernel)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# Kernel tests: run on a GPU, or on CPU in the interpreter's child process.
needs_kernel = pytest.mark.skipif(not (HAS_CUDA or INTERPRET),
                                  reason="needs a GPU or TRITON_INTERPRET=1")
# The test that starts that child process: only on a CPU machine, outside the interpreter.
parent_only = pytest.mark.skipif(HAS_CUDA or INTERPRET, reason="the kernel runs directly here")


def rerun_under_interpreter(test_file: str) -> None:
    """Run every test of `test_file` but this one under the interpreter; all must pass and
    none may be skipped (a skip would hide a kernel that never ran)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file,
         "-k", "not interpreter"], env=env, capture_output=True, text=True, timeout=900,
        cwd=os.path.dirname(test_file))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1]
