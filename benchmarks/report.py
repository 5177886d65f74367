"""What every benchmark here reports with: the card's name, a file-name slug of it, and
matplotlib (optional: without it a benchmark prints its table and skips the plot)."""

from __future__ import annotations

import platform
import re
import subprocess
from typing import Any


def nvidia_smi(query: str) -> str:
    """One `nvidia-smi --query-gpu` field of the first GPU, or "" without one."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return ""


def card_name() -> str:
    """The GPU's name (e.g. "NVIDIA H100 80GB HBM3"), or the CPU's on a machine without one."""
    name = nvidia_smi("name")
    if name:
        return name
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"CPU ({platform.processor() or platform.machine()})"


def card_slug(name: str) -> str:
    """`name` as a file-name part: "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def pyplot() -> Any | None:
    """matplotlib.pyplot on the file-only Agg backend, or None where matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def device_copy_bandwidth(num_bytes: int, reps: int = 10) -> float | None:
    """The HBM baseline: bytes read + written per second by a device-to-device copy of
    `num_bytes` (capped at 4 GiB), median of `reps` timed with CUDA events; None on CPU."""
    import statistics

    import torch

    if not torch.cuda.is_available():
        return None
    num_bytes = min(num_bytes, 4 << 30)

    def seconds() -> float:  # the buffers are freed on return
        src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        return statistics.median(event_seconds(lambda: dst.copy_(src), reps, warmup=3))

    rate = 2 * num_bytes / seconds()
    torch.cuda.empty_cache()
    return rate


def matmul_rate(reps: int = 20) -> float | None:
    """The compute baseline: dense bf16 matmul FLOP/s (8192^3), median of `reps`; None on
    CPU."""
    import statistics

    import torch

    if not torch.cuda.is_available():
        return None
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    seconds = statistics.median(event_seconds(lambda: a @ b, reps, warmup=3))
    return 2 * n**3 / seconds


def event_seconds(fn: Any, reps: int, warmup: int) -> list[float]:
    """GPU seconds of `reps` calls of fn (a CUDA event pair each, from an idle GPU)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def trace_events(prof: Any) -> list[dict]:
    """A torch.profiler run's Chrome-trace events: the device's kernels, copies and memsets
    there carry their own durations (also those replayed from CUDA graphs), which the
    profiler's op tree does not hold for launches outside torch ops (Triton's)."""
    import json
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as trace:
            return json.load(trace)["traceEvents"]


DEVICE_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")


def device_seconds_by_name(prof: Any) -> dict[str, float]:
    """Seconds of device time per kernel (copy, memset) name in a profiled run."""
    out: dict[str, float] = {}
    for e in trace_events(prof):
        if e.get("ph") == "X" and e.get("cat", "") in DEVICE_EVENTS:
            name = e["name"][:80]
            out[name] = out.get(name, 0.0) + e["dur"] / 1e6
    return out


def host_seconds_by_function(fn: Any) -> tuple[Any, dict[str, float]]:
    """(what `fn` returns, each function's own host time in seconds while it ran, under
    cProfile): C calls (a CUDA runtime wait, a pinned allocation) count under their own names.
    Names are `path:line(function)`, the path from its package (after site-packages)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    result = profiler.runcall(fn)
    return result, {f"{path.rpartition('site-packages/')[2]}:{line}({name})": stat[2]
                    for (path, line, name), stat in pstats.Stats(profiler).stats.items()}
