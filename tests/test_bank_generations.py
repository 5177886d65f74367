"""Bank generations and offline edits on real files, without an engine: remove, add (with
the fake encoder: the real tokenizer, segmenting and writers, seeded tensors), replace,
compact; the live view against a fresh build of the final documents; kill -9 at chosen
points; refusals; the command line. The real engine's side: test_bank_edit_engine.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bank_checks import read_docs
from conftest import SAMPLE_DOCS
from fake_encoder import FakeEncoder

from vllm_msa.bank import (
    BankError,
    BankMismatchError,
    DocumentRemovedError,
    MemoryBank,
    add_documents,
    build_bank,
    compact_bank,
    remove_documents,
)
from vllm_msa.cli import main

SEGMENT_MB = 0.15  # about three sample documents per segment
TESTS = Path(__file__).resolve().parent
DOCS = read_docs(SAMPLE_DOCS)
A, B = DOCS[:12], DOCS[12:]


@pytest.fixture(scope="module")
def ckpt(checkpoints) -> Path:
    return checkpoints()


@pytest.fixture(scope="module")
def encoder(ckpt) -> FakeEncoder:
    return FakeEncoder(ckpt)


def write_docs(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def ids(docs: list[dict]) -> list[int]:
    return [d["id"] for d in docs]


def build(ckpt, encoder, docs: list[dict], out: Path, **kwargs) -> MemoryBank:
    out.parent.mkdir(parents=True, exist_ok=True)
    source = write_docs(out.with_name(out.name + ".jsonl"), docs)
    return build_bank(ckpt, source, out, llm=encoder, segment_mb=SEGMENT_MB, progress=False,
                      **kwargs)


def add(ckpt, encoder, bank, docs: list[dict], **kwargs) -> MemoryBank:
    path = Path(bank.path if isinstance(bank, MemoryBank) else bank)
    source = write_docs(path.with_name(f"{path.name}-add{len(list(path.parent.glob('*')))}"
                                       ".jsonl"), docs)
    return add_documents(path, ckpt, source, llm=encoder, progress=False, **kwargs)


def segment_digests(bank: MemoryBank) -> list[str]:
    return [bank.manifest["files"][seg["file"]]["sha256"] for seg in bank.manifest["segments"]]


def assert_same_bank(got: MemoryBank, want: MemoryBank, files: bool = False) -> None:
    """Every live fact and tensor bit for bit; with `files`, every segment file too."""
    assert got.doc_ids == want.doc_ids
    assert (got.num_documents, got.num_chunks, got.num_tokens) == (
        want.num_documents, want.num_chunks, want.num_tokens)
    assert got.tier_bytes() == want.tier_bytes()
    for name in ("chunk_doc_ids", "doc_num_chunks", "doc_num_tokens", "doc_chunk_offsets"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    for layer in want.router_layers:
        for name in ("routing_keys", "keys", "values"):
            assert torch.equal(getattr(got.layer(layer), name),
                               getattr(want.layer(layer), name)), (layer, name)
    assert [got.text(i) for i in got.doc_ids] == [want.text(i) for i in want.doc_ids]
    assert got.template_ids == want.template_ids
    for layer in range(want.model_info.num_layers):
        assert all(torch.equal(g, w) for g, w in zip(got.template_kv(layer),
                                                     want.template_kv(layer), strict=True))
    if files:
        assert segment_digests(got) == segment_digests(want)


def files_on_disk(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


def first_segment_docs(bank: MemoryBank) -> int:
    return bank.manifest["segments"][0]["documents"]


# ------------------------------------------------------------------------ round trips
def test_edits_equal_a_fresh_build_of_the_final_documents(ckpt, encoder, tmp_path):
    base = build(ckpt, encoder, A, tmp_path / "bank")
    path = base.path
    assert base.generation == 0 and "generation" not in base.manifest
    n0 = first_segment_docs(base)
    second = n0 + base.manifest["segments"][1]["documents"]
    assert 1 < n0 < second < len(A) - 2

    g1 = add(ckpt, encoder, base, B)
    assert g1.generation == 1 and g1.doc_ids == ids(A + B)
    assert g1.manifest["format_version"] == 3
    # Removed: all of A's second segment and one of B's documents.
    removed = [d["id"] for d in A[n0:second]] + [B[4]["id"]]
    g2 = remove_documents(path, removed)
    assert g2.generation == 2 and g2.removed_counts["documents"] == len(removed)
    # Replaced: one of A's (after its second segment) and one of B's; 500 is new.
    new = [{"id": A[second + 1]["id"], "text": "The replaced text of a document."},
           {"id": B[0]["id"], "text": "Another replacement, longer than the first one " * 3},
           {"id": 500, "text": "A document the bank never held."}]
    g3 = add(ckpt, encoder, path, new, replace=True)
    assert g3.generation == 3 and g3.removed_counts["documents"] == len(removed) + 2

    final = [d for d in A + B if d["id"] not in {*removed, *ids(new)}] + new
    fresh = build(ckpt, encoder, final, tmp_path / "fresh")
    assert_same_bank(g3, fresh)  # the live view before compaction
    for bank in (g1, g2, g3):
        assert bank.verify() == []
    assert g1.doc_ids == ids(A + B)  # an older generation's object still reads its own

    compacted = compact_bank(path, progress=False)
    assert compacted.generation == 4 and not compacted.has_removals
    assert_same_bank(compacted, fresh, files=True)
    assert compacted.verify() == []
    # The first segment's file was kept, the rest rewritten; the files generation 4 does
    # not reference are gone, and with them every text of a removed or replaced document
    # (the build's documents file held them: its kept segment has a texts file now).
    assert compacted.manifest["segments"][0]["file"] == base.manifest["segments"][0]["file"]
    assert files_on_disk(path) == set(compacted.manifest["files"]) | {"manifest.json"}
    assert "documents.jsonl" not in compacted.manifest["files"]
    gone = [d["text"] for d in A + B if d["id"] in {*removed, *ids(new)}]
    for name in files_on_disk(path):
        data = (path / name).read_bytes()
        assert not [t for t in gone if json.dumps(t)[1:-1].encode() in data], name
    assert compact_bank(path, progress=False).generation == 4  # compact already


def test_compaction_keeps_a_build_whose_segments_are_all_kept(ckpt, encoder, tmp_path):
    # A build whose last segment is full (a partial one would merge with what follows).
    probe = build(ckpt, encoder, A, tmp_path / "probe")
    full = A[:sum(seg["documents"] for seg in probe.manifest["segments"][:2])]
    bank = build(ckpt, encoder, full, tmp_path / "bank")
    g1 = add(ckpt, encoder, bank, B[:5])
    g2 = remove_documents(g1.path, [B[1]["id"]])
    compacted = compact_bank(g2.path, progress=False)
    assert compacted.manifest["segments"][:2] == bank.manifest["segments"]
    assert "documents.jsonl" in compacted.manifest["files"]  # (it holds exactly their texts)
    fresh = build(ckpt, encoder, full + [d for d in B[:5] if d["id"] != B[1]["id"]],
                  tmp_path / "fresh")
    assert_same_bank(compacted, fresh, files=True)


def test_compaction_rewrites_every_segment_when_the_first_changes(ckpt, encoder, tmp_path):
    bank = build(ckpt, encoder, A, tmp_path / "bank")
    g1 = remove_documents(bank.path, [A[0]["id"]])
    compacted = compact_bank(g1.path, progress=False)
    fresh = build(ckpt, encoder, A[1:], tmp_path / "fresh")
    assert_same_bank(compacted, fresh, files=True)
    assert all(".g2." in seg["file"] for seg in compacted.manifest["segments"])
    assert "documents.jsonl" not in files_on_disk(bank.path)  # every text moved with its segment


def test_fp8_tier_edits_and_compaction_copy_as_stored(ckpt, encoder, tmp_path):
    """FP8 K/V: added documents are quantised as a build quantises them; compaction copies
    values and scales as stored (never re-quantised), so the files equal a fresh FP8 build's."""
    bank = build(ckpt, encoder, A, tmp_path / "bank", bank_dtype="fp8_e4m3")
    add(ckpt, encoder, bank, B[:4])
    remove_documents(bank.path, [A[2]["id"], B[1]["id"]])
    final = [d for d in A + B[:4] if d["id"] not in (A[2]["id"], B[1]["id"])]
    fresh = build(ckpt, encoder, final, tmp_path / "fresh", bank_dtype="fp8_e4m3")
    assert_same_bank(MemoryBank.open(bank.path), fresh)
    assert_same_bank(compact_bank(bank.path, progress=False), fresh, files=True)


