"""Memory Parallel in the real engine: each tensor-parallel rank holds a share of every bank's
routing index (vllm_msa/attention/index_parallel.py) and the ranks exchange candidates.

TP=2 and TP=4 CPU engines (cores split with VLLM_CPU_OMP_THREADS_BIND) serve banks whose
documents do not divide evenly: an odd count with one document larger than all the others
together, fewer documents than ranks, and a bank where two identical documents sit on
different shards. Per router layer the selections, and every generated token's top-5
logprobs, must equal the float64 reference; the shards' ordered selections must equal the
TP=1 engine's; each rank's device index holds only its share; a tie across shards goes to the
smaller id; mixed batches equal solo runs; Memory Interleave equals the reference protocol.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import ENGINE_DEFAULTS, SAMPLE_DOCS, has_gpu, running_llm
from msa_reference import reference_answer
from reference import ReferenceMSA
from scripted_outputs import ScriptedOutputs
from test_interleave import SCENARIOS, check_against_model, check_protocol, encode, scripted
from test_serving import bank_docs, check_against_reference, expected_prompt, sampling

from vllm_msa.attention.index_parallel import shard_bounds
from vllm_msa.bank.build import build_bank, encoder_llm
from vllm_msa.bank.model_info import ModelInfo
from vllm_msa.bank.reader import MemoryBank
from vllm_msa.bank.sizing import CHUNK_MAP_BYTES, DOCUMENT_TABLE_BYTES, layout_bytes
from vllm_msa.bank.writer import BankWriter

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(has_gpu(), reason="CPU ranks (GPU runs: test_serving_gpu.py, x2+)"),
]
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

QUESTIONS = ["Which river flooded the old mill?", "Who repaired the lighthouse lamp?"]
TWIN_OFFSET = 100  # the twins bank renumbers every document by this; the twin takes id 0
WORKER_STATE = "vllm_msa.worker_state.MSAWorkerState"


def split_cores(ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` CPU workers on this machine's cores (shared
    round-robin where there are fewer cores than ranks)."""
    cores = sorted(os.sched_getaffinity(0))
    groups = [cores[r::ranks] or [cores[r % len(cores)]] for r in range(ranks)]
    return "|".join(",".join(map(str, g)) for g in groups)


@pytest.fixture(scope="module")
def banks(checkpoints, default_banks, tmp_path_factory):
    """"uneven": 7 documents, one of them longer than the other six together; "twins": the
    same tiers renumbered, plus document 1's copy under id 0 at the end (another shard);
    "small": 3 documents (fewer than 4 ranks); "docs": the 24 sample documents."""
    ckpt = checkpoints()
    out = tmp_path_factory.mktemp("memory-parallel")
    lines = [json.loads(x) for x in SAMPLE_DOCS.read_text().splitlines() if x.strip()]
    long_text = " ".join(d["text"] for d in lines[6:14])
    uneven = [*lines[:2], {"id": 50, "text": long_text}, *lines[2:6]]
    source = out / "uneven.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in uneven))
    llm = encoder_llm(ckpt, **ENGINE_DEFAULTS)
    try:
        uneven_bank = build_bank(ckpt, source, out / "uneven", llm=llm, progress=False)
    finally:
        from conftest import shutdown_llm

        shutdown_llm(llm)
    sizes = uneven_bank.doc_num_chunks.tolist()
    assert sizes[2] > sum(sizes) - sizes[2]  # one document outweighs the others
    import shutil

    shutil.copytree(default_banks["docs"].path, out / "live")  # edited while served
    return {"uneven": uneven_bank, "twins": twin_bank(uneven_bank, ckpt, out / "twins"),
            "small": default_banks["small"], "docs": default_banks["docs"],
            "live": MemoryBank.open(out / "live")}


