"""`bank synth` and `bank convert` advance their bars by chunks as the work is done (pieces of a
layer generated, a layer converted), with a rate and an ETA, never a segment at a time; a
resumed run starts the bar where the finished segments left it."""

from __future__ import annotations

from typing import ClassVar

import pytest

from vllm_msa.bank import convert, synth


class RecordingBar:
    """tqdm's surface the bank tools use, recording each step."""

    made: ClassVar[list[RecordingBar]] = []

    def __init__(self, total=None, initial=0, unit="it", **kwargs):
        self.total, self.n, self.unit, self.steps = total, initial, unit, []
        RecordingBar.made.append(self)

    def update(self, n=1):
        self.n += n
        self.steps.append(n)

    def close(self):
        pass


@pytest.fixture
def bars(monkeypatch):
    RecordingBar.made = []
    monkeypatch.setattr(synth, "tqdm", RecordingBar)
    monkeypatch.setattr(convert, "tqdm", RecordingBar)
    return RecordingBar.made


def test_synth_and_convert_advance_by_chunks(checkpoints, tmp_path, bars, monkeypatch):
    monkeypatch.setattr(synth, "_PIECE_ELEMS", 2 * 64 * 16)  # pieces of 16 chunks
    plan = synth.plan_synth(checkpoints(), 6_000, 100, dtype="float32", segment_mb=0.05)
    bank = synth.synth_bank(plan, tmp_path / "synth")
    segments = len(bank.manifest["segments"])
    assert segments >= 2
    chunks = sum(s["chunks"] for s in bank.manifest["segments"])
    (bar,) = bars
    assert bar.unit == "chunk" and bar.total == chunks
    assert bar.n == pytest.approx(chunks)
    # Many steps per segment: each 16-chunk piece of each router layer, then the write.
    assert len(bar.steps) > 4 * segments and max(bar.steps) < chunks / segments

    bars.clear()
    converted = convert.convert_bank(tmp_path / "synth", tmp_path / "fp8", "fp8_e4m3")
    (bar,) = bars
    assert bar.unit == "chunk" and bar.total == chunks and bar.n == pytest.approx(chunks)
    layers = len(converted.model_info.router_layers)
    assert len(bar.steps) == segments * layers  # a layer of a segment at a time
