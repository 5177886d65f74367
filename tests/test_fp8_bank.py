"""FP8 banks (vllm_msa/bank/quant.py, dtypes.py, convert.py): K̄/V̄ stored as float8_e4m3fn
with a power-of-two scale per chunk and KV head, dequantised on the way to the device.

- The quantiser keeps its stated bound (hypothesis) and dequantises exactly into bf16/fp32.
- Every model dtype round-trips with and without FP8 (synth, convert, `layer()`, sizes).
- A conversion killed with SIGKILL never loads, and re-running it finishes the same bank.
- Missing or corrupt scales are refused with the reason, at open or at load.
- Served through the real engine, an FP8 bank equals the float64 reference fed the bank's
  stored values (read here with safetensors, dequantised from the spec of the format) token
  for token and logprob for logprob, with the reference's own selections; against the
  full-precision bank the selections are the same and the logprob drift is measured.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import kill_group_when, running_llm
from hypothesis import given, settings
from hypothesis import strategies as st
from msa_reference import reference_answer
from reference import ReferenceMSA
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_serving import (
    MAX_TOKENS,
    QUESTIONS,
    bank_docs,
    check_against_reference,
    expected_prompt,
    sampling,
)

from vllm_msa.bank import BankError, MemoryBank
from vllm_msa.bank.convert import convert_bank
from vllm_msa.bank.format import blake3_file, sha256_file
from vllm_msa.bank.quant import (
    ABSOLUTE_BOUND,
    RELATIVE_BOUND,
    dequantize,
    quantize,
)
from vllm_msa.bank.synth import plan_synth, synth_bank
from vllm_msa.bank.virtual import write_virtual

FP8_MAX = 448.0  # e4m3fn's largest finite value
# The worst logprob drift (any of the top-5 of any generated token) an FP8 K/V tier caused
# against the full-precision bank in the serving test below; measured, see the README.
DRIFT_TOL = 0.05


# ------------------------------------------------------------------ the quantiser
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 3), st.sampled_from([1, 7, 64]),
       st.floats(-30, 30), st.integers(0, 2**31 - 1))
def test_quantiser_bound_and_exact_dequantisation(rows, heads, head_dim, log2_scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, heads, head_dim, generator=g, dtype=torch.float64)
    x = (x * 2.0**log2_scale).float()
    x[0, 0, 0] = 0.0  # zeros, and a row-head of zeros, must come back as zeros
    if rows > 1:
        x[1] = 0.0
    values, scale = quantize(x)
    assert values.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert (torch.frexp(scale).mantissa == 0.5).all()  # powers of two
    assert (x.abs().amax(-1) / scale <= FP8_MAX).all()
    back = dequantize(values, scale, torch.float32)
    # e4m3: 3 mantissa bits (half-ulp 2^-4 relative) above 2^-6, spacing 2^-9 below.
    bound = torch.maximum(RELATIVE_BOUND * x.abs(), ABSOLUTE_BOUND * scale[..., None])
    assert ((back - x).abs() <= bound).all()
    assert (back[x == 0] == 0).all()
    # 4 significant bits times a power of two: bfloat16 holds it exactly.
    in_range = (x.abs() < 1e38).all() and (x[x != 0].abs() > 1e-30).all()
    if in_range:
        assert torch.equal(dequantize(values, scale, torch.bfloat16).float(), back)


def _attention(q, keys, values, scale):
    """Softmax attention in float64, q [heads, hd] over keys/values [rows, kv, hd] (GQA)."""
    group = q.shape[0] // keys.shape[1]
    k, v = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    p = (torch.einsum("hd,rhd->hr", q, k) * scale).softmax(-1)
    return torch.einsum("hr,rhd->hd", p, v)


@settings(max_examples=80, deadline=None)
@given(st.sampled_from([(4, 4), (4, 2), (4, 1)]), st.integers(1, 40), st.integers(0, 8),
       st.floats(-4, 4), st.floats(0, 3), st.integers(0, 2**31 - 1))
def test_memory_attention_drift_within_the_derived_bound(heads, rows, local, log2_k,
                                                         log2_q, seed):
    """`quant.attention_drift_bound` holds for MHA, GQA and MQA, logits small or saturated,
    with exact entries (the template head, the request's own tokens) merged in."""
    from vllm_msa.bank.quant import attention_drift_bound

    num_heads, kv = heads
    g = torch.Generator().manual_seed(seed)
    hd, scale = 16, 16**-0.5

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    keys, values = randn(rows, kv, hd) * 2.0**log2_k, randn(rows, kv, hd)
    q = randn(num_heads, hd) * 2.0**log2_q
    (k8, sk), (v8, sv) = quantize(keys.float()), quantize(values.float())
    k_hat, v_hat = (dequantize(t, s_, torch.float64) for t, s_ in ((k8, sk), (v8, sv)))
    own_k, own_v = randn(local, kv, hd), randn(local, kv, hd)
    exact = _attention(q, torch.cat([own_k, keys.float().double()]),
                       torch.cat([own_v, values.float().double()]), scale)
    served = _attention(q, torch.cat([own_k, k_hat]), torch.cat([own_v, v_hat]), scale)
    bound = attention_drift_bound(q, k_hat, v_hat, sk, sv, scale, own_v)
    assert ((served - exact).abs() <= bound * (1 + 1e-9) + 1e-12).all()


def test_quantisation_error_on_unit_normal_rows():
    """The figures docs/compressed-banks.md quotes: the bound holds, RMS error ~2.7 %."""
    from vllm_msa.bank.quant import quantisation_error

    x = torch.randn(2000, 8, 128, generator=torch.Generator().manual_seed(0))
    error = quantisation_error(x.bfloat16())
    assert error["worst_vs_bound"] <= 1.0
    assert 0.02 < error["rms_relative_to_rms"] < 0.035


# ------------------------------------------------------------------ formats and conversion
@pytest.mark.parametrize("model_dtype", ["float32", "bfloat16", "float16"])
def test_every_dtype_round_trips(checkpoints, tmp_path, model_dtype):
    ckpt = checkpoints()
    full = synth_bank(plan_synth(ckpt, 3_000, 90, dtype=model_dtype, segment_mb=0.01),
                      tmp_path / "full", progress=False)
    plan8 = plan_synth(ckpt, 3_000, 90, dtype=model_dtype, segment_mb=0.01,
                       bank_dtype="fp8_e4m3")
    predicted = plan8.predicted_manifest()
    synth8 = synth_bank(plan8, tmp_path / "synth8", progress=False)
    conv8 = convert_bank(full.path, tmp_path / "conv8", "fp8_e4m3", progress=False)
    assert full.manifest["format_version"] == 1 and "tiers" not in full.manifest
    for bank in (synth8, conv8):
        assert bank.manifest["format_version"] == 2
        assert bank.manifest["tiers"] == {"index": model_dtype, "kv": "float8_e4m3fn"}
        assert bank.verify() == []
    assert {k: v["bytes"] for k, v in synth8.manifest["files"].items()} == {
        k: v["bytes"] for k, v in predicted["files"].items()}
    for layer in full.router_layers:
        want, got8, conv = full.layer(layer), synth8.layer(layer), conv8.layer(layer)
        assert torch.equal(conv.routing_keys, want.routing_keys)  # the index stays exact
        assert torch.equal(got8.routing_keys, want.routing_keys)
        for name in ("keys", "values"):
            exact = getattr(want, name)
            q, s = quantize(exact)
            assert getattr(conv, name).dtype == exact.dtype
            assert torch.equal(getattr(conv, name), dequantize(q, s, exact.dtype))
            assert torch.equal(getattr(got8, name), getattr(conv, name))
    info = full.model_info
    values = full.num_chunks * info.num_kv_heads * info.head_dim * len(info.router_layers)
    itemsize = torch.empty((), dtype=full.dtype).element_size()
    assert full.tier_bytes()["host_kv"] == 2 * values * itemsize
    assert conv8.tier_bytes()["host_kv"] == 2 * values * (1 + 4 / info.head_dim)
    assert conv8.tier_bytes()["gpu_index"] == full.tier_bytes()["gpu_index"]
    # Back to the model's dtype: format 1 again, the dequantised values kept.
    back = convert_bank(conv8.path, tmp_path / "back", "auto", progress=False)
    assert back.manifest["format_version"] == 1
    assert torch.equal(back.layer(info.router_layers[0]).keys,
                       conv8.layer(info.router_layers[0]).keys)
    # `bank info` names each tier's dtype.
    out = subprocess.run([sys.executable, "-m", "vllm_msa.cli", "bank", "info", "--json",
                          str(conv8.path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["tiers"] == {"index": model_dtype, "kv": "float8_e4m3fn"}
    assert summary["synthetic"] and summary["bytes"]["host_kv"] == conv8.tier_bytes()["host_kv"]


def _committed(out) -> int:
    try:
        return len(json.loads((out / "build-state.json").read_text())["segments"])
    except (OSError, ValueError, KeyError):
        return 0


def test_killed_conversion_never_loads_and_rerun_finishes(checkpoints, tmp_path):
    # 400 small segments: a conversion that lasts long enough to be killed in the middle.
    src = synth_bank(plan_synth(checkpoints(), 60_000, 150, dtype="float32", segment_mb=0.03),
                     tmp_path / "src", progress=False)
    src_files = {p: sha256_file(p) for p in sorted(src.path.rglob("*")) if p.is_file()}
    out = tmp_path / "fp8"
    cmd = [sys.executable, "-m", "vllm_msa.cli", "bank", "convert", str(src.path), "--out",
           str(out), "--bank-dtype", "fp8_e4m3", "--no-progress"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    kill_group_when(proc, lambda: _committed(out) >= 2, 120, "segment converted")
    assert 2 <= _committed(out) < len(src.manifest["segments"])
    with pytest.raises(BankError, match="unfinished bank build"):
        MemoryBank.open(out)
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = MemoryBank.open(out)
    clean = convert_bank(src.path, tmp_path / "clean", "fp8_e4m3", progress=False)
    assert resumed.verify() == []
    assert resumed.manifest["files"] == clean.manifest["files"]  # byte-identical data
    # The source was only read.
    assert {p: sha256_file(p) for p in sorted(src.path.rglob("*")) if p.is_file()} == src_files
    # Running it once more returns the finished bank; another dtype into it is refused.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    with pytest.raises(BankError, match="already holds a different bank"):
        convert_bank(src.path, out, "auto", progress=False)


# ------------------------------------------------------------------ refusals
def _rewrite_segment(bank: MemoryBank, edit) -> None:
    """Apply `edit` to the first segment's tensors and re-sign it in the manifest, as a
    buggy writer would (the checksums then vouch for the damage)."""
    seg = bank.manifest["segments"][0]["file"]
    path = bank.path / seg
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    manifest = json.loads((bank.path / "manifest.json").read_text())
    manifest["files"][seg] = {"sha256": sha256_file(path), "blake3": blake3_file(path),
                              "bytes": path.stat().st_size}
    (bank.path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", ["missing", "nan", "zero", "not a power of two"])
def test_bad_scales_are_refused_with_the_reason(checkpoints, tmp_path, damage):
    from vllm_msa.attention.tiers import ServedBank

    bank = synth_bank(plan_synth(checkpoints(), 2_000, 90, dtype="float32",
                                 bank_dtype="fp8_e4m3"), tmp_path / "b", progress=False)
    layer = bank.router_layers[-1]
    key = f"layer.{layer}.values.scale"

    def edit(tensors):
        if damage == "missing":
            del tensors[key]
        else:
            value = {"nan": float("nan"), "zero": 0.0, "not a power of two": 3.0}[damage]
            tensors[key][1, 0] = value

    _rewrite_segment(bank, edit)
    heads = slice(0, bank.model_info.num_kv_heads)
    if damage == "missing":
        with pytest.raises(BankError, match="holds tensors"):
            MemoryBank.open(bank.path)
        return
    reopened = MemoryBank.open(bank.path)
    reason = {"nan": "non-finite scales", "zero": "scales <= 0",
              "not a power of two": "not powers of two"}[damage]
    with pytest.raises(BankError, match=reason):
        ServedBank.load("b", reopened, torch.device("cpu"), heads)
    with pytest.raises(BankError, match=reason):  # verify: false does not skip it
        ServedBank.load("b", reopened, torch.device("cpu"), heads, verify=False)


def test_a_flipped_fp8_byte_fails_its_checksum(checkpoints, tmp_path):
    from vllm_msa.attention.tiers import ServedBank

    bank = synth_bank(plan_synth(checkpoints(), 2_000, 90, dtype="float32",
                                 bank_dtype="fp8_e4m3"), tmp_path / "b", progress=False)
    path = bank.path / bank.manifest["segments"][0]["file"]
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BankError, match="corrupt"):
        ServedBank.load("b", MemoryBank.open(bank.path), torch.device("cpu"),
                        slice(0, bank.model_info.num_kv_heads))


# ------------------------------------------------------------------ serving
def stored_kv(bank: MemoryBank) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The bank's K̄/V̄ as stored, in float64, read with safetensors and dequantised from the
    format's definition (value x its row-head's scale), not through vllm_msa."""
    out = {}
    for layer in bank.router_layers:
        parts = {"keys": [], "values": []}
        for seg in bank.manifest["segments"]:
            with safe_open(bank.path / seg["file"], framework="pt") as f:
                for name in parts:
                    raw = f.get_tensor(f"layer.{layer}.{name}").double()
                    scale = f.get_tensor(f"layer.{layer}.{name}.scale").double()
                    parts[name].append(raw * scale[..., None])
        out[layer] = (torch.cat(parts["keys"]), torch.cat(parts["values"]))
    return out


# The edited bank (`edited_banks`): removed ids, one replaced id, added ids.
REMOVED, REPLACED, ADDED = [3, 17, 20], 5, [40, 41]


def edited_banks(ckpt, full: MemoryBank, out) -> tuple[MemoryBank, MemoryBank]:
    """A copy of `full` edited (ids REMOVED removed, REPLACED replaced by a new text, ADDED
    added; the new documents encoded by `fake_encoder`, no engine start) with tombstones,
    and the same bank compacted."""
    import shutil

    from fake_encoder import FakeEncoder

    from vllm_msa.bank import add_documents, compact_bank, remove_documents

    edited = out / "edited"
    shutil.copytree(full.path, edited)
    docs = out / "added.jsonl"
    docs.write_text("".join(json.dumps({"id": i, "text": text}) + "\n" for i, text in (
        (REPLACED, "The ferry to the island now leaves from the northern pier at dawn."),
        (ADDED[0], "A violin maker in Cremona restored the cracked cello for the festival."),
        (ADDED[1], "The orchard's oldest pear tree was grafted by the miller's daughter."))))
    add_documents(edited, ckpt, docs, replace=True, progress=False, llm=FakeEncoder(ckpt))
    bank = remove_documents(edited, REMOVED)
    compact = out / "compacted"
    shutil.copytree(edited, compact)
    return bank, compact_bank(compact, progress=False)


@pytest.fixture(scope="module")
def fp8_served(checkpoints, default_banks, tmp_path_factory):
    """One engine: the default bank, its FP8 conversion, a virtual FP8 bank (17 synthetic
    documents of 37 tokens, generated as the engine opens it), and an edited bank served
    with its tombstones beside its compaction."""
    ckpt = checkpoints()
    full = default_banks["docs"]
    out = tmp_path_factory.mktemp("fp8")
    edited, compacted = edited_banks(ckpt, full, out)
    assert edited.has_removals and not compacted.has_removals
    fp8 = convert_bank(full.path, out / "docs8", "fp8_e4m3", progress=False)
    virtual = write_virtual(plan_synth(ckpt, 600, 37, dtype="float32", seed=3,
                                       bank_dtype="fp8_e4m3"), out / "virtual")
    banks = {name: str(path) for name, path in
             (("docs", full.path), ("docs8", fp8.path), ("virtual", virtual.path))}
    # The same two banks again from disk, through caches of two requests' worst case (the
    # engine's max_num_seqs), a fraction of each bank.
    for name, bank in (("docs-disk", full), ("docs8-disk", fp8)):
        info = bank.model_info
        rows = 2 * bank.doc_num_chunks.sort(descending=True).values[:4].sum().item()
        assert rows < bank.num_chunks / 2
        row_bytes = 2 * len(info.router_layers) * info.num_kv_heads * info.head_dim * \
            bank.dtypes.element_bytes("keys", info.head_dim)
        banks[name] = {"path": str(bank.path), "host_cache_gib": rows * row_bytes / 2**30}
    # The same banks with 8-bit routing indexes (`compressed_index.py`), quantised at load.
    for name, path, dtype in (("docs-int8", full.path, "int8"),
                              ("docs8-e4m3", fp8.path, "fp8_e4m3"),
                              ("virtual-int8", virtual.path, "int8"),
                              ("edited-int8", edited.path, "int8")):
        banks[name] = {"path": str(path), "index_dtype": dtype}
    banks["edited"], banks["compacted"] = str(edited.path), str(compacted.path)
    banks["edited-disk"] = {"path": str(edited.path), "host_cache_gib": banks["docs-disk"][
        "host_cache_gib"]}
    with running_llm(model=str(ckpt), enforce_eager=True, max_num_seqs=2,
                     additional_config={"msa": {"banks": banks}}) as llm:
        yield {"llm": llm, "ref": ReferenceMSA(ckpt), "full": full, "fp8": fp8,
               "virtual": virtual, "edited": edited}


@pytest.mark.slow
def test_fp8_bank_serves_its_stored_values_exactly(fp8_served):
    llm, ref, full, fp8 = (fp8_served[k] for k in ("llm", "ref", "full", "fp8"))
    tokenizer = llm.get_tokenizer()
    memory = stored_kv(fp8)
    prompts = [expected_prompt(tokenizer, q) for q in QUESTIONS]
    params = [sampling(msa_bank=name, msa_return_selection=True)
              for name in ("docs8", "docs") for _ in prompts]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids, _ in prompts] * 2, params,
                           use_tqdm=False)
    drift = 0.0
    docs = bank_docs(tokenizer, full)
    for (ids, span), got8, got in zip(prompts, outputs[:len(prompts)], outputs[len(prompts):],
                                      strict=True):
        kwargs = {"top_k": 4, "rope_offset_k": 4, "template_len": span[0],
                  "max_tokens": MAX_TOKENS}
        # Exact: the reference attending to the FP8 bank's stored values.
        want8 = reference_answer(ref, ids, span, docs, memory_kv=memory, **kwargs)
        check_against_reference(got8, want8, ref.router_layers)
        # Against the full-precision bank: the same documents, logprobs within the drift.
        want = reference_answer(ref, ids, span, docs, **kwargs)
        check_against_reference(got, want, ref.router_layers)
        assert want8.selections == want.selections
        assert list(got8.outputs[0].token_ids) == want.tokens
        for step, top in enumerate(got8.outputs[0].logprobs):
            for token_id, logprob in top.items():
                drift = max(drift, abs(logprob.logprob - want.logprobs[step][token_id].item()))
    print(f"FP8 K/V drift vs the full-precision bank: max |dlogprob| = {drift:.2e}")
    assert drift <= DRIFT_TOL


@pytest.mark.slow
def test_virtual_bank_serves_the_tensors_it_defines(fp8_served):
    """A virtual bank (a manifest only) serves exactly what `MemoryBank.layer()` generates:
    selections and logprobs equal the float64 reference fed those tensors."""
    from msa_reference import BankLayer

    llm, ref, bank = fp8_served["llm"], fp8_served["ref"], fp8_served["virtual"]
    assert [p.name for p in bank.path.iterdir()] == ["manifest.json"]
    chunk_doc = bank.chunk_doc_ids.tolist()
    memory = {layer: BankLayer(routing_keys=t.routing_keys.double(), keys=t.keys.double(),
                               values=t.values.double(), chunk_doc=chunk_doc)
              for layer in bank.router_layers for t in [bank.layer(layer)]}
    tokenizer = llm.get_tokenizer()
    prompts = [expected_prompt(tokenizer, q) for q in QUESTIONS]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids, _ in prompts],
                           [sampling(msa_bank="virtual", msa_return_selection=True)] * 2,
                           use_tqdm=False)
    for (ids, span), got in zip(prompts, outputs, strict=True):
        want = reference_answer(ref, ids, span, [], top_k=4, rope_offset_k=4,
                                template_len=span[0], max_tokens=MAX_TOKENS, memory=memory)
        check_against_reference(got, want, ref.router_layers)


def cache_stats(worker) -> dict:
    from vllm_msa.attention.runtime import current_runtime

    return {name: bank.host_cache.stats() for name, bank in current_runtime().banks.items()
            if bank.host_cache is not None}


CACHE_QUESTIONS = [*QUESTIONS, "What did the baker sell?", "Where was the treaty signed?",
                   "Who found the silver key?", "When did the storm reach the harbour?"]


def assert_banks_serve_alike(llm, pairs) -> None:
    """Each pair of banks (the same documents, served two ways) gives the same tokens,
    logprobs and selections (documents and scores in every router layer, best first)."""
    tokenizer = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": expected_prompt(tokenizer, q)[0]} for q in CACHE_QUESTIONS]
    for first, second in pairs:
        want, got = (llm.generate(prompts, [sampling(msa_bank=name, msa_return_selection=True)]
                                  * len(prompts), use_tqdm=False)
                     for name in (first, second))
        for a, b in zip(got, want, strict=True):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            # (the reports name the bank: compare their layers)
            assert a.kv_transfer_params["msa_selection"]["layers"] == \
                b.kv_transfer_params["msa_selection"]["layers"]
            for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
                assert {t: v.logprob for t, v in x.items()} == {
                    t: v.logprob for t, v in y.items()}


@pytest.mark.slow
def test_edited_bank_serves_what_its_compaction_serves(fp8_served):
    """A bank with tombstones, served in its stored layout (removed documents masked out of
    routing), gives the tokens, logprobs and selections of the same bank rewritten without
    them: from RAM, from disk, and over an int8 index; a removed document is never selected,
    even when a request asks for every document."""
    llm, edited = fp8_served["llm"], fp8_served["edited"]
    assert_banks_serve_alike(llm, (("compacted", "edited"), ("compacted", "edited-disk"),
                                   ("compacted", "edited-int8")))
    tokenizer = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": expected_prompt(tokenizer, q)[0]} for q in CACHE_QUESTIONS]
    live = edited.num_documents
    assert live == 24 - len(REMOVED) + len(ADDED)
    for name in ("edited", "edited-int8"):  # (the disk tier's cache holds the default top-k)
        outputs = llm.generate(prompts, [sampling(msa_bank=name, msa_top_k=live,
                                                  msa_return_selection=True)] * len(prompts),
                               use_tqdm=False)
        for output in outputs:
            for report in output.kv_transfer_params["msa_selection"]["layers"].values():
                assert sorted(report["doc_ids"]) == sorted(edited.doc_ids), name


@pytest.mark.slow
def test_disk_tier_serves_what_the_bank_in_ram_serves(fp8_served):
    """A cache much smaller than the bank (documents read from the files as selected, the
    least recently selected evicted) changes nothing: same tokens, logprobs, selections."""
    llm = fp8_served["llm"]
    assert_banks_serve_alike(llm, (("docs", "docs-disk"), ("docs8", "docs8-disk")))
    stats = llm.collective_rpc(cache_stats)[0]
    for name in ("docs-disk", "docs8-disk"):
        assert stats[name]["evictions"] > 0 and stats[name]["hits"] > 0, stats[name]


def index_state(worker) -> dict:
    from vllm_msa.worker_state import runtime_state

    return runtime_state()["bank_tiers"]


@pytest.mark.slow
def test_8bit_index_serves_what_the_full_index_serves(fp8_served):
    """A bank served from an 8-bit routing index (int8 or e4m3, the disk files or a virtual
    bank's generator as the exact keys) gives the same tokens, logprobs and selections, best
    first, as the same bank's full-precision index."""
    llm = fp8_served["llm"]
    assert_banks_serve_alike(llm, (("docs", "docs-int8"), ("docs8", "docs8-e4m3"),
                                   ("virtual", "virtual-int8")))
    state = llm.collective_rpc(index_state)[0]
    for name, dtype in (("docs-int8", "int8"), ("docs8-e4m3", "fp8_e4m3"),
                        ("virtual-int8", "int8")):
        tier, full = state[name], state[name.split("-")[0]]
        assert tier["index_dtype"] == dtype and tier["index_bytes"] < full["index_bytes"]
        rescore = tier["rescore"]
        assert rescore["calls"] > 0 and rescore["requests"] >= len(CACHE_QUESTIONS), rescore
        assert 0 < rescore["candidates"] <= rescore["documents"], rescore
    assert state["docs"]["rescore"] is None