def twin_bank(bank: MemoryBank, ckpt, out) -> MemoryBank:
    """`bank`'s documents as ids + TWIN_OFFSET, then document 1's tiers again as id 0."""
    info = ModelInfo.from_checkpoint(ckpt, "float32")
    writer = BankWriter.open(out, info, {"kind": "test twins", "of": str(bank.path)})
    offsets = bank.doc_chunk_offsets.tolist()
    twin = slice(offsets[1], offsets[2])
    layers = {}
    for layer in bank.router_layers:
        tiers = bank.layer(layer)
        layers[layer] = {name: torch.cat([t, t[twin]]) for name, t in
                         (("routing_keys", tiers.routing_keys), ("keys", tiers.keys),
                          ("values", tiers.values))}
    ids = [d + TWIN_OFFSET for d in bank.doc_ids] + [0]
    tokens = bank.doc_num_tokens.tolist()
    writer.add_pooled_segment(ids, [*tokens, tokens[1]], [*bank.doc_num_chunks.tolist(),
                                                          offsets[2] - offsets[1]], layers)
    template = torch.stack([torch.stack(bank.template_kv(layer), dim=1)
                            for layer in range(info.num_layers)], dim=1)
    texts = [bank.text(d) for d in bank.doc_ids]
    writer.finish(bank.template_ids, template, zip(ids, [*texts, texts[1]], strict=True))
    return MemoryBank.open(out, info)


def engine(ckpt, banks, tp: int, **extra):
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = split_cores(tp)
    return running_llm(model=str(ckpt), enforce_eager=True, tensor_parallel_size=tp,
                       worker_extension_cls=WORKER_STATE, **extra,
                       additional_config={"msa": {"banks": {
                           n: str(b.path) for n, b in banks.items()}}})


@pytest.fixture(scope="module")
def tp1(checkpoints, banks):
    """The TP=1 engine's ordered selections of QUESTIONS over every bank (the baseline)."""
    with engine(checkpoints(), banks, 1) as llm:
        answers = {name: ask(llm, name, banks[name]) for name in banks}
        answers["llm"] = llm
        yield answers


def ask(llm, bank_name, bank, top_k=None):
    tokenizer = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": expected_prompt(tokenizer, q)[0]} for q in QUESTIONS]
    extra = {"msa_bank": bank_name, "msa_return_selection": True}
    if top_k is not None:
        extra["msa_top_k"] = top_k
    return llm.generate(prompts, [sampling(**extra)] * len(prompts), use_tqdm=False)


def ordered(output) -> dict[str, list[int]]:
    return {layer: report["doc_ids"]
            for layer, report in output.kv_transfer_params["msa_selection"]["layers"].items()}


def check_serving(llm, banks, names, tp1, ckpt) -> None:
    """Every bank in `names`: the reference's selections and logprobs, TP=1's order."""
    ref = ReferenceMSA(ckpt)
    tokenizer = llm.get_tokenizer()
    for name in names:
        outputs = ask(llm, name, banks[name])
        for question, output, baseline in zip(QUESTIONS, outputs, tp1[name], strict=True):
            ids, span = expected_prompt(tokenizer, question)
            want = reference_answer(ref, ids, span, bank_docs(tokenizer, banks[name]),
                                    top_k=4, rope_offset_k=4, template_len=span[0],
                                    max_tokens=len(output.outputs[0].token_ids))
            if name != "twins":  # (its tiers are copies, not what its ids would encode)
                check_against_reference(output, want, ref.router_layers)
            assert ordered(output) == ordered(baseline), name
            assert list(output.outputs[0].token_ids) == list(baseline.outputs[0].token_ids)


