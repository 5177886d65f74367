"""The disk tier (vllm_msa/attention/host_cache.py): K̄/V̄ read from the bank files on demand
into a bounded cache. Against the all-in-RAM tier, for random selections, the staged K̄/V̄ are
identical (bf16 and FP8 banks, written and virtual, torch path); the cache never holds more
than its rows, evicts the least recently selected documents and never one of this step's;
too small a cache is refused at start with the numbers. Served through the engine in
tests/test_serving_lifecycle.py."""

from __future__ import annotations

import random

import pytest
import torch

from vllm_msa.attention.host_cache import HostCache, HostCacheTooSmall
from vllm_msa.attention.staging import StagingPool
from vllm_msa.attention.tiers import ServedBank
from vllm_msa.bank import MemoryBank
from vllm_msa.bank.synth import plan_synth, synth_bank
from vllm_msa.bank.virtual import write_virtual


@pytest.fixture(scope="module", params=["bf16", "fp8", "fp8-virtual"])
def bank(request, checkpoints, tmp_path_factory):
    ckpt = checkpoints()
    dtype = "auto" if request.param == "bf16" else "fp8_e4m3"
    # Documents of 3-4 chunks (pooling 4), several segments.
    plan = plan_synth(ckpt, 1_500, 14, dtype="bfloat16", bank_dtype=dtype, segment_mb=0.02)
    out = tmp_path_factory.mktemp("cache") / request.param
    if request.param.endswith("virtual"):
        return write_virtual(plan, out)
    built = synth_bank(plan, out, progress=False)
    assert len(built.manifest["segments"]) > 1
    return MemoryBank.open(out)


def staged(served: ServedBank, layer: int, doc_ids: list[list[int]]) -> list[torch.Tensor]:
    """Stage these selections the way `paths.stage_selected` does; each request's K̄ and V̄."""
    info = served.bank.model_info
    pool = StagingPool(4096, len(range(info.num_kv_heads)), info.head_dim, served.bank.dtype,
                       torch.device("cpu"))
    ids = torch.tensor(doc_ids)
    starts, counts = served.selected_chunks(ids)
    row_map = None
    if served.host_cache is not None:
        served.host_cache.ensure(layer, (served.doc_position[d] for d in ids.flatten().tolist()))
        row_map = served.host_cache.slot_table(layer)
    widths = [(f"r{i}", served.worst_case_chunks(ids.shape[1])) for i in range(len(doc_ids))]
    out = pool.stage_documents(served.host_keys[layer], served.host_values[layer], starts,
                               counts, widths, served.scales(layer), row_map)
    return [torch.cat(pool.read(s)) for s in out]


def test_cached_staging_equals_the_tier_in_ram(bank):
    heads = slice(0, bank.model_info.num_kv_heads)
    full = ServedBank.load("b", bank, torch.device("cpu"), heads)
    budget = 0.3 * full.host_bytes  # about a third of the documents fit
    cached = ServedBank.load("b", bank, torch.device("cpu"), heads, host_cache_bytes=budget)
    cache = cached.host_cache
    assert cached.host_bytes <= budget < full.host_bytes
    rng = random.Random(0)
    ids = bank.doc_ids
    for step in range(40):
        layer = rng.choice(bank.router_layers)
        hot = ids[:8] if step % 2 else ids  # some steps revisit a hot set: hits
        selections = [rng.sample(hot, 4) for _ in range(rng.randint(1, 3))]
        for a, b in zip(staged(cached, layer, selections), staged(full, layer, selections),
                        strict=True):
            assert torch.equal(a, b), step
        resident = sum(rows.size for rows in cache._resident[layer].values())
        assert resident <= cache.rows
        assert (cache.slot_table(layer) >= 0).sum() == resident
    stats = cache.stats()
    assert stats["hits"] > 0 and stats["misses"] > len(ids) / 3  # re-read after eviction
    assert 0 < stats["hit_rate"] < 1 and stats["bytes_read"] > 0


def test_lru_order_and_this_steps_documents_stay(bank):
    heads = slice(0, bank.model_info.num_kv_heads)
    sizes = bank.doc_num_chunks.tolist()
    rows = sum(sorted(sizes)[-4:])  # room for the 4 largest documents, no more
    cache = HostCache(bank, bank.router_layers, heads, rows, torch.device("cpu"))
    layer = bank.router_layers[0]
    cache.ensure(layer, [0, 1])
    cache.ensure(layer, [2])
    cache.ensure(layer, [0])  # 0 is now the most recent; 1 the least
    cache.ensure(layer, [3, 4, 5])  # needs room: 1 goes first, then 2, never 3, 4, 5
    resident = list(cache._resident[layer])
    assert 1 not in resident and resident[-3:] == [3, 4, 5]
    with pytest.raises(HostCacheTooSmall, match="host cache holds"):
        cache.ensure(layer, list(range(12)))