# ------------------------------------------------------------------------ the live view
@pytest.fixture
def edited(ckpt, encoder, tmp_path):
    bank = build(ckpt, encoder, A, tmp_path / "bank")
    g1 = add(ckpt, encoder, bank, [{"id": A[3]["id"], "text": "a new text"}], replace=True)
    return remove_documents(g1.path, [A[1]["id"], A[7]["id"]])


def test_live_view_and_physical_layout(edited):
    bank = edited
    layout = bank.physical
    assert layout.doc_ids.tolist() == [*ids(A), A[3]["id"]]  # the replaced copy stays stored
    gone = {A[1]["id"], A[7]["id"]}
    assert layout.live.tolist() == [i not in gone and n != 3 for n, i in enumerate(ids(A))] + [
        True]
    assert bank.doc_ids == [i for i in ids(A) if i not in gone | {A[3]["id"]}] + [A[3]["id"]]
    assert bank.physical_chunks == len(layout.chunk_doc_ids) == int(layout.doc_num_chunks.sum())
    assert bank.num_chunks == int(layout.live_chunks.sum()) == len(bank.chunk_doc_ids)
    assert bank.text(A[3]["id"]) == "a new text"
    with pytest.raises(DocumentRemovedError, match=rf"document {A[1]['id']} was removed"):
        bank.text(A[1]["id"])
    with pytest.raises(KeyError):  # (callers that drop unknown ids drop removed ones too)
        bank.text(A[7]["id"])
    with pytest.raises(KeyError, match="not in bank"):
        bank.text(999)
    # The raw reads are physical: masked by the live flags they are the live view.
    info = bank.model_info
    layer = bank.router_layers[0]
    stored = torch.empty(bank.physical_chunks, info.num_kv_heads, info.head_dim)
    bank.read_layer_into(layer, "keys", stored)
    assert torch.equal(stored[layout.live_chunks], bank.layer(layer).keys)
    offsets = layout.doc_chunk_offsets.tolist()
    last = len(layout.doc_ids) - 1  # the replacement: in a segment of its own
    rows = bank.read_ranges(layer, "values", [(offsets[last], offsets[last + 1])])
    assert torch.equal(rows, bank.layer(layer).values[-len(rows):])


