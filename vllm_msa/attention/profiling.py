"""Named ranges around the router layers' phases (routing, fetch, memory attention), for
torch.profiler: `benchmarks/ttft.py` adds up the GPU time of the kernels launched inside each.
Off unless VLLM_MSA_PROFILE_RANGES=1: a range costs a few microseconds of host time, and a
prefill step has three per router layer."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

RANGES = os.environ.get("VLLM_MSA_PROFILE_RANGES", "0") == "1"
PHASES = ("msa.route", "msa.fetch", "msa.attention")


def phase(name: str) -> Any:
    return torch.profiler.record_function(name) if RANGES else contextlib.nullcontext()
