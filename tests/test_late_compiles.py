"""A Triton compile of one of the plugin's kernels after the warm-up is recorded and logged,
and the hook it replaces (vLLM's JIT monitor) still runs; other kernels are not recorded."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

triton = pytest.importorskip("triton")


def test_late_compiles_are_recorded_and_chained(monkeypatch, caplog):
    from triton import knobs

    from vllm_msa.attention.late_compiles import watch_late_compiles

    seen = []
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook",
                        lambda **kwargs: seen.append(kwargs["fn"]))
    record: list[dict] = []
    assert watch_late_compiles(record)

    def ours():
        pass

    def theirs():
        pass

    ours.__module__, theirs.__module__ = "vllm_msa.kernels.routing", "vllm.attention"
    with caplog.at_level(logging.WARNING, logger="vllm_msa"):
        knobs.runtime.jit_post_compile_hook(fn=SimpleNamespace(fn=ours), key="k")
        knobs.runtime.jit_post_compile_hook(fn=SimpleNamespace(fn=theirs), key="k")
    assert [r["kernel"] for r in record] == ["vllm_msa.kernels.routing.ours"]
    assert len(seen) == 2  # (the previous hook saw both)
    assert "vllm_msa.kernels.routing.ours compiled while serving" in caplog.text
