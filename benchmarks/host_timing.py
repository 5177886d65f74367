"""Host time per call of GPU work (what launching costs the CPU, not what the GPU takes)."""

from __future__ import annotations

import time
from collections.abc import Callable


def host_microseconds(fn: Callable[[], object], calls: int, warmup: int) -> float:
    """Mean host time of `fn()` in µs over `calls` calls, after `warmup` calls and a sync."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6
