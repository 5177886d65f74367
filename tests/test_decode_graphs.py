"""The buffers a full decode graph's memory attention reads (vllm_msa/attention/decode_graphs.py)
and the runtime's rule for which steps may replay one. Plain torch on the CPU: what the kernel
reads at replay is exactly these tensors, so they are checked against the batch they describe."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_msa.attention.decode_graphs import DecodeGraphs
from vllm_msa.attention.staging import Staged
from vllm_msa.serving.options import SPAN_KEY

LAYERS = [3, 5]


@dataclass
class Request:
    req_id: str
    staged: dict = field(default_factory=dict)


@dataclass
class Row:
    request: Request
    token_start: int
    num_tokens: int = 1


def staged(slots: torch.Tensor, used: int) -> Staged:
    """A reservation of `slots`, `used` of them filled."""
    return Staged(slots[None], 0, slots.numel(), torch.tensor([used]))


def make_rows() -> list[Row]:
    """Three memory requests at batch rows 0, 2 and 3 (row 1 is a plain request), each with
    its own slot reservation per layer, partly used."""
    rows = []
    for i, (batch_row, counts) in enumerate([(0, (2, 3)), (2, (4, 1)), (3, (1, 2))]):
        request = Request(f"r{i}")
        for layer, n in zip(LAYERS, counts, strict=True):
            request.staged[layer] = staged(torch.arange(100 * i + 10 * layer,
                                                        100 * i + 10 * layer + n), n - i % 2)
        rows.append(Row(request, batch_row))
    return rows


def test_buffers_describe_the_batch():
    graphs = DecodeGraphs(LAYERS, max_rows=6, max_slots=32, device=torch.device("cpu"))
    rows = make_rows()
    graphs.prepare(rows, pool_version=1)
    for i, layer in enumerate(LAYERS):
        tiles = graphs.tiles[i].tolist()
        start = 0
        for row in rows:
            slots = row.request.staged[layer].slots
            lo, hi = start, start + slots.numel()
            # the tile reads its count of staged chunks at counts[layer, its row]
            assert tiles[row.token_start] == [row.token_start, 1, lo, hi, row.token_start]
            assert graphs.slots[i, lo:hi].tolist() == slots.tolist()
            assert graphs.counts[i, row.token_start] == row.request.staged[layer].count
            start = hi
        for empty in (1, 4, 5):  # the plain row and padding: no memory, output left alone
            assert tiles[empty] == [0, 0, 0, 0, -1]


def test_buffers_follow_batch_changes_only():
    graphs = DecodeGraphs(LAYERS, max_rows=6, max_slots=32, device=torch.device("cpu"))
    rows = make_rows()
    graphs.prepare(rows, pool_version=1)
    graphs.slots.fill_(-1)  # a rewrite would restore the slots
    graphs.prepare(rows, pool_version=1)  # same batch, same staging: nothing rewritten
    assert (graphs.slots == -1).all()
    graphs.prepare(rows[1:], pool_version=1)  # a request left: rewritten, its tile emptied
    assert graphs.tiles[0, 0].tolist() == [0, 0, 0, 0, -1]
    assert graphs.tiles[0, 2].tolist() == [2, 1, 0, 4, 2]
    graphs.slots.fill_(-1)
    graphs.prepare(rows[1:], pool_version=2)  # restaged (pool changed): rewritten
    assert graphs.slots[0, :4].tolist() == rows[1].request.staged[3].slots.tolist()


def test_only_fully_staged_steps_may_replay_full_graphs():
    """A step may replay a full graph only if no request in it routes or stages."""
    from vllm_msa.attention.runtime import MemoryRuntime

    runtime = MemoryRuntime.__new__(MemoryRuntime)
    runtime.msa = type("MSA", (), {"router_layers": LAYERS})()
    full = Request("staged", {layer: staged(torch.arange(2), 2) for layer in LAYERS})
    half = Request("half", {LAYERS[0]: staged(torch.arange(2), 2)})  # e.g. preempted
    runtime.requests = {"staged": full, "half": half}
    admitted = {"msa_bank": "docs", "msa_top_k": 4, SPAN_KEY: [[1, 5]]}  # as the front end
    plain, new = ("plain", None), ("new", admitted)
    assert not runtime.needs_eager_step([("staged", admitted), plain])
    assert runtime.needs_eager_step([("staged", admitted), new])  # routes
    assert runtime.needs_eager_step([("half", admitted)])  # stages
