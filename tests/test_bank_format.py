"""The bank format on real files (no engine): round trip, atomic commit, resume, corruption,
mismatch with a model, and the `vllm-msa bank` commands."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vllm_msa.bank import BankError, BankMismatchError, MemoryBank, ModelInfo
from vllm_msa.bank.documents import DocumentsError, read_documents
from vllm_msa.bank.writer import BankExistsError, BankWriter, EncodedDocument
from vllm_msa.cli import main

DOC_TOKENS = [9, 4, 13, 1, 8]
SOURCE = {"documents_sha256": "0" * 64, "num_documents": len(DOC_TOKENS)}


@pytest.fixture(scope="module")
def info(checkpoints) -> ModelInfo:
    return ModelInfo.from_checkpoint(checkpoints(), "float32")


def encoded_docs(info: ModelInfo, seed: int = 0) -> list[EncodedDocument]:
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for i, n in enumerate(DOC_TOKENS):
        chunks = -(-n // info.pooling_kernel_size)
        pooled = torch.randn(chunks, len(info.router_layers), 3, info.num_kv_heads,
                             info.head_dim, generator=gen)
        docs.append(EncodedDocument(id=10 + 3 * i, num_tokens=n, pooled=pooled))
    return docs


def template(info: ModelInfo) -> torch.Tensor:
    return torch.randn(3, info.num_layers, 2, info.num_kv_heads, info.head_dim)


def write_bank(out, info, docs, tmpl, *, split=2) -> None:
    writer = BankWriter.open(out, info, SOURCE)
    writer.add_segment(docs[:split])
    writer.add_segment(docs[split:])
    writer.finish([1, 2, 3], tmpl, [(d.id, f"text of {d.id} — ünïcode") for d in docs])


@pytest.fixture
def bank_dir(tmp_path, info):
    docs, tmpl = encoded_docs(info), template(info)
    write_bank(tmp_path / "bank", info, docs, tmpl)
    return tmp_path / "bank", docs, tmpl


def test_round_trip(bank_dir, info):
    path, docs, tmpl = bank_dir
    bank = MemoryBank.open(path, info)
    assert bank.router_layers == list(info.router_layers)
    assert bank.doc_ids == [d.id for d in docs]
    assert bank.num_documents == 5 and bank.num_tokens == sum(DOC_TOKENS)
    chunks = [d.pooled.shape[0] for d in docs]
    assert bank.num_chunks == sum(chunks)
    expected_map = [d.id for d, c in zip(docs, chunks, strict=True) for _ in range(c)]
    assert bank.chunk_doc_ids.tolist() == expected_map
    offsets = bank.doc_chunk_offsets.tolist()
    assert offsets[0] == 0 and offsets[-1] == bank.num_chunks
    for i, d in enumerate(docs):
        assert bank.chunk_doc_ids[offsets[i] : offsets[i + 1]].tolist() == [d.id] * chunks[i]
    pooled = torch.cat([d.pooled for d in docs])
    for r, layer in enumerate(info.router_layers):
        got = bank.layer(layer)
        assert torch.equal(got.keys, pooled[:, r, 0])
        assert torch.equal(got.values, pooled[:, r, 1])
        assert torch.equal(got.routing_keys, pooled[:, r, 2])
    for layer in range(info.num_layers):
        k, v = bank.template_kv(layer)
        assert torch.equal(k, tmpl[:, layer, 0]) and torch.equal(v, tmpl[:, layer, 1])
    assert bank.template_ids == [1, 2, 3]
    assert bank.text(13) == "text of 13 — ünïcode"
    with pytest.raises(KeyError, match="not in bank"):
        bank.text(11)
    assert bank.verify() == []
    # No pickle anywhere: every data file loads with safetensors, the rest is JSON.
    for name in bank.manifest["files"]:
        if name.endswith(".safetensors"):
            load_file(path / name)
    assert {p.name for p in path.iterdir()} == {
        "manifest.json", "template.safetensors", "documents.jsonl", "segments"}


def test_read_layer_into(bank_dir, info):
    """Segment by segment into a caller's buffer, whole or one KV-head share, equals the
    concatenated layer; a buffer of the wrong length or a non-router layer is refused."""
    path, docs, _ = bank_dir
    bank = MemoryBank.open(path, info)
    pooled = torch.cat([d.pooled for d in docs])  # written as two segments
    heads = slice(1, 2) if info.num_kv_heads > 1 else slice(0, 1)
    for r, layer in enumerate(info.router_layers):
        for i, name in enumerate(("keys", "values", "routing_keys")):
            whole = torch.full((bank.num_chunks, info.num_kv_heads, info.head_dim), float("nan"))
            assert torch.equal(bank.read_layer_into(layer, name, whole), pooled[:, r, i])
            part = torch.empty(bank.num_chunks, 1, info.head_dim)
            assert torch.equal(bank.read_layer_into(layer, name, part, heads),
                               pooled[:, r, i, heads])
    layer = info.router_layers[0]
    short = torch.empty(bank.num_chunks + 1, info.num_kv_heads, info.head_dim)
    with pytest.raises(BankError, match="expected"):
        bank.read_layer_into(layer, "keys", short)
    with pytest.raises(KeyError, match="not a router layer"):
        bank.read_layer_into(info.num_layers + 5, "keys", short)


def test_tier_bytes(bank_dir, info):
    bank = MemoryBank.open(bank_dir[0])
    per_tensor = bank.num_chunks * info.num_kv_heads * info.head_dim * 4
    tiers = bank.tier_bytes()
    assert tiers["gpu_index"] == len(info.router_layers) * per_tensor + bank.num_chunks * 8
    assert tiers["host_kv"] == 2 * len(info.router_layers) * per_tensor


def test_unfinished_build_never_loads_and_resumes(tmp_path, info):
    docs, tmpl = encoded_docs(info), template(info)
    out = tmp_path / "bank"
    writer = BankWriter.open(out, info, SOURCE)
    writer.add_segment(docs[:2])
    # A crash here: a committed segment, plus a half-written next one.
    (out / "segments" / "seg-00001.safetensors.tmp").write_bytes(b"partial")
    with pytest.raises(BankError, match="unfinished bank build"):
        MemoryBank.open(out)
    resumed = BankWriter.open(out, info, SOURCE)
    assert resumed.num_done_documents == 2
    resumed.add_segment(docs[2:])
    resumed.finish([1, 2, 3], tmpl, [(d.id, "t") for d in docs])
    bank = MemoryBank.open(out, info)
    assert bank.doc_ids == [d.id for d in docs]
    assert not list(out.rglob("*.tmp")) and not (out / "build-state.json").exists()
    reference = tmp_path / "reference"
    write_bank(reference, info, docs, tmpl)
    for layer in info.router_layers:
        assert torch.equal(bank.layer(layer).keys, MemoryBank.open(reference).layer(layer).keys)


def test_resume_with_other_inputs_is_refused(tmp_path, info):
    out = tmp_path / "bank"
    BankWriter.open(out, info, SOURCE, {"segment_mb": 512}).add_segment(encoded_docs(info)[:1])
    with pytest.raises(BankError, match=r"interrupted build of different inputs.*documents"):
        BankWriter.open(out, info, {**SOURCE, "documents_sha256": "1" * 64},
                        {"segment_mb": 512})
    with pytest.raises(BankError, match="--segment-mb was 512, now 64"):
        BankWriter.open(out, info, SOURCE, {"segment_mb": 64})
    assert BankWriter.open(out, info, SOURCE, {"segment_mb": 512}).num_done_documents == 1


def test_a_stopped_build_says_why(tmp_path, info):
    out = tmp_path / "bank"
    writer = BankWriter.open(out, info, SOURCE)
    writer.add_segment(encoded_docs(info)[:1])
    writer.record_stop("document 7 has 2,000 tokens, more than the engine's max_model_len "
                       "1024", "re-run with a larger --max-model-len")
    with pytest.raises(BankError, match=r"stopped because document 7 .* larger --max-model"):
        MemoryBank.open(out)
    assert main(["bank", "info", str(out)]) == 1  # the same one-line reason


def test_non_finite_values_are_refused_naming_the_tensor(tmp_path, info):
    from vllm_msa.attention.tiers import ServedBank

    docs, tmpl = encoded_docs(info), template(info)
    docs[3].pooled[0, 1, 1, 0, 5] = float("nan")  # the second router layer's values
    write_bank(tmp_path / "bank", info, docs, tmpl)
    bank = MemoryBank.open(tmp_path / "bank")
    assert bank.verify() == []  # the bytes are what was written: checksums cannot see it
    layer = info.router_layers[1]
    with pytest.raises(BankError, match=rf"seg-00001.safetensors:layer.{layer}.values holds "
                                        "non-finite"):
        ServedBank.load("b", bank, torch.device("cpu"), slice(None))
    served = ServedBank.load("b", bank, torch.device("cpu"), slice(None), verify=False)
    assert served.host_values[layer].isnan().any()  # the documented opt-out reads as is


def test_corrupt_bank_is_refused_at_load(bank_dir):
    from vllm_msa.attention.tiers import ServedBank

    path = bank_dir[0]
    seg = path / "segments" / "seg-00001.safetensors"
    data = bytearray(seg.read_bytes())
    data[-7] ^= 0x01  # one flipped bit in a tensor's data
    seg.write_bytes(bytes(data))
    bank = MemoryBank.open(path)
    with pytest.raises(BankError, match=r"corrupt: segments/seg-00001\.safetensors: blake3"):
        ServedBank.load("b", bank, torch.device("cpu"), slice(None))
    ServedBank.load("b", bank, torch.device("cpu"), slice(None), checksums=False)


def test_existing_bank_and_foreign_directory_are_not_overwritten(bank_dir, tmp_path, info):
    with pytest.raises(BankExistsError):
        BankWriter.open(bank_dir[0], info, SOURCE)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(BankError, match="not an empty directory"):
        BankWriter.open(foreign, info, SOURCE)


def test_corruption_is_detected(bank_dir):
    path = bank_dir[0]
    seg = path / "segments" / "seg-00000.safetensors"
    data = bytearray(seg.read_bytes())
    data[-5] ^= 0xFF  # same size, different content: only the checksum notices
    seg.write_bytes(bytes(data))
    bank = MemoryBank.open(path)
    assert [p for p in bank.verify() if "seg-00000" in p and "blake3" in p]
    # A bank from before BLAKE3 was recorded: the sha256 catches it.
    manifest = json.loads((path / "manifest.json").read_text())
    for meta in manifest["files"].values():
        meta.pop("blake3")
    (path / "manifest.json").write_text(json.dumps(manifest))
    problems = MemoryBank.open(path).verify()
    assert len(problems) == 1 and "seg-00000" in problems[0] and "sha256" in problems[0]

    seg.write_bytes(bytes(data[:-10]))  # truncated: refused at open
    with pytest.raises(BankError, match="truncated or replaced"):
        MemoryBank.open(path)


def test_bad_manifests_are_refused(bank_dir):
    path = bank_dir[0]
    manifest = json.loads((path / "manifest.json").read_text())

    def write(m):
        (path / "manifest.json").write_text(json.dumps(m))

    write({**manifest, "format_version": 99})
    with pytest.raises(BankError, match="format version 99"):
        MemoryBank.open(path)
    write({**manifest, "files": {**manifest["files"], "../outside": {"sha256": "", "bytes": 1}}})
    with pytest.raises(BankError, match="outside the bank"):
        MemoryBank.open(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(BankError, match="cannot read bank manifest"):
        MemoryBank.open(path)
    (path / "manifest.json").unlink()
    with pytest.raises(BankError, match=r"manifest\.json is missing"):
        MemoryBank.open(path)
    with pytest.raises(BankError, match="not a directory"):
        MemoryBank.open(path / "nope")


def test_header_shape_mismatch_is_refused(bank_dir, info):
    path = bank_dir[0]
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["segments"][0]["chunks"] += 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BankError, match="has shape"):
        MemoryBank.open(path)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"router_layers": "1,2,3"}, "router_layers"),
        ({"kv_heads": 1}, "num_kv_heads"),
        ({"head_dim": 32, "heads": 4}, "head_dim"),
        ({"pooling": 8}, "pooling_kernel_size"),
        ({"seed": 7}, "fingerprint"),
    ],
)
def test_mismatched_model_is_refused_with_the_reason(bank_dir, checkpoints, spec, field):
    other = checkpoints(**spec)
    with pytest.raises(BankMismatchError, match=rf"does not match the model: .*{field}: bank has"):
        MemoryBank.open(bank_dir[0], other, dtype="float32")


def test_mismatched_dtype_is_refused(bank_dir, checkpoints):
    with pytest.raises(BankMismatchError, match="dtype: bank has float32, model has bfloat16"):
        MemoryBank.open(bank_dir[0], checkpoints(), dtype="bfloat16")


def test_documents_file_errors(tmp_path):
    cases = {
        '{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n': "duplicate id 1",
        '{"id": -1, "text": "a"}\n': "id must be an integer >= 0",
        '{"id": "x", "text": "a"}\n': "id must be an integer",
        '{"id": 1, "text": 5}\n': "text must be a string",
        '{"id": 1}\n': "expected an object",
        "not json\n": "not valid JSON",
        "\n": "no documents",
    }
    for i, (content, message) in enumerate(cases.items()):
        path = tmp_path / f"docs{i}.jsonl"
        path.write_text(content)
        with pytest.raises(DocumentsError, match=message):
            read_documents(path)
    good = tmp_path / "good.jsonl"
    good.write_text('{"id": 7, "text": "x"}\n\n{"id": 0, "text": "y"}\n')
    docs, digest = read_documents(good)
    assert [(d.id, d.text) for d in docs] == [(7, "x"), (0, "y")]
    assert len(digest) == 64


def test_cli_info_and_verify(bank_dir, checkpoints, capsys):
    path = bank_dir[0]
    assert main(["bank", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "documents" in out and "GPU memory (index)" in out and "host RAM (K/V tier)" in out
    assert main(["bank", "info", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    bank = MemoryBank.open(path)
    assert summary["bytes"]["gpu_index"] == bank.tier_bytes()["gpu_index"]
    assert summary["documents"] == 5 and summary["chunks"] == bank.num_chunks

    assert main(["bank", "verify", str(path), "--model", str(checkpoints()),
                 "--dtype", "float32"]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["bank", "verify", str(path), "--model", str(checkpoints(kv_heads=1)),
                 "--dtype", "float32"]) == 1
    assert "num_kv_heads: bank has 2, model has 1" in capsys.readouterr().err

    seg = path / "segments" / "seg-00001.safetensors"
    data = bytearray(seg.read_bytes())
    data[-1] ^= 1
    seg.write_bytes(bytes(data))
    assert main(["bank", "verify", str(path)]) == 1
    assert "FAIL segments/seg-00001.safetensors" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["bank", "info", str(tmp_path / "missing")]) == 1
    assert "vllm-msa: error: no bank at" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite(dtype):
    from vllm_msa.bank.reader import all_finite

    x = torch.randn(1000).to(dtype)
    assert all_finite(x) and all_finite(x[:0])
    big = torch.full((64,), torch.finfo(dtype).max, dtype=dtype)
    assert all_finite(big)  # finite values whose sum overflows
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[517] = bad
        assert not all_finite(y), (dtype, bad)


def test_cli_help_and_bank_tools_import_no_engine(bank_dir, checkpoints):
    """`--help` of every command imports neither torch nor vLLM (it answers at once; timed in
    benchmarks/cli.py), and `bank info` / `bank verify` work without importing vLLM."""
    import subprocess
    import sys

    probe = ("import sys\nfrom vllm_msa.cli import main\ntry:\n    rc = main({argv!r})\n"
             "except SystemExit as e:\n    rc = e.code\n"
             "heavy = sorted(m for m in ('vllm', 'torch') if m in sys.modules)\n"
             "print('RESULT', rc, ','.join(heavy))\n")
    path = str(bank_dir[0])
    cases = [
        (["--help"], ""), (["bank", "--help"], ""), (["bank", "build", "--help"], ""),
        (["bank", "synth", "--help"], ""), (["bank", "info", "--help"], ""),
        (["bank", "convert", "--help"], ""), (["bank", "capacity", "--help"], ""),
        (["bank", "add", "--help"], ""), (["bank", "remove", "--help"], ""),
        (["bank", "compact", "--help"], ""),
        (["make-tiny-checkpoint", "--help"], ""), (["serve", "--help"], ""),
        (["bank", "info", path], "torch"),
        (["bank", "verify", path, "--model", str(checkpoints())], "torch"),
    ]
    for argv, heavy in cases:
        out = subprocess.run([sys.executable, "-c", probe.format(argv=argv)],
                             capture_output=True, text=True, timeout=300).stdout
        result = next(line for line in out.splitlines() if line.startswith("RESULT"))
        assert result.split(" ", 2)[1:] == ["0", heavy], (argv, result)
