"""Synthetic banks: the real on-disk format, filled with random tensors.

Capacity planning and speed work (host-tier size, GPU index size, routing and gather speed at
100M tokens) need a bank of the right *shape*, not of meaningful content, and encoding 100M
tokens takes GPU hours. `synth_bank` writes one in minutes, bounded by the random number
generator, sha256 and the disk. Everything goes through `BankWriter` (segments, checksums, the
unfinished-build marker, resume, the manifest with the model's fingerprint), so a synthetic bank
opens and serves exactly like a built one for the checkpoint it was made for, and its manifest's
`source` says `synthetic`, so nobody mistakes it for real memory.

Memory stays bounded by the segment size (`segment_mb`, or one document if that is larger): a
few segments are in flight at once (generating, serialising, writing), so peak RAM is about
8 x `segment_mb` (~4 GiB by default; a smaller `--segment-mb` lowers it).

Values are unit-normal K̄/V̄/K̄r (routing keys L2-normalised when the checkpoint normalises
them; equal to K̄ without a decoupled router, as stage 1 stores them), generated in
independent, seeded pieces on all CPU cores: the same arguments always give the same bytes,
so an interrupted run resumes into an identical bank.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..prompt import TEMPLATE_HEAD
from .dtypes import BankDtypes
from .format import (
    DEFAULT_SEGMENT_MB,
    DOCUMENTS_FILE,
    MANIFEST,
    POOLED_ORDER,
    SEGMENTS_DIR,
    TEMPLATE_FILE,
    BankError,
    layer_key,
    segment_name,
)
from .model_info import ModelInfo, resolve_checkpoint
from .reader import MemoryBank
from .writer import BankWriter, PreparedSegment, build_manifest

# Part of the resume identity: bump it when the generated values change for the same arguments.
GENERATOR_VERSION = 1
_PIECE_ELEMS = 1 << 21  # values per independently seeded piece (the unit of parallel work)
_PREPARE_DEPTH = 2  # segments serialised and hashed at once
# safetensors writes tensors sorted by dtype (descending enum order), then name.
_ST_DTYPES = {torch.int64: ("I64", 3), torch.float32: ("F32", 2), torch.bfloat16: ("BF16", 1),
              torch.float16: ("F16", 0), torch.float8_e4m3fn: ("F8_E4M3", -1)}


def document_text(index: int) -> str:
    """Placeholder text of synthetic document `index` (its id): Interleave needs some text."""
    return f"synthetic document {index}"


@dataclass(frozen=True)
class SynthPlan:
    """What `synth_bank` will write: counts, segment layout and the predicted manifest."""

    model: ModelInfo
    tokens: int
    doc_tokens: int
    seed: int
    docs_per_segment: int
    template_ids: tuple[int, ...]
    dtypes: BankDtypes | None = None  # the tiers' stored dtypes (default: the model's)

    @property
    def tiers(self) -> BankDtypes:
        return self.dtypes or BankDtypes.of_model(self.model.dtype)

    @property
    def num_documents(self) -> int:
        return -(-self.tokens // self.doc_tokens)

    def doc_num_tokens(self, index: int) -> int:
        """Every document has `doc_tokens` tokens except a shorter last one."""
        return min(self.doc_tokens, self.tokens - index * self.doc_tokens)

    def doc_num_chunks(self, index: int) -> int:
        return -(-self.doc_num_tokens(index) // self.model.pooling_kernel_size)

    def segments(self) -> Iterator[range]:
        """Document indices (= ids) of each segment, in bank order."""
        for start in range(0, self.num_documents, self.docs_per_segment):
            yield range(start, min(start + self.docs_per_segment, self.num_documents))

    @property
    def source(self) -> dict[str, Any]:
        """The manifest's `source`, also the writer's resume identity."""
        return {"synthetic": {
            "tokens": self.tokens, "doc_tokens": self.doc_tokens, "seed": self.seed,
            "docs_per_segment": self.docs_per_segment, "generator": GENERATOR_VERSION,
        }}

    def run_total(self, docs: range, per_doc: Callable[[int], int]) -> int:
        """Sum of `per_doc` over a run of documents in O(1): only the bank's last one differs."""
        return (len(docs) - 1) * per_doc(docs[0]) + per_doc(docs[-1])

    def _segment_entry(self, index: int, docs: range) -> dict[str, Any]:
        chunks = self.run_total(docs, self.doc_num_chunks)
        kv = (self.model.num_kv_heads, self.model.head_dim)
        specs = [spec for layer in self.model.router_layers
                 for spec in self.tiers.layer_tensors(layer, chunks, *kv)]
        specs += [("chunk_doc_ids", torch.int64, (chunks,))]
        specs += [(n, torch.int64, (len(docs),))
                  for n in ("doc_ids", "doc_num_chunks", "doc_num_tokens")]
        return {
            "file": segment_name(index), "documents": len(docs), "chunks": chunks,
            "tokens": self.run_total(docs, self.doc_num_tokens),
            "sha256": "", "bytes": _safetensors_size(specs),
        }

    def predicted_manifest(self) -> dict[str, Any]:
        """The manifest the finished bank will have (sizes exact, checksums empty): the dry
        run shows it through `bank info`'s summary."""
        segments = [self._segment_entry(i, docs) for i, docs in enumerate(self.segments())]
        t = len(self.template_ids)
        kv = (self.model.num_kv_heads, self.model.head_dim)
        dtype = getattr(torch, self.model.dtype)
        template = [("template_ids", torch.int64, (t,))] + [
            (layer_key(layer, name), dtype, (t, *kv))
            for layer in range(self.model.num_layers) for name in ("keys", "values")
        ]
        files = {seg["file"]: {"sha256": "", "bytes": seg["bytes"]} for seg in segments}
        files[TEMPLATE_FILE] = {"sha256": "", "bytes": _safetensors_size(template)}
        files[DOCUMENTS_FILE] = {"sha256": "", "bytes": _documents_size(self.num_documents)}
        return build_manifest(self.model, self.source, segments, files, t, self.tiers)