def check_shares(llm, banks, tp: int) -> None:
    """Each rank's device index holds its own documents' routing keys, about 1/TP of them."""
    states = llm.collective_rpc("msa_state")
    assert [s["tp_rank"] for s in states] == list(range(tp))
    for name, bank in banks.items():
        bounds = shard_bounds(bank.doc_chunk_offsets.numpy(), tp).tolist()
        # routing keys of every router layer, per chunk (the index's chunk map aside)
        per_chunk = bank.tier_bytes()["gpu_index"] // bank.num_chunks - 8
        tiers = [s["bank_tiers"][name] for s in states]
        assert [t["documents"] for t in tiers] == [bounds[r:r + 2] for r in range(tp)]
        assert sum(t["chunks"] for t in tiers) == bank.num_chunks
        assert [t["index_bytes"] for t in tiers] == [t["chunks"] * per_chunk for t in tiers]
        # `bank info --tensor-parallel-size` predicts both tiers per rank
        layout = layout_bytes(bank, tp)
        assert layout.gpu_index_per_rank == max(
            t["index_bytes"] + t["chunks"] * CHUNK_MAP_BYTES for t in tiers
        ) + DOCUMENT_TABLE_BYTES * bank.num_documents
        assert [t["host_bytes"] for t in tiers] == [layout.host_per_rank] * tp
        # balanced by chunks: no shard exceeds its share by more than the largest document
        largest = int(bank.doc_num_chunks.max())
        assert max(t["chunks"] for t in tiers) <= bank.num_chunks / tp + largest


@pytest.fixture(scope="module")
def tp2(checkpoints, banks, tp1):
    with engine(checkpoints(), banks, 2, logits_processors=[ScriptedOutputs]) as llm:
        yield llm


def test_tp2_shards_serve_like_the_reference_and_tp1(tp2, banks, tp1, checkpoints):
    check_serving(tp2, banks, ["uneven", "twins", "docs", "small"], tp1, checkpoints())
    check_shares(tp2, banks, 2)


def test_tp2_tie_across_shards_goes_to_the_smaller_id(tp2, banks):
    twins = banks["twins"]
    bounds = shard_bounds(twins.doc_chunk_offsets.numpy(), 2)
    position = {d: i for i, d in enumerate(twins.doc_ids)}
    original, twin = twins.doc_ids[1], 0
    shard_of = [int((bounds[1:] <= position[d]).sum()) for d in (original, twin)]
    assert shard_of == [0, 1]  # the pair straddles the two shards
    (everything, _) = ask(tp2, "twins", twins, top_k=twins.num_documents)
    for layer, report in everything.kv_transfer_params["msa_selection"]["layers"].items():
        ids, scores = report["doc_ids"], report["scores"]
        first = ids.index(twin)
        assert ids[first + 1] == original and scores[first] == scores[first + 1], layer
        # k cuts between the two: only the smaller id is selected
        (cut, _) = ask(tp2, "twins", twins, top_k=first + 1)
        chosen = ordered(cut)[layer]
        assert twin in chosen and original not in chosen, layer


def test_tp2_mixed_batch_equals_solo_runs(tp2, banks):
    tokenizer = tp2.get_tokenizer()
    ids = [expected_prompt(tokenizer, q)[0] for q in QUESTIONS]
    requests = [(ids[0], {"msa_bank": "uneven", "msa_return_selection": True}),
                (ids[1], {"msa_bank": ""}),  # plain Qwen3 beside memory requests
                (ids[1], {"msa_bank": "twins", "msa_return_selection": True}),
                (ids[0], {"msa_bank": "docs", "msa_return_selection": True})]
    batch = tp2.generate([{"prompt_token_ids": p} for p, _ in requests],
                         [sampling(**extra) for _, extra in requests], use_tqdm=False)
    for (prompt, extra), together in zip(requests, batch, strict=True):
        (alone,) = tp2.generate([{"prompt_token_ids": prompt}], [sampling(**extra)],
                                use_tqdm=False)
        assert list(together.outputs[0].token_ids) == list(alone.outputs[0].token_ids)
        if extra["msa_bank"]:
            assert ordered(together) == ordered(alone)
        for a, b in zip(together.outputs[0].logprobs, alone.outputs[0].logprobs, strict=True):
            assert a.keys() == b.keys()
            assert all(abs(a[t].logprob - b[t].logprob) <= 1e-4 for t in a)


