"""The buffers a full decode graph's memory attention reads (vllm_msa/attention/decode_graphs.py)
and the runtime's rule for which steps may replay one. Plain torch on the CPU: what the kernel
reads at replay is exactly these tensors, so they are checked against the batch they describe."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch

from vllm_msa.attention.capture import EncodeCaptures
from vllm_msa.attention.decode_graphs import DecodeGraphs
from vllm_msa.attention.fused import FusedAttention
from vllm_msa.attention.staging import Staged, StagingPool
from vllm_msa.options import SPAN_KEY

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
    runtime.router_layers = list(LAYERS)  # (one pipeline stage: all of them)
    runtime.pool = StagingPool(4, 1, 8, torch.float32, torch.device("cpu"))
    runtime._settled, runtime.num_preempted = set(), 0
    full = Request("staged", {layer: staged(torch.arange(2), 2) for layer in LAYERS})
    half = Request("half", {LAYERS[0]: staged(torch.arange(2), 2)})  # e.g. preempted
    runtime.requests = {"staged": full, "half": half}
    admitted = {"msa_bank": "docs", "msa_top_k": 4, SPAN_KEY: [[1, 5]]}  # as the front end
    plain, new = ("plain", None), ("new", admitted)
    assert not runtime.needs_eager_step([("staged", admitted), plain])
    assert runtime.needs_eager_step([("staged", admitted), new])  # routes
    assert runtime.needs_eager_step([("half", admitted)])  # stages
    # What was learnt: plain and fully staged requests need no check in later steps ...
    assert runtime.all_settled(["staged", "plain"])
    assert not runtime.all_settled(["staged", "new"])
    assert not runtime.all_settled(["half"])
    # ... until preemption drops a request's staged memory, or it finishes.
    runtime.preempt(["staged"])
    assert not runtime.all_settled(["staged"])
    assert runtime.needs_eager_step([("staged", admitted)])
    runtime.finish(["plain"])
    assert not runtime.all_settled(["plain"])
    # Staged outside the pool (it was full): a full graph reads pool slots only, so such a
    # request keeps every step eager (it crashed the engine's decode-graph setup before).
    private = Staged(None, 0, 2, torch.tensor([2]), private=(torch.zeros(2, 1, 8),) * 2)
    runtime.requests["spilled"] = Request("spilled", {LAYERS[0]: staged(torch.arange(2), 2),
                                                      LAYERS[1]: private})
    for _ in range(2):
        assert runtime.needs_eager_step([("spilled", admitted)])
    assert not runtime.all_settled(["spilled"])
    # A document encoded for a live add: its prefill is captured by the op's Python.
    encode = {"msa_encode": {"bank": "docs", "key": "k", "nonce": "n"}}
    assert runtime.needs_eager_step([("encoding", encode)])
    assert not runtime.all_settled(["encoding"])


def make_decode_runtime(template_len: int = 3):
    """A runtime with full decode graphs and two fully staged memory requests (CPU)."""
    from vllm_msa.attention.requests import MemoryRequest
    from vllm_msa.attention.runtime import MemoryRuntime
    from vllm_msa.attention.step_metrics import StepMetrics
    from vllm_msa.options import RequestOptions

    runtime = MemoryRuntime.__new__(MemoryRuntime)
    runtime.msa = type("MSA", (), {"router_layers": LAYERS})()
    runtime.router_layers = list(LAYERS)  # (one pipeline stage: all of them)
    runtime.pool = StagingPool(16, 1, 8, torch.float32, torch.device("cpu"))
    runtime.graphs = DecodeGraphs(LAYERS, max_rows=4, max_slots=16, device=torch.device("cpu"))
    runtime._settled, runtime._last_full, runtime.requests = set(), None, {}
    runtime.memory_steps = collections.Counter()
    runtime.fused, runtime._uploads = FusedAttention(), {}
    runtime.metrics = StepMetrics(torch.device("cpu"))
    runtime.encodes = EncodeCaptures(runtime.msa, LAYERS, slice(None), 1, 8, torch.float32)
    bank = type("Bank", (), {"template_len": template_len})()
    options = RequestOptions("docs", 2, ((4, 6),), False)
    for i in range(2):
        request = runtime.requests[f"r{i}"] = MemoryRequest(f"r{i}", options, bank)
        request.selections = dict.fromkeys(LAYERS, None)
        for layer in LAYERS:
            request.staged[layer] = staged(torch.arange(4 * i, 4 * i + 2), 2)
    return runtime


def test_steady_decode_reuses_the_last_full_graph_step():
    """A full-graph step with the last one's batch key and staging pool keeps its buffers and
    token spans without building rows; anything else builds them."""
    runtime = make_decode_runtime()
    calls = []

    def rows(first_position: int):
        def build():
            calls.append(first_position)
            # r0 at batch row 0, a plain request at row 1, r1 at row 2; one token each
            return [("r0", None, 0, 0, 1, first_position), ("plain", None, 1, 1, 1, 40),
                    ("r1", None, 2, 2, 1, first_position)]
        return build

    key = (("r0", "plain", "r1"), bytes(range(4)))
    runtime.begin_step(rows(10), full_graph=True, batch_key=key)
    assert calls == [10] and runtime._offsets == [(0, 1), (2, 3)]
    assert [row.request.req_id for row in runtime.rows] == ["r0", "r1"]
    runtime.end_step()
    runtime.begin_step(rows(11), full_graph=True, batch_key=key)  # steady decode
    assert calls == [10] and runtime._offsets == [(0, 1), (2, 3)] and runtime.rows == []
    assert runtime.memory_steps == {"full_graph": 2} and runtime.graphs.replays == 2
    runtime.end_step()
    runtime.begin_step(rows(12), full_graph=True, batch_key=(key[0], bytes(4)))  # new layout
    assert calls == [10, 12]
    runtime.pool.version += 1  # slots taken or given back
    runtime.begin_step(rows(13), full_graph=True, batch_key=(key[0], bytes(4)))
    assert calls == [10, 12, 13]
    assert "plain" in runtime._settled  # seen once: its arguments are not parsed again
    runtime.begin_step(rows(14), full_graph=False)  # a piecewise step forgets the last one
    runtime.begin_step(rows(15), full_graph=True, batch_key=(key[0], bytes(4)))
    assert calls == [10, 12, 13, 14, 15]
    assert runtime.memory_steps == {"full_graph": 5, "op_python": 1}
    # Steps of plain requests only are reused too, and not counted as steps with memory.
    plain_only = (("plain",), bytes(2))
    for position in (16, 17):
        runtime.begin_step(lambda p=position: calls.append(p) or [("plain", None, 0, 0, 1, 40)],
                           full_graph=True, batch_key=plain_only)
    assert calls[-1] == 16 and runtime._offsets is None
    assert runtime.memory_steps == {"full_graph": 5, "op_python": 1}


def test_a_step_in_a_template_head_is_not_reused():
    """Rows whose token is still in the template head have no RoPE offset yet: their spans
    change as they advance, so such a step is never the base of a shortcut."""
    runtime = make_decode_runtime(template_len=12)
    built = []

    def rows(first_position: int):
        def build():
            built.append(first_position)
            return [("r0", None, 0, 0, 1, first_position)]
        return build

    key = (("r0",), bytes(2))
    runtime.begin_step(rows(11), full_graph=True, batch_key=key)
    assert runtime._offsets is None  # token 11 is in the 12-token head
    runtime.begin_step(rows(12), full_graph=True, batch_key=key)
    assert built == [11, 12] and runtime._offsets == [(0, 1)]
