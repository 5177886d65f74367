"""The engine-start kernel warm-up (vllm_msa/attention/warmup.py) launches every Triton
variant that routing and staging can reach while serving, so none compiles in front of a
request.

A spy around each kernel records the variant Triton compiles for a launch: the compile-time
constants and launch options, each pointer's dtype and 16-byte alignment, and each integer
argument the kernel specialises on (== 1, divisible by 16, 32 or 64 bits; not those marked
`do_not_specialize`). The warm-up runs first; then routing and staging run as the runtime
calls them (`route_batched_keys`, `StagingPool.stage_routed` / `stage_documents`) for steps of
many token and request counts. Every variant of those must be one the warm-up launched.
(Memory attention's variants depend on the fused GPU path's tensors: the GPU serving test
checks them, with Triton's compile hook, in a running engine.)

Runs on the GPU, or on CPU under Triton's interpreter (a child process, see
`triton_interpreter.py`), where the kernels read CPU tensors as if the host tier were pinned.
"""

from __future__ import annotations

import inspect
from collections import defaultdict

import pytest
import torch
from triton_interpreter import (
    DEVICE,
    INTERPRET,
    needs_kernel,
    parent_only,
    rerun_under_interpreter,
)

from vllm_msa.attention.bounded_routing import CompressedRoutingIndex, route_compressed
from vllm_msa.attention.router import routing_params
from vllm_msa.attention.staging import StagingPool
from vllm_msa.attention.tiers import ServedBank
from vllm_msa.attention.warmup import WARMUP_OWNER, routing_shapes, warm_up_kernels
from vllm_msa.bank import MemoryBank, ModelInfo
from vllm_msa.cli import main
from vllm_msa.config import MSAParams
from vllm_msa.tiny import TinySpec

MAX_TOKENS, MAX_REQUESTS = 300, 24
# Steps as routing tokens per request, on both sides of every token-block boundary (16, 32,
# 64, 128; with query_reduce "last", one token per request: 16 and 24 requests).
STEPS = [[1], [2, 3], [16], [17], [33], [64], [65], [129], [150, 150], [1] * 17, [1] * 24]


class VariantSpy:
    """Stands in for a Triton kernel (`kernel[grid](...)`) and records, per launch, what
    Triton keys its compiled variants on."""

    def __init__(self, kernel, seen: dict[str, set]):
        self.kernel, self.seen = kernel, seen
        self.fn = kernel.fn
        self.params = inspect.signature(self.fn).parameters
        options = getattr(kernel, "kwargs", None) or {}  # the interpreter keeps jit's kwargs
        dns = getattr(kernel, "do_not_specialize", None) or options.get("do_not_specialize")
        names = list(self.params)
        self.not_specialised = {names[d] if isinstance(d, int) else d for d in dns or ()}

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.seen[self.fn.__name__].add(self.variant(args, kwargs))
            return launch(*args, **kwargs)

        return run

    def variant(self, args, kwargs) -> tuple:
        options = tuple(sorted((k, kwargs[k]) for k in kwargs if k not in self.params))
        bound = dict(zip(self.params, args, strict=False))
        bound.update({k: v for k, v in kwargs.items() if k in self.params})
        key = []
        for name, param in self.params.items():
            value = bound.get(name, param.default)
            if "constexpr" in str(param.annotation):
                key.append((name, value))
            elif hasattr(value, "data_ptr"):
                key.append((name, str(value.dtype), value.data_ptr() % 16 == 0))
            elif isinstance(value, bool) or value is None:
                key.append((name, value))
            elif isinstance(value, int):
                width = 32 if -2**31 <= value < 2**31 else 64
                if name in self.not_specialised:
                    key.append((name, width))
                else:
                    key.append((name, width, value == 1, value % 16 == 0))
            else:
                key.append((name, type(value).__name__))
        return (*key, *options)