def test_tp2_memory_interleave_equals_the_reference(tp2, banks, checkpoints):
    from vllm_msa.interleave import answer

    bank = banks["docs"]
    tokenizer = tp2.get_tokenizer()
    question, texts = SCENARIOS["several ids"]
    expected, params = scripted(tokenizer, question, [encode(tokenizer, t) for t in texts],
                                bank)
    (result,) = answer(tp2, [question], sampling_params=[params], bank="docs")
    check_protocol(result, expected)
    ref, docs = ReferenceMSA(checkpoints()), bank_docs(tokenizer, bank)
    for step in result.steps:
        check_against_model(step, ref, docs)


def test_tp2_ranks_switch_generation_together(tp2, banks):
    """A removal reaches both ranks in one collective call between steps (what the edit
    route does): both route over the new generation at once, each over its own shard."""
    from vllm_msa.bank import remove_documents

    live = banks["live"]
    (before, _) = ask(tp2, "live", live, top_k=live.num_documents)
    layer = min(before.kv_transfer_params["msa_selection"]["layers"], key=int)
    ranking = before.kv_transfer_params["msa_selection"]["layers"][layer]
    bounds = shard_bounds(live.doc_chunk_offsets.numpy(), 2)
    position = {d: i for i, d in enumerate(live.doc_ids)}
    # One document from each rank's shard.
    gone = [next(d for d in ranking["doc_ids"] if (position[d] >= bounds[1]) == rank)
            for rank in (0, 1)]
    remove_documents(live.path, gone)
    switched = tp2.collective_rpc("msa_apply_generation", args=("live",))
    assert [(r["tp_rank"], r["generation"], sorted(r["removed"])) for r in switched] == [
        (0, 1, sorted(gone)), (1, 1, sorted(gone))]
    (after, _) = ask(tp2, "live", live, top_k=live.num_documents)
    report = after.kv_transfer_params["msa_selection"]["layers"][layer]
    keep = [(d, x) for d, x in zip(ranking["doc_ids"], ranking["scores"], strict=True)
            if d not in gone]
    assert list(zip(report["doc_ids"], report["scores"], strict=True)) == keep
    for other in after.kv_transfer_params["msa_selection"]["layers"].values():
        assert not set(gone) & set(other["doc_ids"])
        assert len(other["doc_ids"]) == live.num_documents - 2


def test_tp2_ranks_encode_and_grow_together(tp2, banks, checkpoints):
    """A live add on TP=2 (`add_served`, what the POST route does): each rank captures its
    own KV head of the new documents, the rows put together are the float64 stage 1's, the
    last rank's shard grows by them while rank 0's stays, and both ranks serve the new
    generation as the float64 reference does."""
    from vllm_msa.serving.llm_edits import add_served

    long_text = " ".join(f"Entry {i}: the keeper logged the weather and the ships."
                         for i in range(10))
    before = [s["bank_tiers"]["live"] for s in tp2.collective_rpc("msa_state")]
    edited = add_served(tp2, "live", [{"id": 300, "text": "The river Alder flooded the old "
                                       "mill in 1821."}, {"id": 301, "text": long_text}])
    bank = MemoryBank.open(banks["live"].path)
    assert bank.generation == edited.generation and bank.doc_ids[-2:] == [300, 301]
    ref = ReferenceMSA(checkpoints())
    tokenizer = tp2.get_tokenizer()
    for doc_id, ids in bank_docs(tokenizer, bank)[-2:]:
        expected = ref.encode_document(ids)
        rows = bank.chunk_doc_ids == doc_id
        for layer in ref.router_layers:
            got = bank.layer(layer)
            for name in ("routing_keys", "keys", "values"):
                err = (getattr(got, name)[rows].double() - expected[layer][name]).abs().max()
                assert err.item() <= 1e-4, (doc_id, layer, name)
    after = [s["bank_tiers"]["live"] for s in tp2.collective_rpc("msa_state")]
    assert after[0]["documents"] == before[0]["documents"]
    assert after[1]["documents"] == [before[1]["documents"][0],
                                     bank.physical.doc_ids.numel()]
    for question, output in zip(QUESTIONS, ask(tp2, "live", bank), strict=True):
        ids, span = expected_prompt(tokenizer, question)
        want = reference_answer(ref, ids, span, bank_docs(tokenizer, bank), top_k=4,
                                rope_offset_k=4, template_len=span[0],
                                max_tokens=len(output.outputs[0].token_ids))
        check_against_reference(output, want, ref.router_layers)
    (everything, _) = ask(tp2, "live", bank, top_k=bank.num_documents)
    for report in everything.kv_transfer_params["msa_selection"]["layers"].values():
        assert {300, 301} <= set(report["doc_ids"])


