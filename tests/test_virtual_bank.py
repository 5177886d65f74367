"""Virtual synthetic banks (vllm_msa/bank/virtual.py): a manifest only, tensors generated on
read. The values are a pure function of (seed, tensor, element): any slice (a shard's chunks,
a rank's KV heads, a block) and any device give the same bytes, and serving's tiers equal
`layer()`. Serving one through the engine is tested in tests/test_fp8_bank.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_msa.attention.tiers import ServedBank
from vllm_msa.bank import BankError, MemoryBank
from vllm_msa.bank.convert import convert_bank
from vllm_msa.bank.quant import dequantize
from vllm_msa.bank.synth import plan_synth
from vllm_msa.bank.virtual import generate_rows, write_virtual


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**40), st.integers(1, 30), st.integers(0, 7), st.integers(1, 8),
       st.sampled_from([1, 5, 64]))
def test_values_do_not_depend_on_how_they_are_sliced(start, rows, h0, heads, head_dim):
    num_heads = 8
    heads = min(heads, num_heads - h0)
    whole = generate_rows(1, "t", range(start, start + rows + 3), range(num_heads), num_heads,
                          head_dim, torch.device("cpu"))
    part = generate_rows(1, "t", range(start + 1, start + 1 + rows), range(h0, h0 + heads),
                         num_heads, head_dim, torch.device("cpu"))
    assert torch.equal(part, whole[1:1 + rows, h0:h0 + heads])
    assert whole.abs().max() <= 4.0  # four centred 16-bit uniforms, times 2^-15
    other = generate_rows(2, "t", range(start, start + rows + 3), range(num_heads), num_heads,
                          head_dim, torch.device("cpu"))
    assert not torch.equal(other, whole)  # the seed matters


def test_bell_shaped_unit_scale():
    x = generate_rows(0, "t", range(4096), range(8), 8, 128, torch.device("cpu"))
    assert abs(float(x.mean())) < 0.01 and 1.1 < float(x.std()) < 1.2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_the_gpu_generates_the_same_bytes():
    rows = range(2**33, 2**33 + 5000)  # element indices past 2^32
    cpu = generate_rows(7, "layer.3.keys", rows, range(8), 8, 128, torch.device("cpu"))
    gpu = generate_rows(7, "layer.3.keys", rows, range(8), 8, 128, torch.device("cuda"))
    assert torch.equal(cpu, gpu.cpu())


@pytest.mark.parametrize("bank_dtype", ["auto", "fp8_e4m3"])
def test_served_tiers_equal_layer(checkpoints, tmp_path, bank_dtype):
    ckpt = checkpoints()
    bank = write_virtual(plan_synth(ckpt, 3_000, 70, dtype="float32", bank_dtype=bank_dtype),
                         tmp_path / "v")
    assert [p.name for p in bank.path.iterdir()] == ["manifest.json"]
    assert bank.verify() == [] and bank.num_tokens == 3_000
    assert bank.doc_num_tokens.sum() == 3_000 and bank.doc_num_tokens[-1] == 3_000 - 42 * 70
    info = bank.model_info
    for rank in range(2):
        heads = slice(rank, rank + 1)
        served = ServedBank.load("v", bank, torch.device("cpu"), heads, shard=(rank, 2))
        for layer in bank.router_layers:
            want = bank.layer(layer)
            assert torch.equal(served.index[layer].routing_keys,
                               want.routing_keys[served.shard.chunks])
            keys, values = served.host_keys[layer], served.host_values[layer]
            if bank_dtype == "fp8_e4m3":
                k_scale, v_scale = served.scales(layer)
                keys = dequantize(keys, k_scale, bank.dtype)
                values = dequantize(values, v_scale, bank.dtype)
            assert torch.equal(keys, want.keys[:, heads])
            assert torch.equal(values, want.values[:, heads])
            # The exact keys an 8-bit index reads back: any ranges, generated in one pass.
            ranges = [(3, 9), (9, 10), (40, 41), (0, 2)]
            got = bank.read_ranges(layer, "routing_keys", ranges)
            assert torch.equal(got, torch.cat([want.routing_keys[a:b] for a, b in ranges]))
    assert bank.text(5) == "synthetic document 5"
    for t in bank.template_kv(info.num_layers - 1):
        assert t.shape == (len(bank.template_ids), info.num_kv_heads, info.head_dim)
    with pytest.raises(BankError, match="virtual"):
        convert_bank(bank.path, tmp_path / "c", "fp8_e4m3", progress=False)


def test_cli_writes_a_manifest_marked_synthetic_and_virtual(checkpoints, tmp_path):
    out = tmp_path / "v"
    cmd = [sys.executable, "-m", "vllm_msa.cli", "bank", "synth", "--model", str(checkpoints()),
           "--tokens", "100M", "--doc-tokens", "500", "--out", str(out), "--virtual",
           "--bank-dtype", "fp8_e4m3"]
    for _ in range(2):  # a second run finds the same bank and leaves it
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert "SYNTHETIC, virtual" in run.stdout
    info = subprocess.run([sys.executable, "-m", "vllm_msa.cli", "bank", "info", "--json",
                           str(out)], capture_output=True, text=True, timeout=120)
    summary = json.loads(info.stdout)
    assert summary["virtual"] and summary["synthetic"] and summary["tokens"] == 100_000_000
    assert summary["bytes"]["on_disk"] == 0
    assert MemoryBank.open(out).num_documents == 200_000
    other = subprocess.run([*cmd[:-2], "--seed", "1"], capture_output=True, text=True,
                           timeout=120)
    assert other.returncode == 1 and "already holds a different bank" in other.stderr


@pytest.mark.parametrize(("bank_dtype", "tp", "index_dtype"),
                         [("auto", 1, "auto"), ("fp8_e4m3", 1, "auto"), ("fp8_e4m3", 2, "auto"),
                          ("fp8_e4m3", 1, "int8"), ("auto", 2, "fp8_e4m3")])
def test_capacity_is_the_largest_bank_that_fits_and_loads_as_predicted(
        checkpoints, tmp_path, bank_dtype, tp, index_dtype):
    """`bank capacity`'s answer fits both budgets, one more document does not, and a bank of
    that size, loaded, takes the bytes predicted (each rank's index share, its heads' K/V)."""
    from vllm_msa.bank.dtypes import BankDtypes
    from vllm_msa.bank.model_info import ModelInfo
    from vllm_msa.bank.sizing import (
        PlannedBank,
        compressed_layer_bytes,
        index_chunk_bytes,
        largest_bank,
        layout_bytes,
    )

    ckpt = checkpoints()
    info = ModelInfo.from_checkpoint(ckpt, "float32")
    dtypes = BankDtypes.of_model(info.dtype, bank_dtype)
    gpu, host = 0.4 * 2**20, 1.0 * 2**20
    tokens, layout = largest_bank(info, dtypes, 50, gpu, host, tp, index_dtype=index_dtype)
    assert tokens > 0 and tokens % 50 == 0
    assert layout.gpu_index_per_rank <= gpu and layout.host_per_node <= host
    more = layout_bytes(PlannedBank(info, dtypes, tokens + 50, 50), tp,
                        index_dtype=index_dtype)
    assert more.gpu_index_per_rank > gpu or more.host_per_node > host
    bank = write_virtual(plan_synth(ckpt, tokens, 50, dtype="float32", bank_dtype=bank_dtype),
                         tmp_path / "v")
    assert layout_bytes(bank, tp, index_dtype=index_dtype) == layout
    run = subprocess.run([sys.executable, "-m", "vllm_msa.cli", "bank", "capacity", "--model",
                          str(ckpt), "--dtype", "float32", "--gpu-gib", str(gpu / 2**30),
                          "--host-gib", str(host / 2**30), "--doc-tokens", "50",
                          "--bank-dtype", bank_dtype, "-tp", str(tp), "--index-dtype",
                          index_dtype, "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["tokens"] == tokens
    heads = info.num_kv_heads // tp
    for rank in range(tp):
        served = ServedBank.load("v", bank, torch.device("cpu"),
                                 slice(rank * heads, (rank + 1) * heads), shard=(rank, tp),
                                 index_dtype=index_dtype)
        assert served.host_bytes == layout.host_per_rank
        assert served.index_bytes <= layout.gpu_index_per_rank
        if index_dtype == "auto":
            continue
        # An 8-bit index takes exactly the bytes `sizing` counts for it: at most the
        # prediction's, less where int8 shares a scale per chunk.
        assert served.index_dtype == index_dtype
        chunks = served.shard.num_chunks
        assert served.index_bytes == sum(compressed_layer_bytes(
            chunks, info.num_kv_heads, info.head_dim, idx.keys.shared_scale)
            for idx in served.index.values())
        assert served.index_bytes <= chunks * index_chunk_bytes(info, dtypes, index_dtype)
