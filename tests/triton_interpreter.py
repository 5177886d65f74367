"""Kernel tests on a machine without a GPU: rerun a test file in a child process with
TRITON_INTERPRET=1 (Triton picks the interpreter when a kernel is defined, so it cannot be
switched on inside a process that has already imported the kernel)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


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
