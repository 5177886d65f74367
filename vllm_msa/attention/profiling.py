"""Named ranges around the router layers' phases (routing, fetch, memory attention).

For torch.profiler, `benchmarks/ttft.py` adds up the GPU time of the kernels launched inside
each range; without a profiler it reads `host_seconds`, the host time spent inside each phase
(perf_counter), so a run that is not slowed down by profiling still says where a host-bound
step's time goes. Off unless VLLM_MSA_PROFILE_RANGES=1: a range costs a few microseconds of
host time, and a prefill step has three per router layer."""

from __future__ import annotations

import collections
import contextlib
import os
import time
from collections.abc import Iterator

import torch

RANGES = os.environ.get("VLLM_MSA_PROFILE_RANGES", "0") == "1"
PHASES = ("msa.route", "msa.fetch", "msa.attention")

# Host seconds inside each phase since the last reset (only while RANGES is on).
host_seconds: collections.Counter[str] = collections.Counter()


@contextlib.contextmanager
def _timed(name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        host_seconds[name] += time.perf_counter() - start


def phase(name: str) -> contextlib.AbstractContextManager[None]:
    return _timed(name) if RANGES else contextlib.nullcontext()
