"""Host -> device fetch of selected memory chunks (kernels/fetch.py): the Triton UVA gather
kernel and the memcpy-per-run baselines against the torch reference `src[rows].to(device)`.

Bit-exact equality on random pinned K̄/V̄ banks, fp32 and bf16, for empty, single-row,
contiguous, non-contiguous, unsorted and repeated selections, into a contiguous destination
or into scattered pool slots, on the current stream and on a side stream waited through the
returned event. The run splitting and the argument checks also run on CPU."""

from __future__ import annotations

import pytest
import torch
from vllm_msa.kernels import fetch

GPU = torch.cuda.is_available()


# ------------------------------------------------------------------ CPU: run splitting, checks
def test_kernel_is_built_lazily():
    # Importing the module builds no Triton kernel (each is built on first use).
    assert GPU or fetch._gather_kernel.cache_info().currsize == 0


def test_row_runs():
    src, dst, n = fetch.row_runs(torch.tensor([3, 4, 5, 9, 10, 2, 2, 7]))
    assert src.tolist() == [3, 9, 2, 2, 7]
    assert dst.tolist() == [0, 3, 5, 6, 7]
    assert n.tolist() == [3, 2, 1, 1, 1]
    src, dst, n = fetch.row_runs(torch.tensor([3, 4, 5]), torch.tensor([0, 1, 5]))
    assert (src.tolist(), dst.tolist(), n.tolist()) == ([3, 5], [0, 5], [2, 1])
    assert all(t.numel() == 0 for t in fetch.row_runs(torch.empty(0, dtype=torch.int64)))


def test_reference_and_word_size():
    src = torch.randn(10, 3, 4).to(torch.bfloat16)
    rows = torch.tensor([9, 0, 0, 4])
    assert torch.equal(fetch.gather_rows_reference(src, rows, "cpu"), src[rows])
    assert fetch._row_bytes(src) == 24 and fetch._word_dtype(24) == torch.int32
    assert fetch._word_dtype(6) == torch.int16 and fetch._word_dtype(3) == torch.uint8
    words = fetch._Words(src, torch.int32)
    assert words.data_ptr() == src.data_ptr() and words.dtype == torch.int32
    with pytest.raises(ValueError, match="contiguous"):
        fetch._Words(src.transpose(1, 2), torch.int32)


def test_unknown_method_is_refused():
    src = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="unknown method"):
        fetch.fetch_rows(src, src, torch.zeros(1, dtype=torch.int64), src, src, method="nope")


# ------------------------------------------------------------------ GPU
def _bank(n: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, *shape, generator=g).to(dtype).pin_memory()
    v = torch.randn(n, *shape, generator=g).to(dtype).pin_memory()
    return k, v


def _documents(n_rows: int, seed: int) -> list[tuple[int, int]]:
    """A bank's documents as (first chunk, chunk count), ~8 chunks each."""
    g = torch.Generator().manual_seed(seed)
    docs, start = [], 0
    while start < n_rows:
        size = min(int(torch.randint(1, 12, (1,), generator=g)), n_rows - start)
        docs.append((start, size))
        start += size
    return docs


