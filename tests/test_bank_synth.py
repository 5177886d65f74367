"""`vllm-msa bank synth`: synthetic banks in the real format (no engine, CPU, seconds)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from vllm_msa.bank import BankError, BankMismatchError, MemoryBank, ModelInfo
from vllm_msa.bank import synth as synth_module
from vllm_msa.bank.synth import plan_synth
from vllm_msa.bank.writer import BankWriter, EncodedDocument
from vllm_msa.cli import main
from vllm_msa.prompt import TEMPLATE_HEAD

# The tiny checkpoint pools 4 tokens: 10 documents of 100 tokens (25 chunks) + one of 3 (1).
TOKENS, DOC_TOKENS = 1003, 100
DOC_NUM_TOKENS = [100] * 10 + [3]
DOC_NUM_CHUNKS = [25] * 10 + [1]
SEGMENT_MB = "0.3"  # 4 documents (307 KB) per segment: segments of 4, 4 and 3 documents


def synth_args(ckpt, out, *extra: str) -> list[str]:
    return ["bank", "synth", "--model", str(ckpt), "--tokens", str(TOKENS),
            "--doc-tokens", str(DOC_TOKENS), "--out", str(out), "--segment-mb", SEGMENT_MB,
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def synth(checkpoints, tmp_path_factory):
    ckpt = checkpoints()
    out = tmp_path_factory.mktemp("synth") / "bank"
    assert main(synth_args(ckpt, out)) == 0
    return ckpt, out


def test_bank_is_exactly_as_requested(synth):
    ckpt, out = synth
    info = ModelInfo.from_checkpoint(ckpt, "float32")
    bank = MemoryBank.open(out, info)
    assert MemoryBank.open(out, ckpt).num_chunks == bank.num_chunks  # default dtype too
    assert bank.num_documents == len(DOC_NUM_TOKENS) and bank.num_tokens == TOKENS
    assert bank.num_chunks == sum(DOC_NUM_CHUNKS)
    assert bank.doc_ids == list(range(len(DOC_NUM_TOKENS)))
    assert bank.doc_num_tokens.tolist() == DOC_NUM_TOKENS
    assert bank.doc_num_chunks.tolist() == DOC_NUM_CHUNKS
    expected_map = [i for i, n in enumerate(DOC_NUM_CHUNKS) for _ in range(n)]
    assert bank.chunk_doc_ids.tolist() == expected_map
    assert bank.doc_chunk_offsets[-1].item() == bank.num_chunks
    assert [seg["documents"] for seg in bank.manifest["segments"]] == [4, 4, 3]
    assert bank.manifest["source"]["synthetic"]["tokens"] == TOKENS

    shape = (sum(DOC_NUM_CHUNKS), info.num_kv_heads, info.head_dim)
    assert bank.router_layers == list(info.router_layers) == [2, 3]
    seen = []
    for layer in info.router_layers:
        for name in ("routing_keys", "keys", "values"):
            t = getattr(bank.layer(layer), name)
            assert tuple(t.shape) == shape and t.dtype == torch.float32
            assert torch.isfinite(t).all() and 0.9 < t.std().item() < 1.1
            assert not any(torch.equal(t, s) for s in seen)  # independent draws
            seen.append(t)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    assert bank.template_ids == tokenizer.encode(TEMPLATE_HEAD, add_special_tokens=False)
    for layer in range(info.num_layers):
        k, v = bank.template_kv(layer)
        assert k.shape == v.shape == (len(bank.template_ids), *shape[1:])
    assert bank.text(10) == "synthetic document 10"
    assert bank.verify() == []


def test_dry_run_predicts_the_bank_exactly(synth, capsys, tmp_path):
    ckpt, out = synth
    plan = plan_synth(ckpt, TOKENS, DOC_TOKENS, segment_mb=float(SEGMENT_MB))
    predicted, actual = plan.predicted_manifest(), MemoryBank.open(out).manifest
    for key in ("counts", "segments", "model", "source", "format_version"):
        assert predicted[key] == actual[key], key
    assert {k: v["bytes"] for k, v in predicted["files"].items()} == {
        k: v["bytes"] for k, v in actual["files"].items()}

    dry = tmp_path / "dry"
    assert main(synth_args(ckpt, dry, "--dry-run")) == 0
    printed = capsys.readouterr().out
    assert not dry.exists()
    assert "11 synthetic documents of 100 tokens, the last one 3" in printed
    assert main(["bank", "info", str(out)]) == 0
    info_out = capsys.readouterr().out
    # The prediction is what `bank info` shows afterwards (same rows, same numbers).
    assert printed.splitlines()[1:] == [
        line.replace(str(out), str(dry)) for line in info_out.splitlines()]


def test_bank_info_shows_a_synthetic_bank(synth, capsys):
    _, out = synth
    assert main(["bank", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "SYNTHETIC" in text and "1,003" in text and "GPU memory (index)" in text
    assert main(["bank", "info", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["synthetic"] is True and summary["chunks"] == sum(DOC_NUM_CHUNKS)


def test_other_checkpoint_or_dtype_is_refused(synth, checkpoints):
    _, out = synth
    with pytest.raises(BankMismatchError, match="fingerprint: bank has"):
        MemoryBank.open(out, checkpoints(seed=7), dtype="float32")
    with pytest.raises(BankMismatchError, match="num_kv_heads: bank has 2, model has 1"):
        MemoryBank.open(out, checkpoints(kv_heads=1), dtype="float32")
    with pytest.raises(BankMismatchError, match="dtype: bank has float32"):
        MemoryBank.open(out, synth[0], dtype="bfloat16")


def test_bfloat16_normalised_and_coupled_routing_keys(checkpoints, tmp_path):
    normalised = checkpoints(aux_loss_method="INFONCE")
    out = tmp_path / "infonce"
    assert main(synth_args(normalised, out, "--dtype", "bfloat16", "--seed", "3")) == 0
    bank = MemoryBank.open(out, normalised, dtype="bfloat16")
    layer = bank.layer(bank.router_layers[0])
    assert layer.routing_keys.dtype == layer.keys.dtype == torch.bfloat16
    norms = layer.routing_keys.float().norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-2)

    coupled = checkpoints(decouple_router=False)
    out = tmp_path / "coupled"
    assert main(synth_args(coupled, out)) == 0
    layer = MemoryBank.open(out, coupled, dtype="float32").layer(2)
    assert torch.equal(layer.routing_keys, layer.keys)  # stage 1 routes on K̄ itself


def test_interrupted_synth_never_loads_and_rerun_finishes_identically(synth, tmp_path,
                                                                     monkeypatch):
    ckpt, reference = synth
    out = tmp_path / "bank"
    commit = BankWriter.commit_segment
    calls = []

    def crash_on_second(self, segment):
        calls.append(segment)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        commit(self, segment)

    monkeypatch.setattr(BankWriter, "commit_segment", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(synth_args(ckpt, out))
    assert (out / "segments" / "seg-00000.safetensors").exists()
    with pytest.raises(BankError, match="unfinished bank build"):
        MemoryBank.open(out)

    monkeypatch.undo()
    assert main(synth_args(ckpt, out)) == 0  # resumes after the committed segment
    # Same arguments, same bytes: the resumed bank equals one written in a single run.
    def checksums(path):
        return {k: v["sha256"] for k, v in MemoryBank.open(path).manifest["files"].items()}

    assert checksums(out) == checksums(reference)
    MemoryBank.open(out, ckpt)
    assert main(synth_args(ckpt, out)) == 0  # a finished bank is returned as it is


def test_bad_arguments_exit_with_a_clear_error(synth, checkpoints, tmp_path, capsys):
    ckpt, out = synth
    for flag, value in (("--tokens", "0"), ("--doc-tokens", "0"), ("--tokens", "-5"),
                        ("--tokens", "1.5"), ("--doc-tokens", "many"), ("--segment-mb", "0")):
        args = synth_args(ckpt, tmp_path / "x")
        args[args.index(flag) + 1] = value
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
        assert f"argument {flag}:" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(synth_args(ckpt, foreign)) == 1
    assert "not an empty directory" in capsys.readouterr().err
    assert main(synth_args(ckpt, out, "--seed", "1")) == 1
    assert "already holds a different bank" in capsys.readouterr().err
    assert main(synth_args(tmp_path / "no-such-checkpoint", tmp_path / "y")) == 1
    assert "vllm-msa: error: cannot read checkpoint" in capsys.readouterr().err


def test_refuses_when_the_disk_is_too_small(synth, tmp_path, monkeypatch, capsys):
    class Usage:
        free = 1000

    monkeypatch.setattr(synth_module.shutil, "disk_usage", lambda _: Usage)
    assert main(synth_args(synth[0], tmp_path / "bank")) == 1
    assert "GiB free" in capsys.readouterr().err and not (tmp_path / "bank").exists()


def test_count_suffixes(synth, tmp_path, capsys):
    args = synth_args(synth[0], tmp_path / "b", "--dry-run")
    args[args.index("--tokens") + 1] = "1.5M"
    args[args.index("--doc-tokens") + 1] = "4k"
    assert main(args) == 0
    assert "375 synthetic documents of 4,000 tokens" in capsys.readouterr().out


def test_pooled_and_per_document_paths_write_identical_segments(synth, tmp_path):
    info = ModelInfo.from_checkpoint(synth[0], "float32")
    gen = torch.Generator().manual_seed(0)
    docs = [EncodedDocument(i, n, torch.randn(-(-n // 4), 2, 3, 2, 64, generator=gen))
            for i, n in enumerate((9, 4, 13))]
    writer = BankWriter.open(tmp_path / "bank", info, {"test": 1})
    pooled = torch.cat([d.pooled for d in docs])
    layers = {layer: {name: pooled[:, r, i] for i, name in
                      enumerate(("keys", "values", "routing_keys"))}
              for r, layer in enumerate(info.router_layers)}
    prepared = writer.prepare_segment([0, 1, 2], [9, 4, 13], [3, 1, 4], layers)
    writer.add_segment(docs)
    assert (tmp_path / "bank" / writer.segments[0]["file"]).read_bytes() == prepared.data