@pytest.fixture
def spies(monkeypatch):
    """Spies on the routing, staging and gather kernels; variants seen, by kernel name."""
    from vllm_msa.kernels import fetch, stage
    from vllm_msa.kernels import routing as rk
    from vllm_msa.kernels import routing_bounds as rb

    seen: dict[str, set] = defaultdict(set)
    for name in ("_prepare_queries_kernel", "_chunk_scores_kernel", "_document_keys_kernel",
                 "_candidate_documents_kernel"):
        monkeypatch.setattr(rk, name, VariantSpy(getattr(rk, name), seen))
    for name in ("_bound_rows_kernel", "_bound_requests_kernel"):
        monkeypatch.setattr(rb, name, VariantSpy(getattr(rb, name), seen))
    stage_spy = VariantSpy(stage._kernel(), seen)
    gather_spy = VariantSpy(fetch._gather_kernel(), seen)
    monkeypatch.setattr(stage, "_kernel", lambda: stage_spy)
    monkeypatch.setattr(fetch, "_gather_kernel", lambda: gather_spy)
    monkeypatch.setattr(fetch, "_COMPILED", {})  # launches skip the spy once cached here
    if DEVICE == "cpu":  # the interpreter's staging kernel reads CPU tensors: as if pinned
        # (the gather kernel needs CUDA streams: on CPU both runs copy with torch instead)
        monkeypatch.setattr(StagingPool, "reads_host_directly",
                            lambda self, k, v, scales=None: True)
    return seen


BANKS = {"bf16": ("auto", "auto"), "fp8-kv-int8-index": ("fp8_e4m3", "int8")}
# (bank, head reduce, query reduce); under the slow interpreter one reduce pair per bank
CASES = [(bank, head, query) for bank in BANKS
         for head, query in (("mean", "max"), ("max", "last"))]
if INTERPRET:
    CASES = [CASES[0], CASES[-1]]


@pytest.fixture(scope="module")
def served_bank(checkpoints, tmp_path_factory, request):
    """A synthetic bf16 bank of the tiny checkpoint, served from DEVICE: 20 documents of 5
    chunks (20 tokens) and a last short one; as stored, or with its K/V tier FP8 and its
    index int8 (staging and routing kernels with variants of their own: the bounded pass,
    and the re-score over candidate sets of every size)."""
    bank_dtype, index_dtype = BANKS[request.param]
    ckpt = checkpoints(dtype="bfloat16")
    out = tmp_path_factory.mktemp("warmup") / "bank"
    assert main(["bank", "synth", "--model", str(ckpt), "--tokens", "403", "--doc-tokens",
                 "20", "--out", str(out), "--dtype", "bfloat16", "--no-progress",
                 "--bank-dtype", bank_dtype]) == 0
    bank = MemoryBank.open(out, ModelInfo.from_checkpoint(ckpt, "bfloat16"))
    return ServedBank.load("docs", bank, torch.device(DEVICE), slice(None),
                           index_dtype=index_dtype)


def msa_of(head: str, query: str) -> MSAParams:
    return routing_params(MSAParams.from_dict({
        "head_reduce_method": head, "query_reduce_method": query, "chunk_reduce_method": "max",
        "aux_loss_method": "INFONCE_DECOUPLE", "decouple_router": True,
        "router_layer_idx": "2,3", "doc_top_k": 4}, num_layers=4), "auto")


def test_routing_shapes_reach_every_token_block():
    assert routing_shapes(128, False, 8192, 256) == [(16, 1), (32, 1), (64, 1), (128, 1)]
    assert routing_shapes(128, True, 8192, 24) == [(16, 16), (24, 24)]
    assert routing_shapes(64, False, 40, 8) == [(16, 1), (32, 1), (40, 1)]
    assert routing_shapes(128, False, 16, 8) == [(16, 1)]
    assert routing_shapes(128, True, 8192, 1) == [(1, 1)]


