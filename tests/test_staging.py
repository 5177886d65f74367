"""Staging without the host waiting for routing (vllm_msa/attention/staging.py, tiers.py):
documents -> chunk rows on the device, worst-case slot reservations, the copy into the pool.
Compared with the host-side chunk list (`ServedBank.chunk_indices`, ascending document id then
chunk) and with plain indexing of the host K/V, on random banks and selections."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_msa.attention.index_parallel import IndexShard
from vllm_msa.attention.staging import StagingPool, chunk_rows
from vllm_msa.attention.tiers import ServedBank
from vllm_msa.attention.uploads import ranges, upload


def random_bank(seed: int, num_docs: int = 40) -> ServedBank:
    """A served bank's tables only: shuffled, sparse document ids with 1-9 chunks each."""
    rng = random.Random(seed)
    doc_ids = rng.sample(range(10 * num_docs), num_docs)
    offsets = np.concatenate([[0], np.cumsum([rng.randint(1, 9) for _ in doc_ids])])
    return ServedBank(name="b", bank=SimpleNamespace(doc_ids=doc_ids), index={}, host_keys={},
                      host_values={}, doc_position={d: i for i, d in enumerate(doc_ids)},
                      chunk_offsets=offsets.tolist(), shard=IndexShard.whole(offsets))


def naive_rows(starts, counts, width):
    rows = torch.full((starts.shape[0], width), -1, dtype=torch.int64)
    for r in range(starts.shape[0]):
        flat = [s + i for s, c in zip(starts[r].tolist(), counts[r].tolist(), strict=True)
                for i in range(c)]
        rows[r, :len(flat)] = torch.tensor(flat, dtype=torch.int64)
    return rows


@pytest.mark.parametrize("seed", range(5))
def test_chunk_rows_concatenates_each_requests_documents(seed):
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 1000, (4, 6), generator=g)
    counts = torch.randint(0, 5, (4, 6), generator=g)  # zeros: padding entries
    width = int(counts.sum(1).max()) + 3
    rows, used = chunk_rows(starts, counts, width)
    assert torch.equal(rows, naive_rows(starts, counts, width))
    assert used.tolist() == counts.sum(1).tolist()


@pytest.mark.parametrize("seed", range(5))
def test_selected_chunks_match_the_host_chunk_list(seed):
    bank = random_bank(seed)
    rng = random.Random(seed)
    k = 6
    lists = [rng.sample(bank.bank.doc_ids, rng.randint(1, k)) for _ in range(5)]
    ids = torch.tensor([lst + [-1] * (k - len(lst)) for lst in lists])  # -1: no document
    starts, counts = bank.selected_chunks(ids)
    rows, used = chunk_rows(starts, counts, bank.worst_case_chunks(k))
    for r, lst in enumerate(lists):
        want = bank.chunk_indices(lst)
        assert used[r] == want.numel() <= bank.worst_case_chunks(len(lst))
        assert rows[r, :used[r]].tolist() == want.tolist()
        assert (rows[r, used[r]:] == -1).all()


def test_stage_documents_fills_reservations_and_overflows_privately():
    bank = random_bank(7)
    kv, hd = 2, 8
    chunks = bank.chunk_offsets[-1]
    host_k = torch.randn(chunks, kv, hd)
    host_v = torch.randn(chunks, kv, hd)
    k = 3
    width = bank.worst_case_chunks(k)
    pool = StagingPool(2 * width + 1, kv, hd, torch.float32, torch.device("cpu"))
    rng = random.Random(1)
    lists = [rng.sample(bank.bank.doc_ids, k) for _ in range(3)]  # the third overflows
    starts, counts = bank.selected_chunks(torch.tensor(lists))
    staged = pool.stage_documents(host_k, host_v, starts, counts,
                                  [(f"r{i}", width) for i in range(3)])
    assert [s.private is None for s in staged] == [True, True, False]
    assert pool.num_free == 1 and pool.overflows == 1
    assert len(set(torch.cat([s.slots for s in staged[:2]]).tolist())) == 2 * width
    for s, lst in zip(staged, lists, strict=True):
        want = bank.chunk_indices(lst)
        assert s.used() == want.numel()
        keys, values = pool.read(s)
        assert torch.equal(keys, host_k[want]) and torch.equal(values, host_v[want])
    pool.release("r0")
    pool.release("r1")
    assert pool.num_free == pool.num_slots and pool.owners() == []


def test_ranges_and_uploads():
    """The index arrays every router layer uploads: ranges concatenated in order (empty ones
    included), and the tensor that reaches the device holds them unchanged."""
    spans = [(3, 5), (10, 13), (7, 7), (0, 2)]
    want = [i for a, b in spans for i in range(a, b)]
    assert ranges(spans).tolist() == want and ranges([]).tolist() == []
    tensor = upload(ranges(spans), torch.device("cpu"), torch.int32)
    assert tensor.dtype == torch.int32 and tensor.tolist() == want
    assert upload([[1, 2], [3, 4]], torch.device("cpu")).tolist() == [[1, 2], [3, 4]]
