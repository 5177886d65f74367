"""Bank edits through the real stage-1 engine: build, add (with --replace), remove and compact
give, bit for bit, the bank a fresh build of the final documents gives (stage 1 on the CPU
engine is batch-invariant: each document's pooled tensors do not depend on what it is batched
with), and `vllm-msa bank add` killed with SIGKILL mid-add leaves the previous generation,
finished by a re-run. One engine for the module, one more in the killed command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bank_checks import read_docs
from conftest import ENGINE_DEFAULTS, SAMPLE_DOCS, shutdown_llm
from test_bank_generations import assert_same_bank, ids, segment_digests, write_docs

from vllm_msa.bank import MemoryBank, add_documents, build_bank, compact_bank, remove_documents
from vllm_msa.bank.build import encoder_llm
from vllm_msa.cli import main

pytestmark = pytest.mark.slow

SEGMENT_MB = 0.15  # about three sample documents per segment
TESTS = Path(__file__).resolve().parent
DOCS = read_docs(SAMPLE_DOCS)
A, B = DOCS[:12], DOCS[12:]


@pytest.fixture(scope="module")
def engine(checkpoints):
    ckpt = checkpoints()
    llm = encoder_llm(ckpt, **ENGINE_DEFAULTS)
    yield ckpt, llm
    shutdown_llm(llm)


@pytest.fixture(scope="module")
def base(engine, tmp_path_factory) -> MemoryBank:
    ckpt, llm = engine
    root = tmp_path_factory.mktemp("edit-engine")
    return build_bank(ckpt, write_docs(root / "a.jsonl", A), root / "a", llm=llm,
                      segment_mb=SEGMENT_MB, progress=False)


def test_edits_equal_a_fresh_build(engine, base, tmp_path):
    ckpt, llm = engine
    path = shutil.copytree(base.path, tmp_path / "bank")
    new = [{"id": A[8]["id"], "text": "A replaced document, encoded again by the engine."},
           {"id": 900, "text": "A document the bank never held, added with the others."}]
    added = add_documents(path, ckpt, write_docs(tmp_path / "b.jsonl", B + new), llm=llm,
                          replace=True, progress=False)
    assert added.generation == 1 and added.removed_counts["documents"] == 1
    removed = [A[1]["id"], A[2]["id"], B[5]["id"], 900]
    edited = remove_documents(path, removed)
    final = [d for d in A if d["id"] not in {*removed, A[8]["id"]}] + [
        d for d in B + new if d["id"] not in removed]
    fresh = build_bank(ckpt, write_docs(tmp_path / "final.jsonl", final), tmp_path / "fresh",
                       llm=llm, segment_mb=SEGMENT_MB, progress=False)
    assert edited.doc_ids == ids(final)
    assert_same_bank(edited, fresh)  # the live view: every tensor, id and text
    compacted = compact_bank(path, progress=False)
    assert compacted.generation == 3
    assert_same_bank(compacted, fresh, files=True)  # and every segment file
    assert compacted.verify() == []


def test_killed_cli_add_leaves_the_previous_generation_and_the_rerun_finishes(
        engine, base, tmp_path):
    ckpt, llm = engine
    path = shutil.copytree(base.path, tmp_path / "bank")
    docs = write_docs(tmp_path / "b.jsonl", B)
    command = ["bank", "add", str(path), "--model", str(ckpt), "--docs", str(docs),
               "--dtype", "float32", "--max-model-len", "1024",
               "--gpu-memory-utilization", "0.3", "--no-progress"]
    # Killed (its process group: the engine too) once its first new segment is durable.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)}
    run = subprocess.run([sys.executable, str(TESTS / "edit_kill.py"), "segment:1", "cli",
                          *command], env=env, capture_output=True, text=True, timeout=400,
                         start_new_session=True)
    assert run.returncode == -9, run.stderr[-3000:]
    after = MemoryBank.open(path, ckpt, dtype="float32")
    assert after.generation == 0 and after.doc_ids == ids(A)
    assert segment_digests(after) == segment_digests(base) and after.verify() == []
    state = json.loads((path / "edit-state.json").read_text())
    assert len(state["segments"]) == 1

    done = add_documents(path, ckpt, docs, llm=llm, progress=False)  # the same add, resumed
    assert done.generation == 1 and done.doc_ids == ids(A + B)
    assert done.manifest["segments"][len(base.manifest["segments"])]["file"] == \
        state["segments"][0]["file"]
    # Equal to the same add run without a kill, in this process's engine: the killed
    # command's engine encoded the first segment identically.
    uninterrupted = add_documents(shutil.copytree(base.path, tmp_path / "ref"), ckpt, docs,
                                  llm=llm, progress=False)
    assert_same_bank(done, uninterrupted, files=True)


def test_cli_add_refusals(engine, base, checkpoints, tmp_path, capsys):
    ckpt, _ = engine
    docs = write_docs(tmp_path / "dup.jsonl", A[:2])
    common = ["--docs", str(docs), "--dtype", "float32", "--no-progress"]
    assert main(["bank", "add", str(base.path), "--model", str(ckpt), *common]) == 1
    err = capsys.readouterr().err
    assert f"already holds documents {A[0]['id']}, {A[1]['id']}: add with --replace" in err
    assert main(["bank", "add", str(base.path), "--model", str(checkpoints(seed=7)),
                 *common]) == 1
    assert "does not match the model: fingerprint: bank has" in capsys.readouterr().err
    assert MemoryBank.open(base.path).generation == 0