@needs_kernel
@pytest.mark.parametrize(("served_bank", "head", "query"), CASES, indirect=["served_bank"])
def test_warm_up_covers_routing_and_staging(spies, served_bank, head, query):
    from vllm_msa.kernels.routing import route_batched_keys

    msa = msa_of(head, query)
    info = served_bank.bank.model_info
    heads, dim, top_k = TinySpec().heads, info.head_dim, msa.top_k
    pool = StagingPool(2048, info.num_kv_heads, dim, torch.bfloat16, torch.device(DEVICE))

    done = warm_up_kernels({"docs": served_bank}, pool, msa, top_k, heads, heads, dim,
                           torch.bfloat16, MAX_TOKENS, MAX_REQUESTS)
    assert any("staging from routing keys" in line for line in done)
    assert pool.num_free == pool.num_slots and WARMUP_OWNER not in pool.owners()
    warmed = {name: set(variants) for name, variants in spies.items()}
    gather = {"gather_kv_kernel"} if DEVICE == "cuda" else set()
    compressed = isinstance(served_bank.prepared_index(served_bank.bank.router_layers[
        -1]), CompressedRoutingIndex)
    bounded = ({"_candidate_documents_kernel", "_bound_rows_kernel", "_bound_requests_kernel"}
               if compressed else set())
    assert set(warmed) == {"_prepare_queries_kernel", "_chunk_scores_kernel",
                           "_document_keys_kernel", "stage_routed_kernel"} | gather | bounded
    spies.clear()

    gen = torch.Generator().manual_seed(7)
    layer = served_bank.bank.router_layers[-1]  # another layer than the warm-up's

    def serve(steps: list[list[int]]) -> None:
        """Route and stage `steps` as the runtime does, over the index served now."""
        prep = served_bank.prepared_index(layer)
        host_k, host_v = served_bank.host_keys[layer], served_bank.host_values[layer]
        scales = served_bank.scales(layer)
        for step in steps:
            if len(step) > MAX_REQUESTS or sum(step) > MAX_TOKENS:
                continue
            cu = [0]
            for n in step:
                cu.append(cu[-1] + n)
            qr = torch.randn(cu[-1], heads, dim, generator=gen).to(DEVICE, torch.bfloat16)
            if compressed:  # the bounded pass, then the re-score over that step's candidates
                routed = route_compressed(qr, cu, prep, msa, [top_k] * len(step),
                                          keys_only=True)
            else:
                routed = route_batched_keys(qr, cu, prep, msa, [top_k] * len(step))
            widths = [(f"r{i}", served_bank.worst_case_chunks(top_k))
                      for i in range(len(step))]
            ks = torch.tensor(routed.ks, dtype=torch.int32, device=DEVICE)
            assert pool.stage_routed(host_k, host_v, routed, ks, widths,
                                     served_bank.max_document_chunks, scales) is not None
            for owner, _ in widths:
                pool.release(owner)
            starts, counts = served_bank.selected_chunks(routed.decoded[0])
            pool.stage_documents(host_k, host_v, starts, counts, widths, scales)
            for owner, _ in widths:
                pool.release(owner)

    def check_covered() -> dict[str, set]:
        used = {name: set(variants) for name, variants in spies.items()}
        for name, variants in used.items():
            missing = variants - warmed.get(name, set())
            assert not missing, f"{name}: variants serving reaches that the warm-up " \
                                f"skipped: {sorted(missing)[0]}"
        return used

    serve(STEPS)
    used = check_covered()
    assert used.keys() >= {"_chunk_scores_kernel", "_document_keys_kernel",
                           "stage_routed_kernel"}
    # Scoring used several token blocks: the warm-up covered more than one.
    assert len(used["_chunk_scores_kernel"]) > 1

    # A live add grows the index (here to a chunk count divisible by 16, which Triton
    # would specialise on): serving the grown index compiles nothing new either.
    pooling = info.pooling_kernel_size
    second = (-(served_bank.chunk_offsets[-1] + 5)) % 16 or 16  # chunks of the second
    grow(served_bank, [5 * pooling, second * pooling - 1])
    assert served_bank.chunk_offsets[-1] % 16 == 0
    serve([[1], [17], [1] * 3])
    check_covered()


def grow(served: ServedBank, doc_tokens: list[int]) -> None:
    """Add documents of these token counts (random rows) to `served`'s bank on disk and
    switch `served` to that generation, as a running server's add does."""
    from vllm_msa.bank.edit import add_encoded
    from vllm_msa.bank.writer import EncodedDocument

    bank = served.bank
    info = bank.model_info
    first = int(bank.physical.doc_ids.max()) + 1
    gen = torch.Generator().manual_seed(len(doc_tokens))
    docs = [EncodedDocument(first + i, n, torch.randn(
        -(-n // info.pooling_kernel_size), len(info.router_layers), 3, info.num_kv_heads,
        info.head_dim, generator=gen).to(torch.bfloat16)) for i, n in enumerate(doc_tokens)]
    add_encoded(bank.path, docs, {d.id: f"added {d.id}" for d in docs}, synthetic_ok=True)
    served.apply_generation(MemoryBank.open(bank.path))


@parent_only
def test_kernel_under_triton_interpreter():
    rerun_under_interpreter(__file__)
