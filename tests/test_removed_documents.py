"""Routing over a bank with removed documents (an edited bank's tombstones, served in its
stored layout with `RoutingIndex.live`) selects exactly what routing over the same bank
rewritten without them selects: the same ids, in the same order, with bit-identical scores,
never a removed document, and at most the live documents when a request asks for more. For
every reduce combination, the full-precision index (torch path and kernels), the 8-bit index
(bounded pass and re-score), and index shards; a replaced document (its id stored twice, the
old copy removed) included.

On CPU the torch path runs; the kernels under Triton's interpreter (the last test re-runs
this file there) and on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_compressed_index import COMBOS, compressed
from test_index_parallel import assert_same, msa_params, route_sharded
from triton_interpreter import DEVICE, INTERPRET, parent_only, rerun_under_interpreter
from vllm_msa.kernels.routing import route_batched

from vllm_msa.attention.bounded_routing import route_compressed
from vllm_msa.attention.index_parallel import IndexShard
from vllm_msa.attention.routing import RoutingIndex


def stored_and_rewritten(gen: torch.Generator, kv: int = 2, d: int = 16
                         ) -> tuple[RoutingIndex, RoutingIndex]:
    """A stored bank of 14 documents (ids 10..23, id 15 replaced: its removed copy stays at
    position 5, its live successor is the last document), 4 of them removed, as served (all
    stored rows, `live` flags) and as the rewritten bank (live documents only, same rows)."""
    counts = torch.randint(1, 5, (15,), generator=gen)
    ids = torch.tensor([*range(10, 24), 15])
    live = torch.ones(15, dtype=torch.bool)
    live[[2, 5, 8, 11]] = False  # id 15's old copy (position 5) among them
    keys = torch.randn(int(counts.sum()), kv, d, generator=gen)
    docs = torch.arange(15).repeat_interleave(counts)
    stored = RoutingIndex(keys, docs, ids, live=live)
    rows = live.repeat_interleave(counts)
    rewritten = RoutingIndex(keys[rows], torch.arange(int(live.sum())).repeat_interleave(
        counts[live]), ids[live])
    return stored, rewritten


def on_device(index: RoutingIndex) -> RoutingIndex:
    return RoutingIndex(index.routing_keys.to(DEVICE), index.chunk_doc_index.to(DEVICE),
                        index.doc_ids.to(DEVICE),
                        live=None if index.live is None else index.live.to(DEVICE))


def shards(index: RoutingIndex, ranks: int) -> list[RoutingIndex]:
    counts = torch.bincount(index.chunk_doc_index, minlength=index.num_documents)
    offsets = torch.zeros(index.num_documents + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    out = []
    for r in range(ranks):
        shard = IndexShard.of(offsets.numpy(), r, ranks)
        out.append(RoutingIndex.of_shard(index.routing_keys[shard.chunks].to(DEVICE),
                                         index.chunk_doc_index.to(DEVICE),
                                         index.doc_ids.to(DEVICE), offsets, shard,
                                         index.live))
    return out


def cases():
    return COMBOS[::5] if INTERPRET else COMBOS


@pytest.mark.parametrize(("head", "query", "chunk"), cases())
def test_removed_documents_are_never_selected(head, query, chunk):
    msa = msa_params(head, query, chunk)
    gen = torch.Generator().manual_seed(hash((head, query, chunk)) % 2**31)
    stored, rewritten = stored_and_rewritten(gen)
    stored, rewritten = on_device(stored), on_device(rewritten)
    qr = torch.randn(9, 4, 16, generator=gen).to(DEVICE)
    cu = [0, 3, 4, 9]
    for ks in ([1, 4, 11], [11, 11, 11], [3, 20, 15]):  # 11 live; 15 stored
        want = route_batched(qr, cu, rewritten, msa, ks)
        got = route_batched(qr, cu, stored, msa, ks)
        assert_same(got, want)
        removed = set(stored.doc_ids[~stored.live].tolist()) - {15}
        for selection, k in zip(got, ks, strict=True):
            assert selection.doc_ids.numel() == min(k, 11)
            assert not removed & set(selection.doc_ids.tolist())
        # The 8-bit index, its bounded pass and re-score, with the same mask.
        for dtype in ("int8",) if INTERPRET else ("int8", "fp8_e4m3"):
            assert_same(route_compressed(qr, cu, compressed(stored, dtype), msa, ks), want)
        # Shards: removed documents on every rank, a live count per rank.
        for ranks in (2, 3):
            for got in route_sharded(route_batched, qr, cu, shards(stored, ranks), msa, ks):
                assert_same(got, want)
            compressed_shards = [compressed(s) for s in shards(stored, ranks)]
            for got in route_sharded(route_compressed, qr, cu, compressed_shards, msa, ks):
                assert_same(got, want)


def test_a_replaced_document_stages_its_live_copy():
    """Selections name documents by id; the replaced id's sort key leads to its live copy's
    stored position (what staging reads), on every path."""
    from vllm_msa.kernels.routing import (
        decode_keys,
        prepare_index,
        route_batched_keys,
        selection_keys,
    )

    msa = msa_params("mean", "max", "max")
    gen = torch.Generator().manual_seed(8)
    stored, _ = stored_and_rewritten(gen)
    stored = on_device(stored)
    prep = prepare_index(stored)
    # A query aimed at the live copy of id 15 (the last stored document).
    target = stored.routing_keys[stored.chunk_doc_index == 14].mean(0)
    qr = (target.repeat_interleave(2, 0) * 5)[None].to(DEVICE)
    selection = route_batched(qr, [0, 1], stored, msa, [1])[0]
    assert selection.doc_ids.tolist() == [15]
    keys = selection_keys([selection], prep, 1)
    ids, _ = decode_keys(keys, prep)
    assert ids.tolist() == [[15]]
    assert prep.positions_by_tiebreak[keys & 0xFFFFFFFF].tolist() == [[14]]
    routed = route_batched_keys(qr, [0, 1], prep, msa, [1])
    if routed is not None:  # the kernels' own keys
        assert prep.positions_by_tiebreak[routed.keys & 0xFFFFFFFF].tolist() == [[14]]


def test_every_document_removed_selects_nothing():
    msa = msa_params("max", "mean", "mean")
    gen = torch.Generator().manual_seed(2)
    stored, _ = stored_and_rewritten(gen)
    gone = RoutingIndex(stored.routing_keys, stored.chunk_doc_index, stored.doc_ids,
                        live=torch.zeros(15, dtype=torch.bool))
    qr = torch.randn(2, 4, 16, generator=gen).to(DEVICE)
    for route, index in ((route_batched, on_device(gone)),
                         (route_compressed, compressed(on_device(gone)))):
        for selection in route(qr, [0, 2], index, msa, [4]):
            assert selection.doc_ids.numel() == 0


@pytest.mark.parametrize("ranks", [2])
def test_shard_with_only_removed_documents(ranks):
    """A rank whose documents are all removed hands up no candidates."""
    msa = msa_params("mean", "max", "max")
    gen = torch.Generator().manual_seed(4)
    stored, rewritten = stored_and_rewritten(gen)
    live = stored.live.clone()
    live[:7] = False  # the first rank's documents (about half the chunks)
    stored = RoutingIndex(stored.routing_keys, stored.chunk_doc_index, stored.doc_ids,
                          live=live)
    rows = live.repeat_interleave(torch.bincount(stored.chunk_doc_index, minlength=15))
    counts = torch.bincount(stored.chunk_doc_index, minlength=15)[live]
    rewritten = on_device(RoutingIndex(stored.routing_keys[rows], torch.arange(
        int(live.sum())).repeat_interleave(counts), stored.doc_ids[live]))
    qr = torch.randn(4, 4, 16, generator=gen).to(DEVICE)
    want = route_batched(qr, [0, 4], rewritten, msa, [5])
    for got in route_sharded(route_batched, qr, [0, 4], shards(stored, ranks), msa, [5]):
        assert_same(got, want)


@parent_only
def test_kernels_under_triton_interpreter():
    rerun_under_interpreter(__file__)


def test_read_ranges_cross_segments(checkpoints, tmp_path):
    """The exact keys a compressed index re-scores come in runs of neighbouring documents,
    which may span segments (an edited bank's appended ones, any bank over `--segment-mb`)."""
    from bank_checks import read_docs
    from conftest import SAMPLE_DOCS
    from fake_encoder import FakeEncoder

    from vllm_msa.bank import build_bank

    ckpt = checkpoints()
    bank = build_bank(ckpt, SAMPLE_DOCS, tmp_path / "bank", segment_mb=0.05, progress=False,
                      llm=FakeEncoder(ckpt))
    assert len(bank.manifest["segments"]) > 2 and len(read_docs(SAMPLE_DOCS)) == 24
    layer = bank.router_layers[0]
    whole = bank.layer(layer).routing_keys
    ranges = [(0, bank.num_chunks), (3, bank.num_chunks - 2), (5, 5)]
    got = bank.read_ranges(layer, "routing_keys", ranges)
    assert torch.equal(got, torch.cat([whole[a:b] for a, b in ranges]))


@pytest.mark.parametrize("index_dtype", ["auto", "int8"])
@pytest.mark.parametrize("shard", [(0, 1), (0, 2), (1, 2)])
def test_a_served_bank_switches_to_a_removal_as_a_fresh_load(checkpoints, tmp_path,
                                                            index_dtype, shard):
    """`ServedBank.apply_generation` (what a removal in a running server does) routes like
    loading the new generation from scratch, on every path and shard; a generation that
    stores other documents is refused."""
    from conftest import SAMPLE_DOCS
    from fake_encoder import FakeEncoder

    from vllm_msa.attention.tiers import ServedBank
    from vllm_msa.bank import BankError, MemoryBank, build_bank, compact_bank, remove_documents

    ckpt = checkpoints()
    path = tmp_path / "bank"
    build_bank(ckpt, SAMPLE_DOCS, path, segment_mb=0.05, progress=False,
               llm=FakeEncoder(ckpt))

    def load(bank):
        return ServedBank.load("b", bank, torch.device(DEVICE), slice(None), shard=shard,
                               index_dtype=index_dtype)

    served = load(MemoryBank.open(path))
    removed = remove_documents(path, [0, 7, 23])
    removed_ids, added_ids = served.apply_generation(MemoryBank.open(path))
    assert (sorted(removed_ids), added_ids) == ([0, 7, 23], [])
    fresh = load(removed)
    assert served.generation == fresh.generation == 1
    assert served.doc_position == fresh.doc_position
    assert served.num_documents == fresh.num_documents == 21
    msa = msa_params("mean", "max", "max")
    gen = torch.Generator().manual_seed(1)
    info = removed.model_info
    qr = torch.randn(6, 2 * info.num_kv_heads, info.head_dim, generator=gen).to(DEVICE)
    for layer in removed.router_layers:
        a, b = served.prepared_index(layer), fresh.prepared_index(layer)
        route = route_compressed if index_dtype != "auto" else route_batched
        # (a shard alone pads past its own documents for the exchange: stay within them)
        for ks in ([3, 21], [21, 30]) if shard[1] == 1 else ([3, 5],):
            assert_same(route(qr, [0, 2, 6], a, msa, ks), route(qr, [0, 2, 6], b, msa, ks))
    # A compaction moves stored documents: this worker cannot switch to it in place.
    compact_bank(path)
    with pytest.raises(BankError, match="reload"):
        served.apply_generation(MemoryBank.open(path))


GROWTH_CASES = [*((index_dtype, (0, 1), host) for index_dtype in ("auto", "int8")
                  for host in ("ram", "ram-reserve", "disk", "shared", "shared-reserve")),
                *((index_dtype, shard, "ram") for index_dtype in ("auto", "int8")
                  for shard in ((0, 2), (1, 2)))]
if INTERPRET:  # (the kernels route the grown index the same way in every tier layout)
    GROWTH_CASES = [case for case in GROWTH_CASES if case[1:] == ((0, 1), "ram-reserve")]


@pytest.mark.parametrize(("index_dtype", "shard", "host"), GROWTH_CASES)
def test_a_served_bank_grows_by_an_add_as_a_fresh_load(checkpoints, tmp_path, index_dtype,
                                                       shard, host):
    """An add (and a replace) applied to a served bank (`ServedBank.apply_generation`, what
    a live add does on every worker) serves what loading the new generation does: the same
    routing (ids, order, scores) over the grown index, the same host-tier rows for every
    chunk, the same staging tables. A Memory Parallel shard grows only on the last rank.
    With room reserved at load, the host tier and the index grow in place (no copy, the
    same shared files)."""
    from conftest import SAMPLE_DOCS
    from fake_encoder import FakeEncoder

    from vllm_msa.attention.tiers import ServedBank
    from vllm_msa.bank import MemoryBank, add_documents, build_bank, remove_documents

    ckpt = checkpoints()
    path = tmp_path / "bank"
    build_bank(ckpt, SAMPLE_DOCS, path, segment_mb=0.05, progress=False,
               llm=FakeEncoder(ckpt))
    cache = 1e6 if host == "disk" else None

    def load(bank, where=shard):
        return ServedBank.load("b", bank, torch.device(DEVICE), slice(None), shard=where,
                               index_dtype=index_dtype, host_cache_bytes=cache,
                               share_host=host.startswith("shared"),
                               reserve_chunks=40 if host.endswith("reserve") else 0)

    served = load(MemoryBank.open(path))
    before = served.shard
    old_files = list(served.shared_files)
    assert bool(old_files) == host.startswith("shared")
    layer0 = served.bank.router_layers[0]
    where = served.host_keys[layer0].data_ptr() if host != "disk" else None

    def index_ptr():
        idx = served.index[layer0]
        return (idx.keys.values if index_dtype != "auto" else idx.routing_keys).data_ptr()

    index_where = index_ptr()
    remove_documents(path, [3])
    docs = tmp_path / "more.jsonl"
    docs.write_text('{"id": 99, "text": "A new document about lighthouses and their '
                    'keepers, long enough for two chunks of the tiny model or more."}\n'
                    '{"id": 5, "text": "Document five, replaced by a new text."}\n')
    grown = add_documents(path, ckpt, docs, replace=True, progress=False,
                          llm=FakeEncoder(ckpt))
    removed_ids, added_ids = served.apply_generation(MemoryBank.open(path))
    assert (removed_ids, added_ids) == ([3, 5], [99, 5])
    if host.endswith("reserve"):  # grown in its room: the host tier and the index
        assert served.host_keys[layer0].data_ptr() == where
        assert served.shared_files == old_files
        assert index_ptr() == index_where
    elif host == "shared":  # the grown tier is shared again, under the new generation's name
        assert len(served.shared_files) == len(old_files)
        assert not set(served.shared_files) & set(old_files)
        assert all(Path(f).exists() for f in served.shared_files)
    fresh = load(grown, (0, 1))
    assert served.generation == fresh.generation == grown.generation
    assert served.doc_position == fresh.doc_position
    assert served.chunk_offsets == fresh.chunk_offsets
    assert served.num_documents == fresh.num_documents
    last = shard[0] == shard[1] - 1
    assert served.shard.documents.start == before.documents.start
    assert served.shard.documents.stop == (grown.physical.doc_ids.numel() if last
                                           else before.documents.stop)
    ids = torch.tensor([99, 5, 0, 23])
    assert all(torch.equal(a, b) for a, b in zip(
        served.selected_chunks(ids[None]), fresh.selected_chunks(ids[None]), strict=True))
    msa = msa_params("mean", "max", "max")
    gen = torch.Generator().manual_seed(2)
    info = grown.model_info
    qr = torch.randn(6, 2 * info.num_kv_heads, info.head_dim, generator=gen).to(DEVICE)
    for layer in grown.router_layers:
        if host != "disk":
            for a, b in ((served.host_keys, fresh.host_keys),
                         (served.host_values, fresh.host_values)):
                assert torch.equal(a[layer], b[layer])
        else:  # the disk tier reads the added documents when they are selected
            for cache_of in (served.host_cache, fresh.host_cache):
                cache_of.ensure(layer, [served.doc_position[99], served.doc_position[5]])
            assert torch.equal(served.host_cache.slot_table(layer) >= 0,
                               fresh.host_cache.slot_table(layer) >= 0)
        if shard[1] == 1:
            a, b = served.prepared_index(layer), fresh.prepared_index(layer)
            route = route_compressed if index_dtype != "auto" else route_batched
            for ks in ([3, 25], [25, 30]):
                assert_same(route(qr, [0, 2, 6], a, msa, ks),
                            route(qr, [0, 2, 6], b, msa, ks))
            continue
        # A shard holds the fresh whole index's rows of its (grown) chunks.
        mine, whole = served.index[layer], fresh.index[layer]
        if index_dtype == "auto":
            assert torch.equal(mine.routing_keys, whole.routing_keys[served.shard.chunks])
        else:
            for part in ("values", "scale", "residual"):
                assert torch.equal(getattr(mine.keys, part),
                                   getattr(whole.keys, part)[served.shard.chunks])
            assert mine.exact.bank.generation == grown.generation
        assert torch.equal((mine.layout if index_dtype != "auto" else mine).live,
                           grown.physical.live[served.shard.documents].to(DEVICE))


def test_a_selection_located_before_a_removal_stages_what_it_selected(checkpoints, tmp_path):
    """What a running request selected stays stageable after its documents are removed or
    replaced (`ServedBank.locate`, fixed by `MemoryRuntime.locate_selections` before the
    switch): the stored rows it names still hold those documents. The new generation
    itself never stages a removed id."""
    from conftest import SAMPLE_DOCS
    from fake_encoder import FakeEncoder

    from vllm_msa.attention.tiers import ServedBank
    from vllm_msa.bank import MemoryBank, add_documents, build_bank, remove_documents

    ckpt = checkpoints()
    path = tmp_path / "bank"
    build_bank(ckpt, SAMPLE_DOCS, path, progress=False, llm=FakeEncoder(ckpt))
    served = ServedBank.load("b", MemoryBank.open(path), torch.device(DEVICE), slice(None))
    layer = served.bank.router_layers[0]
    ids = torch.tensor([[4, 9, 17]], device=DEVICE)
    located = served.locate(ids)
    rows = [served.host_keys[layer][int(a):int(a + n)].clone()
            for a, n in zip(located[1][0], located[2][0], strict=True)]
    remove_documents(path, [9])
    docs = tmp_path / "more.jsonl"
    docs.write_text('{"id": 17, "text": "Seventeen, rewritten."}\n')
    add_documents(path, ckpt, docs, replace=True, progress=False, llm=FakeEncoder(ckpt))
    served.apply_generation(MemoryBank.open(path))
    for (a, n), want in zip(zip(located[1][0], located[2][0], strict=True), rows, strict=True):
        assert torch.equal(served.host_keys[layer][int(a):int(a + n)], want)
    positions, _, counts = served.locate(ids)
    assert positions[0, 1] == -1 and counts[0, 1] == 0  # 9: removed
    assert positions[0, 2] == served.doc_position[17] != located[0][0, 2]  # 17: its new copy


@pytest.mark.parametrize("host", ["ram", "disk"])
def test_a_preempted_request_restages_what_it_selected_after_an_edit(checkpoints, tmp_path,
                                                                     host):
    """Staging again after a removal and a replace (a request preempted across the switch:
    `MemoryRuntime.locate_selections`, then `paths.stage_selected`) stages exactly the rows
    it selected, beside a request admitted after the switch that stages the new copy; from
    RAM and through the disk tier."""
    from types import SimpleNamespace

    from conftest import SAMPLE_DOCS
    from fake_encoder import FakeEncoder

    from vllm_msa.attention.paths import stage_selected
    from vllm_msa.attention.requests import MemoryRequest
    from vllm_msa.attention.routing import Selection
    from vllm_msa.attention.runtime import MemoryRuntime
    from vllm_msa.attention.staging import StagingPool
    from vllm_msa.attention.tiers import ServedBank
    from vllm_msa.bank import MemoryBank, add_documents, build_bank, remove_documents
    from vllm_msa.options import RequestOptions

    ckpt = checkpoints()
    path = tmp_path / "bank"
    build_bank(ckpt, SAMPLE_DOCS, path, progress=False, llm=FakeEncoder(ckpt))
    served = ServedBank.load("b", MemoryBank.open(path), torch.device(DEVICE), slice(None),
                             host_cache_bytes=1e6 if host == "disk" else None)
    layer = served.bank.router_layers[0]
    whole = served.bank.layer(layer)  # (the stored K̄ of every chunk, before the edit)
    offsets = served.bank.doc_chunk_offsets.tolist()
    position = {d: i for i, d in enumerate(served.bank.doc_ids)}

    def rows_of(ids):
        return torch.cat([whole.keys[offsets[position[d]]:offsets[position[d] + 1]]
                          for d in sorted(ids)])

    options = RequestOptions("b", 3, ((0, 1),), False)
    old = MemoryRequest("old", options, served)
    old.selections[layer] = Selection(torch.tensor([17, 9, 4]), torch.zeros(3))
    runtime = SimpleNamespace(requests={"old": old},
                              pool=StagingPool(256, 2, whole.keys.shape[-1], torch.float32,
                                               torch.device(DEVICE)))
    MemoryRuntime.locate_selections(runtime, "b")  # what apply_generation does first
    remove_documents(path, [9])
    docs = tmp_path / "more.jsonl"
    docs.write_text('{"id": 17, "text": "Seventeen, rewritten."}\n')
    edited = add_documents(path, ckpt, docs, replace=True, progress=False,
                           llm=FakeEncoder(ckpt))
    served.apply_generation(MemoryBank.open(path))
    new = MemoryRequest("new", options, served)
    new.selections[layer] = Selection(torch.tensor([17, 4]), torch.zeros(2))
    width = served.worst_case_chunks(3)  # (what staging reserves per request)
    staged = stage_selected(runtime, served, layer, [old, new], [("old", width),
                                                                 ("new", width)])
    got_old, _ = runtime.pool.read(staged[0])
    assert torch.equal(got_old.cpu(), rows_of([4, 9, 17]))  # what it selected, 9 and old 17
    got_new, _ = runtime.pool.read(staged[1])
    new_17 = edited.layer(layer).keys[edited.chunk_doc_ids == 17]
    assert torch.equal(got_new.cpu(), torch.cat([rows_of([4]), new_17]))
