"""Route vllm-msa's log records through vLLM's logging.

vLLM configures only the `vllm` logger (its handler, format and `VLLM_LOGGING_LEVEL`), and in
each process only once its engine, engine core or worker starts, which can be after plugins
load. A plugin's `logging.getLogger("vllm_msa...")` falls through to Python's root logger
instead, which drops INFO: the bank-load, staging-pool and kernel warm-up lines never reached a
`vllm serve` console. With `follow_vllm_logging`, `vllm_msa` records take vLLM's path at the
moment they are logged, so they appear (or not) exactly as vLLM's own do.
"""

from __future__ import annotations

import logging


class _ToVllmLogger(logging.Handler):
    """Hands each record to the `vllm` logger, at the level vLLM's logging has then (its
    handlers, or the root logger's where vLLM's logging is not configured)."""

    def emit(self, record: logging.LogRecord) -> None:
        vllm = logging.getLogger("vllm")
        if vllm.isEnabledFor(record.levelno):
            vllm.handle(record)


def follow_vllm_logging() -> None:
    """Make the `vllm_msa` logger follow vLLM's logging (idempotent). Left alone where the
    user has given it handlers of their own."""
    ours = logging.getLogger("vllm_msa")
    if ours.handlers:
        return
    ours.addHandler(_ToVllmLogger())
    ours.setLevel(logging.DEBUG)  # the level check happens in the handler, against vLLM's
    ours.propagate = False  # vLLM's path already ends where it should: no second copy