def test_tp4_shards_with_an_empty_one(checkpoints, banks, tp1):
    served = {name: banks[name] for name in ("uneven", "small")}
    bounds = shard_bounds(banks["small"].doc_chunk_offsets.numpy(), 4).tolist()
    assert len(set(bounds)) < len(bounds)  # 3 documents over 4 ranks: a shard is empty
    with engine(checkpoints(), served, 4) as llm:
        check_serving(llm, served, list(served), tp1, checkpoints())
        check_shares(llm, served, 4)


def mapping_processes(path: str) -> set[int]:
    """Processes whose address space maps `path` (from /proc/*/maps)."""
    pids = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            if path in maps.read_text():
                pids.add(int(maps.parent.name))
    return pids


def test_engines_of_a_node_map_one_host_copy(server, tp1, banks):
    """Two engine processes serving the same bank (the shared HTTP server and the TP=1 engine,
    as two data-parallel replicas would) map one host copy: the same shared-memory files,
    whose bytes are one host tier, not two."""
    from vllm_msa.attention import host_share

    (state,) = tp1["llm"].collective_rpc("msa_state")
    files = state["bank_tiers"]["docs"]["shared_files"]
    bank = banks["docs"]
    assert len(files) == 2 * len(bank.router_layers)  # K̄ and V̄ of every router layer
    assert sum(Path(f).stat().st_size for f in files) == bank.tier_bytes()["host_kv"]
    # (Other engines of this module split the heads otherwise: their tiers are other files.)
    assert not list(host_share.SHM_DIR.glob(Path(files[0]).name.split("-L")[0] + "*.partial"))
    for f in files:
        assert len(mapping_processes(f)) >= 2, f  # the server's worker and this engine's


# ---------------------------------------------------------------- ranks that disagree
def _check_in_rank(rank, store, paths, out):
    import torch.distributed as dist

    from vllm_msa.attention.index_parallel import check_same_bank
    from vllm_msa.bank.reader import MemoryBank

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=len(paths))
    try:
        check_same_bank("docs", MemoryBank.open(paths[rank]), len(paths),
                        group=dist.group.WORLD)
        out.put((rank, None))
    except Exception as e:
        out.put((rank, str(e)))
    finally:
        dist.destroy_process_group()


def ranks_check(paths, tmp_path) -> dict[int, str | None]:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_check_in_rank, args=(r, str(tmp_path / "store"), paths, out))
             for r in range(len(paths))]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    return results


def test_ranks_that_opened_different_banks_refuse_to_start(default_banks, tmp_path):
    docs, small = (str(default_banks[n].path) for n in ("docs", "small"))
    (tmp_path / "same").mkdir()
    (tmp_path / "differ").mkdir()
    assert ranks_check([docs, docs], tmp_path / "same") == {0: None, 1: None}
    refused = ranks_check([docs, small], tmp_path / "differ")
    for rank in (0, 1):
        assert "differs across tensor-parallel ranks" in refused[rank]
        assert f"rank 1: {small}" in refused[rank]