def test_a_reader_keeps_its_generation_through_a_compaction(edited, tmp_path):
    before = MemoryBank.open(edited.path)  # nothing read yet: it reads after the deletion
    compacted = compact_bank(edited.path, progress=False)
    assert not set(before.manifest["files"]) <= files_on_disk(edited.path)  # files deleted
    assert before.generation == compacted.generation - 1
    assert before.doc_ids == compacted.doc_ids
    for layer in before.router_layers:
        assert torch.equal(before.layer(layer).keys, compacted.layer(layer).keys)
    assert [before.text(i) for i in before.doc_ids] == [compacted.text(i)
                                                       for i in compacted.doc_ids]
    assert before.verify() == []  # the files it holds are intact


# ------------------------------------------------------------------------ refusals
def test_remove_refuses_ids_that_are_not_live_and_writes_nothing(edited):
    path = edited.path
    manifest = (path / "manifest.json").read_bytes()
    disk = files_on_disk(path)
    with pytest.raises(BankError, match=rf"{A[1]['id']} removed already and 77, 78 not in "
                                        "the bank; nothing was changed"):
        remove_documents(path, [A[0]["id"], A[1]["id"], 77, 78])
    with pytest.raises(BankError, match="without documents"):
        remove_documents(path, edited.doc_ids)
    assert (path / "manifest.json").read_bytes() == manifest and files_on_disk(path) == disk


def test_one_edit_at_a_time_and_no_rebuild_over_an_edit(ckpt, encoder, edited):
    from vllm_msa.bank.generations import edit_lock

    with edit_lock(edited.path), pytest.raises(BankError, match="being edited by another"):
        remove_documents(edited.path, [A[0]["id"]])
    assert MemoryBank.open(edited.path).generation == edited.generation
    with pytest.raises(BankError, match="edited since"):
        build_bank(ckpt, edited.path.with_name("bank.jsonl"), edited.path, llm=encoder,
                   segment_mb=SEGMENT_MB, progress=False)