def plan_synth(
    model: str | Path,
    tokens: int,
    doc_tokens: int,
    *,
    dtype: str | None = None,
    seed: int = 0,
    segment_mb: float = DEFAULT_SEGMENT_MB,
    bank_dtype: str = "auto",
) -> SynthPlan:
    """Plan a synthetic bank of `tokens` tokens in documents of `doc_tokens` for checkpoint
    `model` (served in `dtype`, default its config's), its tiers stored as `bank_dtype`
    (`dtypes.BANK_DTYPES`). Reads only the config, the weights'
    fingerprint and the tokenizer (for the template head's ids)."""
    if tokens < 1 or doc_tokens < 1:
        raise ValueError(f"tokens and doc_tokens must be >= 1, got {tokens} and {doc_tokens}")
    if segment_mb <= 0:
        raise ValueError(f"segment_mb must be > 0, got {segment_mb}")
    try:
        checkpoint = resolve_checkpoint(model)
        info = ModelInfo.from_checkpoint(checkpoint, dtype)
    except (OSError, ValueError) as e:
        raise BankError(f"cannot read checkpoint {model}: {e}") from None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        template_ids = tuple(tokenizer.encode(TEMPLATE_HEAD, add_special_tokens=False))
    except (OSError, ValueError) as e:
        raise BankError(f"cannot load the tokenizer of {model} (the bank stores the template "
                        f"head's token ids): {e}") from None
    itemsize = torch.empty((), dtype=getattr(torch, info.dtype)).element_size()
    chunk_bytes = 3 * len(info.router_layers) * info.num_kv_heads * info.head_dim * itemsize
    doc_bytes = -(-doc_tokens // info.pooling_kernel_size) * chunk_bytes
    docs_per_segment = max(1, int(segment_mb * 2**20 // doc_bytes))
    return SynthPlan(info, tokens, doc_tokens, seed, docs_per_segment, template_ids,
                     BankDtypes.of_model(info.dtype, bank_dtype))


def synth_bank(
    plan: SynthPlan, out: str | Path, *, progress: bool = True, threads: int | None = None
) -> MemoryBank:
    """Write `plan` into the bank directory `out` (atomically; a re-run resumes or, when the
    same bank is already complete, returns it)."""
    out = Path(out)
    if (out / MANIFEST).exists():
        bank = MemoryBank.open(out)
        if (bank.manifest.get("source") == plan.source and bank.model_info == plan.model
                and bank.dtypes == plan.tiers):
            return bank
        raise BankError(f"{out} already holds a different bank; choose another --out or "
                        "delete it")
    manifest = plan.predicted_manifest()
    _check_free_space(manifest, out)
    writer = BankWriter.open(out, plan.model, plan.source, dtypes=plan.tiers)
    segments = list(plan.segments())
    seg_chunks = [plan.run_total(docs, plan.doc_num_chunks) for docs in segments]
    done = len(writer.segments)
    # Per chunk: half a chunk when its every router layer is generated, half when its
    # segment is on disk, so the bar moves as pieces finish and ends with the last write.
    bar = tqdm(total=sum(seg_chunks), initial=sum(seg_chunks[:done]), unit="chunk",
               unit_scale=True, desc="synthesizing bank", disable=not progress)
    per_piece = 0.5 / max(1, len(plan.model.router_layers))
    workers = threads or _cpu_count()
    # Three stages overlap: the pool generates segment N while up to `_PREPARE_DEPTH` earlier
    # ones are serialised and hashed (the CPU-bound part of writing, in parallel) and one is
    # written to disk (in bank order, by one thread). At most ~4 segments are alive at once.
    preparing: deque[tuple[int, Future[PreparedSegment]]] = deque()
    committing: Future[None] | None = None
    with ThreadPoolExecutor(workers, thread_name_prefix="bank-synth") as pool, \
            ThreadPoolExecutor(_PREPARE_DEPTH, thread_name_prefix="bank-prepare") as prep, \
            ThreadPoolExecutor(1, thread_name_prefix="bank-commit") as io:

        def commit_oldest() -> None:
            nonlocal committing
            index, prepared = preparing.popleft()
            segment = prepared.result()
            if committing is not None:
                committing.result()
            committing = io.submit(writer.commit_segment, segment)
            committing.add_done_callback(lambda _, n=seg_chunks[index]: bar.update(0.5 * n))

        for index in range(done, len(segments)):
            docs = segments[index]
            layers = _random_segment(plan, index, docs, pool,
                                     lambda n: bar.update(n * per_piece))
            preparing.append((index, prep.submit(
                writer.prepare_segment, list(docs), [plan.doc_num_tokens(i) for i in docs],
                [plan.doc_num_chunks(i) for i in docs], layers,
            )))
            del layers
            if len(preparing) >= _PREPARE_DEPTH:
                commit_oldest()
        while preparing:
            commit_oldest()
        if committing is not None:
            committing.result()
    bar.close()
    writer.finish(plan.template_ids, _random_template(plan),
                  ((i, document_text(i)) for i in range(plan.num_documents)))
    return MemoryBank.open(out, plan.model)


def _random_segment(
    plan: SynthPlan, index: int, docs: range, pool: ThreadPoolExecutor,
    generated: Callable[[int], Any] | None = None,
) -> dict[int, dict[str, torch.Tensor]]:
    """Every router layer's K̄/V̄/K̄r for one segment, filled piece by piece on `pool`
    (`generated(n)` after each piece of n chunks of one layer)."""
    info = plan.model
    chunks = plan.run_total(docs, plan.doc_num_chunks)
    dtype = getattr(torch, info.dtype)
    shape = (chunks, info.num_kv_heads, info.head_dim)
    layers = {layer: {name: torch.empty(shape, dtype=dtype) for name in POOLED_ORDER}
              for layer in info.router_layers}
    rows = max(1, _PIECE_ELEMS // (info.num_kv_heads * info.head_dim))

    def fill(layer: int, start: int) -> None:
        n = min(rows, chunks - start)
        gen = torch.Generator().manual_seed(_seed(plan.seed, index, layer, start))
        keys = torch.randn((n, *shape[1:]), generator=gen)
        values = torch.randn((n, *shape[1:]), generator=gen)
        routing = torch.randn((n, *shape[1:]), generator=gen) if info.decouple_router else keys
        if info.normalized_routing_keys:
            routing = torch.nn.functional.normalize(routing, p=2, dim=-1)
        for name, t in zip(POOLED_ORDER, (keys, values, routing), strict=True):
            layers[layer][name][start : start + n].copy_(t)
        if generated is not None:
            generated(n)

    futures = [pool.submit(fill, layer, start)
               for layer in info.router_layers for start in range(0, chunks, rows)]
    for f in futures:
        f.result()
    return layers


def _random_template(plan: SynthPlan) -> torch.Tensor:
    """Template-head K/V of every layer, [T, num_layers, 2, kv, hd] (random, like the rest)."""
    info = plan.model
    gen = torch.Generator().manual_seed(_seed(plan.seed, "template"))
    shape = (len(plan.template_ids), info.num_layers, 2, info.num_kv_heads, info.head_dim)
    return torch.randn(shape, generator=gen).to(getattr(torch, info.dtype))


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):  # the cores this process may use (Linux)
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _seed(*key: object) -> int:
    """A 63-bit generator seed per piece: independent of thread count and segment order."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _safetensors_size(specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]) -> int:
    """Exact size of a safetensors file holding tensors of these names, dtypes and shapes:
    8-byte header length, compact JSON header padded with spaces to 8 bytes, then the data."""
    header: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape in sorted(specs, key=lambda s: (-_ST_DTYPES[s[1]][1], s[0])):
        nbytes = torch.empty((), dtype=dtype).element_size()
        for dim in shape:
            nbytes *= dim
        header[name] = {"dtype": _ST_DTYPES[dtype][0], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"))
    return struct.calcsize("<Q") + -(-len(text) // 8) * 8 + offset


def _documents_size(num_documents: int) -> int:
    """Exact size of documents.jsonl with the placeholder texts (the writer's line format)."""
    line = json.dumps({"id": 0, "text": document_text(0)}, ensure_ascii=False)
    fixed = len(line) - 2  # both "0"s are the id's digits
    digits, width, start = 0, 1, 0
    while start < num_documents:
        end = min(num_documents, 10**width)
        digits += (end - start) * width
        start, width = end, width + 1
    return num_documents * (fixed + 1) + 2 * digits


def _check_free_space(manifest: dict[str, Any], out: Path) -> None:
    """Refuse up front rather than fail much later: a 100M-token bank is ~100+ GB."""
    need = sum(f["bytes"] for f in manifest["files"].values())
    segments = out / SEGMENTS_DIR
    if segments.is_dir():  # resuming: committed segments are already on disk
        need -= sum(p.stat().st_size for p in segments.glob("*.safetensors"))
    existing = out
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if need > free:
        raise BankError(f"{out}: the bank needs {need / 2**30:.2f} GiB more, the disk has "
                        f"{free / 2**30:.2f} GiB free")