def _selections(n_rows: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    docs = _documents(n_rows, seed)

    def rows_of(doc_ids) -> torch.Tensor:
        parts = [torch.arange(docs[d][0], docs[d][0] + docs[d][1]) for d in doc_ids]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    pick = torch.randperm(len(docs), generator=g)[:16].sort().values.tolist()
    return {
        "empty": torch.empty(0, dtype=torch.int64),
        "one row": torch.tensor([n_rows - 1]),
        "first row": torch.tensor([0]),
        "contiguous": torch.arange(5, 5 + min(40, n_rows - 5)),
        "selected documents": rows_of(pick),
        "repeated documents": rows_of([pick[0], pick[0], *pick[1:4], pick[2]]),
        "random rows": torch.randint(0, n_rows, (97,), generator=g),
        "all rows reversed": torch.arange(n_rows - 1, -1, -1),
    }


CASES = [
    pytest.param((8, 128), torch.bfloat16, id="msa4b-bf16"),
    pytest.param((8, 128), torch.float32, id="msa4b-fp32"),
    pytest.param((2, 64), torch.float32, id="tiny-fp32"),
    pytest.param((3, 20), torch.bfloat16, id="odd-bf16"),  # 120 B rows: masked column tail
    pytest.param((1, 5), torch.bfloat16, id="10-byte-rows"),  # int16 words
    pytest.param((8, 256), torch.float32, id="8KiB-rows"),  # rows split over column tiles
]
METHODS = ["gather", "memcpy"]


def _poisoned(n: int, shape, dtype) -> torch.Tensor:
    return torch.full((n, *shape), float("nan"), device="cuda").to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("shape", "dtype"), CASES)
def test_fetch_matches_reference(method, shape, dtype):
    n_rows = 301
    src_k, src_v = _bank(n_rows, shape, dtype, seed=1)
    for name, rows in _selections(n_rows, seed=2).items():
        n = rows.numel()
        spare = 3
        dst_k, dst_v = _poisoned(n + spare, shape, dtype), _poisoned(n + spare, shape, dtype)
        event = fetch.fetch_rows(src_k, src_v, rows, dst_k, dst_v, method=method)
        torch.cuda.current_stream().wait_event(event)
        ref_k = fetch.gather_rows_reference(src_k, rows, "cuda")
        ref_v = fetch.gather_rows_reference(src_v, rows, "cuda")
        assert torch.equal(dst_k[:n], ref_k), (method, name)
        assert torch.equal(dst_v[:n], ref_v), (method, name)
        assert torch.isnan(dst_k[n:].float()).all() and torch.isnan(dst_v[n:].float()).all(), (
            method, name, "wrote past the selection")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 128), (3, 20)], ids=["msa4b", "odd"])
@pytest.mark.parametrize("scatter", [False, True], ids=["dense", "slots"])
def test_fp8_source_is_dequantised_on_the_way(shape, scatter):
    """An FP8 host tier (`quant.py`): pinned e4m3 rows and scales in, the model dtype out,
    bit-identical to `quant.dequantize` of the selected rows (the torch path's result)."""
    from vllm_msa.bank.quant import dequantize, quantize

    n_rows = 301
    raw_k, raw_v = _bank(n_rows, shape, torch.bfloat16, seed=6)
    (src_k, sk), (src_v, sv) = quantize(raw_k * 40), quantize(raw_v / 300)
    src_k, src_v, sk, sv = (t.pin_memory() for t in (src_k, src_v, sk, sv))
    for name, rows in _selections(n_rows, seed=7).items():
        n = rows.numel()
        slots = torch.randperm(n + 50)[:n] if scatter else None
        dst_k, dst_v = _poisoned(n + 50, shape, torch.bfloat16), _poisoned(n + 50, shape,
                                                                           torch.bfloat16)
        fetch.gather_rows(src_k, src_v, rows, dst_k, dst_v, dst_rows=slots,
                          scales=(sk, sv)).synchronize()
        where = (slots if scatter else torch.arange(n)).cuda()
        assert torch.equal(dst_k[where].cpu(), dequantize(src_k[rows], sk[rows],
                                                          torch.bfloat16)), name
        assert torch.equal(dst_v[where].cpu(), dequantize(src_v[rows], sv[rows],
                                                          torch.bfloat16)), name
    with pytest.raises(ValueError, match="scales"):
        fetch.gather_rows(src_k, src_v, rows, dst_k, dst_v)