def test_add_refusals(ckpt, encoder, checkpoints, edited, tmp_path):
    path = edited.path
    manifest = (path / "manifest.json").read_bytes()
    disk = files_on_disk(path)
    docs = [{"id": A[0]["id"], "text": "x"}, {"id": 600, "text": "y"}]
    with pytest.raises(BankError, match=rf"already holds document {A[0]['id']}: .*--replace"):
        add(ckpt, encoder, path, docs)
    source = write_docs(tmp_path / "new.jsonl", docs[1:])
    with pytest.raises(BankMismatchError, match="fingerprint: bank has"):
        add_documents(path, checkpoints(seed=7), source, llm=encoder, progress=False)
    with pytest.raises(BankMismatchError, match="dtype: bank has float32, model has bfloat16"):
        add_documents(path, ckpt, source, llm=encoder, progress=False, dtype="bfloat16")
    assert (path / "manifest.json").read_bytes() == manifest
    assert files_on_disk(path) == disk  # (no edit state either)
    # A removed id may come back without --replace.
    back = add(ckpt, encoder, path, [{"id": A[1]["id"], "text": "back again"}])
    assert back.doc_ids[-1] == A[1]["id"] and back.text(A[1]["id"]) == "back again"


def test_synthetic_and_virtual_banks(ckpt, encoder, tmp_path):
    from vllm_msa.bank.synth import plan_synth, synth_bank
    from vllm_msa.bank.virtual import write_virtual

    virtual = write_virtual(plan_synth(ckpt, 3_000, 70, dtype="float32"), tmp_path / "v")
    for edit in (lambda: remove_documents(virtual.path, [0]),
                 lambda: compact_bank(virtual.path),
                 lambda: add(ckpt, encoder, virtual.path, A[:1])):
        with pytest.raises(BankError, match=r"is virtual .* cannot be edited"):
            edit()
    synthetic = synth_bank(plan_synth(ckpt, 3_000, 70, dtype="float32", segment_mb=0.1),
                           tmp_path / "s", progress=False)
    with pytest.raises(BankError, match=r"is synthetic .* build a bank of real documents"):
        add(ckpt, encoder, synthetic.path, A[:1])
    # Removals (and compaction) work on a synthetic bank of files.
    removed = remove_documents(synthetic.path, [3])
    assert 3 not in removed.doc_ids and removed.num_documents == synthetic.num_documents - 1
    assert compact_bank(synthetic.path, progress=False).doc_ids == removed.doc_ids


def test_convert_refuses_and_serving_masks_a_bank_with_removals(edited, tmp_path):
    """`bank convert` needs a compacted bank; serving loads the stored layout with the
    removed documents masked out of routing (test_fp8_bank.py serves one end to end)."""
    from vllm_msa.attention.tiers import ServedBank
    from vllm_msa.bank.convert import convert_bank

    with pytest.raises(BankError, match="bank compact"):
        convert_bank(edited.path, tmp_path / "c", "fp8_e4m3", progress=False)
    served = ServedBank.load("b", edited, torch.device("cpu"), slice(None))
    assert served.num_documents == edited.num_documents
    physical = edited.physical
    for index in served.index.values():
        assert torch.equal(index.live, physical.live)
        assert index.num_live == edited.num_documents
    assert served.host_bytes > 0 and set(served.doc_position) == set(edited.doc_ids)
    compacted = compact_bank(edited.path, progress=False)
    served = ServedBank.load("b", compacted, torch.device("cpu"), slice(None))
    assert served.num_documents == compacted.num_documents
    assert all(index.live is None for index in served.index.values())


