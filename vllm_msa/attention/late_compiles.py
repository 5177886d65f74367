"""Triton compiles of the plugin's kernels after the start-up warm-up, counted and logged.

A compile in the middle of serving stalls every request of that step for a second or more;
the warm-up (`warmup.py`) exists so that none happens. This hook (chained to whatever hook
vLLM's own JIT monitor installed) notes each one that still does, with a warning naming the
kernel, so that a latency spike has a name in the log and in `msa_state()["late_compiles"]`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger("vllm_msa")


def watch_late_compiles(record: list[dict[str, Any]]) -> bool:
    """Append every later compile of a `vllm_msa` kernel to `record` (kernel name, wall time);
    False where Triton has no such hook."""
    try:
        from triton import knobs
    except ImportError:
        return False
    previous = knobs.runtime.jit_post_compile_hook

    def hook(**kwargs: Any) -> Any:
        fn = kwargs.get("fn")
        source = getattr(fn, "fn", fn)
        module = getattr(source, "__module__", "") or ""
        if module.startswith("vllm_msa"):
            name = f"{module}.{getattr(source, '__name__', '?')}"
            record.append({"kernel": name, "time": time.time()})
            logger.warning("MSA kernel %s compiled while serving (a variant the start-up "
                           "warm-up did not reach): this step waited for it", name)
        return previous(**kwargs) if previous is not None else None

    knobs.runtime.jit_post_compile_hook = hook
    return True