@pytest.mark.gpu
@pytest.mark.parametrize("block_rows", [1, 2, 8])
@pytest.mark.parametrize("max_programs", [None, 1, 3])
def test_gather_launch_shapes(block_rows, max_programs):
    src_k, src_v = _bank(1000, (8, 128), torch.bfloat16, seed=3)
    rows = torch.randint(0, 1000, (517,))
    dst_k, dst_v = (_poisoned(517, (8, 128), torch.bfloat16) for _ in range(2))
    fetch.gather_rows(src_k, src_v, rows, dst_k, dst_v, block_rows=block_rows,
                      max_programs=max_programs, num_warps=8 if block_rows == 8 else 4)
    assert torch.equal(dst_k, src_k[rows].cuda()) and torch.equal(dst_v, src_v[rows].cuda())


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fetch_into_pool_slots(method, dtype):
    """`dst_rows` scatters into arbitrary slots (the StagingPool's free list), leaving the
    other slots as they were."""
    src_k, src_v = _bank(400, (8, 128), dtype, seed=4)
    rows = _selections(400, seed=5)["selected documents"]
    n = rows.numel()
    # A run of consecutive slots, then distinct scattered ones (all >= 20), shuffled.
    scattered = torch.randperm(980)[: n - 8] + 20
    slots = torch.cat([torch.arange(10, 18), scattered])
    pool_k, pool_v = _poisoned(1000, (8, 128), dtype), _poisoned(1000, (8, 128), dtype)
    event = fetch.fetch_rows(src_k, src_v, rows, pool_k, pool_v, dst_rows=slots,
                             method=method)
    event.synchronize()
    assert torch.equal(pool_k[slots.cuda()], src_k[rows].cuda())
    assert torch.equal(pool_v[slots.cuda()], src_v[rows].cuda())
    untouched = torch.ones(1000, dtype=torch.bool)
    untouched[slots] = False
    assert torch.isnan(pool_k[untouched.cuda()].float()).all()
    assert torch.isnan(pool_v[untouched.cuda()].float()).all()


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_side_stream_and_event(method, dtype):
    """Issued on a side stream while the current stream is busy; the reader waits on the
    returned event. The destination is written on the current stream right before (the
    side stream must wait for that), and the device row index comes from the current
    stream too."""
    src_k, src_v = _bank(4096, (8, 128), dtype, seed=6)
    side = torch.cuda.Stream()
    for trial in range(3):
        sel = _selections(4096, seed=10 + trial)["selected documents"]
        rows = sel if method != "gather" else sel.cuda()  # device rows from this stream
        n = rows.numel()
        dst_k = torch.empty(n, 8, 128, device="cuda", dtype=dtype)
        dst_v = torch.empty_like(dst_k)
        # Busy the current stream, then poison: the fetch must land after the poison.
        a = torch.randn(2048, 2048, device="cuda")
        for _ in range(4):
            a = a @ a
            a = a / a.norm()
        dst_k.fill_(float("nan"))
        dst_v.fill_(float("nan"))
        event = fetch.fetch_rows(src_k, src_v, rows, dst_k, dst_v, stream=side, method=method)
        # Meanwhile more work on the current stream, then the reader waits on the event.
        for _ in range(4):
            a = a @ a
            a = a / a.norm()
        torch.cuda.current_stream().wait_event(event)
        got_k, got_v = dst_k.clone(), dst_v.clone()
        dst_k.record_stream(side)
        dst_v.record_stream(side)
        assert torch.equal(got_k, src_k[sel].cuda()), (method, trial)
        assert torch.equal(got_v, src_v[sel].cuda()), (method, trial)
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_index_placement_alignment_and_fast_launch():
    """Row indices pageable, pinned (read through UVA) or on the device; destinations aligned
    and not 16-byte aligned (another compiled specialization); repeated calls take the
    direct launch of the compiled kernel and stay exact."""
    for shape in ((8, 128), (1, 5)):
        src_k, src_v = _bank(500, shape, torch.bfloat16, seed=9)
        big_k, big_v = (_poisoned(300, shape, torch.bfloat16) for _ in range(2))
        for offset in (0, 1, 0, 1):
            for trial in range(3):
                rows = torch.randint(0, 500, (150 + trial,))
                for placed in (rows, rows.pin_memory(), rows.cuda()):
                    dst_k, dst_v = big_k[offset:], big_v[offset:]
                    dst_k.fill_(float("nan"))
                    dst_v.fill_(float("nan"))
                    fetch.gather_rows(src_k, src_v, placed, dst_k, dst_v).synchronize()
                    n = rows.numel()
                    assert torch.equal(dst_k[:n], src_k[rows].cuda()), (shape, offset, trial)
                    assert torch.equal(dst_v[:n], src_v[rows].cuda()), (shape, offset, trial)
                    assert torch.isnan(dst_k[n:].float()).all()
    # Strided index views are read densely after a copy, not through their storage.
    src_k, src_v = _bank(500, (8, 128), torch.bfloat16, seed=10)
    wide = torch.randint(0, 500, (64, 2))
    for strided in (wide[:, 1], wide[:, 1].cuda(), wide.cuda()[:, 1]):
        dst_k, dst_v = (_poisoned(64, (8, 128), torch.bfloat16) for _ in range(2))
        fetch.gather_rows(src_k, src_v, strided, dst_k, dst_v).synchronize()
        assert torch.equal(dst_k, src_k[wide[:, 1]].cuda())
        assert torch.equal(dst_v, src_v[wide[:, 1]].cuda())
    # Index slices at an 8-byte offset (a staging table's row) are handed over aligned.
    table = torch.randint(0, 500, (3, 33))
    for placed in (table, table.pin_memory(), table.cuda()):
        row = placed[1, :33]
        assert row.data_ptr() % 16 == 8
        keep: list = []
        assert fetch._kernel_rows(row, torch.device("cuda"), keep).data_ptr() % 16 == 0
        dst_k, dst_v = (_poisoned(33, (8, 128), torch.bfloat16) for _ in range(2))
        fetch.gather_rows(src_k, src_v, row, dst_k, dst_v).synchronize()
        assert torch.equal(dst_k, src_k[table[1]].cuda())
    if fetch._FAST_LAUNCH:
        assert fetch._COMPILED, "compiled kernels were not kept for direct launches"
    torch.cuda.synchronize()
    fetch._keep_until(torch.cuda.Event(), ())
    assert not fetch._IN_FLIGHT  # host indices released once their launches completed