# ------------------------------------------------------------------------ kill -9
def kill_at(point: str, *op: str) -> None:
    """Run an edit in a child that SIGKILLs itself at `point` (tests/edit_kill.py)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)}
    run = subprocess.run([sys.executable, str(TESTS / "edit_kill.py"), point, *map(str, op)],
                         env=env, capture_output=True, text=True, timeout=300,
                         start_new_session=True)
    assert run.returncode == -9, run.stderr[-3000:]


@pytest.mark.parametrize("point", ["segment:1", "manifest", "committed"])
def test_killed_add_leaves_a_generation_and_the_rerun_finishes(ckpt, tmp_path, point):
    encoder = FakeEncoder(ckpt)
    bank = build(ckpt, encoder, A, tmp_path / "bank")
    reference = add(ckpt, encoder, shutil.copytree(bank.path, tmp_path / "ref"), B)
    source = write_docs(tmp_path / "b.jsonl", B)
    kill_at(point, "add", bank.path, ckpt, source)
    after = MemoryBank.open(bank.path)
    assert after.verify() == []
    from vllm_msa.cli import bank_summary

    assert bank_summary(after)["edit_pending"]  # (`bank info` says so)
    state = json.loads((bank.path / "edit-state.json").read_text())
    pending = [seg["file"] for seg in state["segments"]]
    if point == "committed":
        assert after.generation == 1 and after.doc_ids == ids(A + B)
    else:
        assert after.generation == 0 and after.doc_ids == ids(A)
        assert (len(pending) == 1) == (point == "segment:1")
    rerun = FakeEncoder(ckpt)
    done = add_documents(bank.path, ckpt, source, llm=rerun, progress=False)
    # Resumed: the documents of the segments written before the kill are not encoded again.
    assert rerun.documents_encoded == (len(B) - state_docs(state) if point != "committed"
                                       else 0)
    assert [s["file"] for s in done.manifest["segments"]][len(bank.manifest["segments"]):][
        :len(pending)] == pending
    assert done.generation == 1
    assert_same_bank(done, reference, files=True)
    assert files_on_disk(bank.path) == set(done.manifest["files"]) | {"manifest.json"}


def state_docs(state: dict) -> int:
    return sum(seg["documents"] for seg in state["segments"])


@pytest.mark.parametrize("point", ["manifest", "committed"])
def test_killed_remove_leaves_a_generation(ckpt, encoder, tmp_path, point):
    bank = build(ckpt, encoder, A, tmp_path / "bank")
    kill_at(point, "remove", bank.path, f"{A[2]['id']},{A[5]['id']}")
    after = MemoryBank.open(bank.path)
    assert after.verify() == []
    if point == "manifest":
        assert after.generation == 0 and after.doc_ids == ids(A)
        done = remove_documents(bank.path, [A[2]["id"], A[5]["id"]])
    else:
        done = after
        with pytest.raises(BankError, match="removed already"):  # it did commit
            remove_documents(bank.path, [A[2]["id"]])
    assert done.generation == 1 and A[2]["id"] not in done.doc_ids and A[5]["id"] not in \
        done.doc_ids


@pytest.mark.parametrize("point", ["segment:1", "manifest", "committed"])
def test_killed_compaction_leaves_a_generation_and_the_rerun_finishes(ckpt, encoder, tmp_path,
                                                                      point):
    bank = build(ckpt, encoder, A, tmp_path / "bank")
    remove_documents(bank.path, [A[0]["id"], A[6]["id"]])
    fresh = build(ckpt, encoder, [d for d in A if d["id"] not in (A[0]["id"], A[6]["id"])],
                  tmp_path / "fresh")
    kill_at(point, "compact", bank.path)
    after = MemoryBank.open(bank.path)
    assert after.verify() == []
    assert after.generation == (2 if point == "committed" else 1)
    assert_same_bank(after, fresh)  # before or after the commit: the same live bank
    if point == "committed":
        assert not files_on_disk(bank.path) <= set(after.manifest["files"]) | {
            "manifest.json", "edit-state.json"}  # the old segments are still there
    done = compact_bank(bank.path, progress=False)
    assert done.generation == 2
    assert_same_bank(done, fresh, files=True)
    assert files_on_disk(bank.path) == set(done.manifest["files"]) | {"manifest.json"}


# ------------------------------------------------------------------------ command line
def test_cli_remove_info_verify_compact(edited, capsys):
    path = str(edited.path)
    assert main(["bank", "info", path]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^generation\s+2$", out, re.M)
    assert f"{edited.num_documents} live, 3 removed" in out
    assert "held by removed documents until `bank compact`" in out
    assert main(["bank", "info", path, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["generation"] == 2 and summary["documents"] == edited.num_documents
    removed = edited.removed_counts
    assert summary["removed"]["documents"] == 3 and summary["removed"]["chunks"] == \
        removed["chunks"]
    assert summary["removed"]["bytes"] == sum(
        v for k, v in edited.tier_bytes(removed["chunks"]).items() if k != "template")
    assert main(["bank", "verify", path]) == 0 and "OK" in capsys.readouterr().out

    assert main(["bank", "remove", path, "--ids", f"{A[0]['id']},{A[2]['id']}"]) == 0
    assert "generation 3" in capsys.readouterr().out
    assert main(["bank", "remove", path, "--ids", f"{A[0]['id']}"]) == 1
    assert "removed already" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bank", "remove", path, "--ids", "3,x"])
    capsys.readouterr()
    assert main(["bank", "compact", path, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^generation\s+4$", out, re.M) and " live, " not in out
    assert main(["bank", "compact", path, "--no-progress"]) == 0
    assert "compact already (generation 4)" in capsys.readouterr().out
    assert main(["bank", "verify", path]) == 0