@pytest.mark.gpu
def test_device_resident_source():
    src_k, src_v = (t.cuda() for t in _bank(300, (8, 128), torch.bfloat16, seed=7))
    rows = torch.randint(0, 300, (77,), device="cuda")
    dst_k, dst_v = (_poisoned(77, (8, 128), torch.bfloat16) for _ in range(2))
    fetch.gather_rows(src_k, src_v, rows, dst_k, dst_v).synchronize()
    assert torch.equal(dst_k, src_k[rows]) and torch.equal(dst_v, src_v[rows])


@pytest.mark.gpu
def test_bad_arguments():
    k, v = _bank(10, (2, 4), torch.float32, seed=8)
    dst = torch.empty(4, 2, 4, device="cuda")
    with pytest.raises(ValueError, match="pageable"):
        fetch.gather_rows(k.clone(), v, torch.tensor([1]), dst, dst)
    with pytest.raises(IndexError, match="out of range"):
        fetch.gather_rows(k, v, torch.tensor([10]), dst, dst)
    with pytest.raises(IndexError, match="out of range"):
        fetch.copy_runs(k, v, torch.tensor([-1]), dst, dst)
    with pytest.raises(ValueError, match="do not fit"):
        fetch.gather_rows(k, v, torch.arange(5), dst, dst)
    with pytest.raises(ValueError, match="does not hold rows"):
        fetch.gather_rows(k, v, torch.arange(2), dst.to(torch.bfloat16), dst)
    with pytest.raises(ValueError, match="int64"):
        fetch.gather_rows(k, v, torch.arange(2, dtype=torch.int32), dst, dst)
