"""`vllm-msa bank convert`: a copy of a bank with other tier dtypes (e.g. FP8 K̄/V̄).

The copy is written like a build (`BankWriter`: segments durable one by one, the manifest
last), one output segment per source segment, so an interrupted conversion resumes at the
first segment it had not committed, and a half-written copy never loads. The source is only
read. Its `source` section is kept (a synthetic bank stays marked synthetic) with a
`converted_from` entry naming the source manifest's digest: a re-run against a changed source
is refused instead of mixing the two.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .dtypes import BankDtypes
from .format import MANIFEST, BankError
from .reader import MemoryBank
from .writer import BankWriter


def convert_bank(src: str | Path, out: str | Path, bank_dtype: str, *,
                 progress: bool = True) -> MemoryBank:
    """Write bank `src` into `out` with its K̄/V̄ tier in `bank_dtype`
    (`dtypes.BANK_DTYPES`); returns the converted bank (or the finished one a previous run
    of the same conversion left)."""
    source = MemoryBank.open(src)
    if "virtual" in source.manifest:
        raise BankError(f"bank {source.path} is virtual: it has no files to convert; "
                        "synthesise it with the --bank-dtype you want")
    if source.has_removals:  # (a converted copy is a build: one segment per source segment)
        raise BankError(f"bank {source.path} has removed documents (generation "
                        f"{source.generation}): run `vllm-msa bank compact` on it first")
    out = Path(out)
    if out.resolve() == source.path.resolve():
        raise BankError(f"{out}: the converted bank must go to another directory")
    dtypes = BankDtypes.of_model(source.model_info.dtype, bank_dtype)
    origin = {**(source.manifest.get("source") or {}), "converted_from": {
        "manifest_sha256": hashlib.sha256((source.path / MANIFEST).read_bytes()).hexdigest(),
        "tiers": source.dtypes.to_json()}}
    if (out / MANIFEST).exists():
        done = MemoryBank.open(out)
        if done.manifest.get("source") == origin and done.dtypes == dtypes:
            return done
        raise BankError(f"{out} already holds a different bank; choose another --out or "
                        "delete it")
    writer = BankWriter.open(out, source.model_info, origin, dtypes=dtypes)
    segments = source.manifest["segments"]
    chunks = [int(s["chunks"]) for s in segments]
    # Per chunk, a router layer's share of a segment at a time (each layer is converted on
    # its own), with the rate and an ETA.
    bar = tqdm(total=sum(chunks), initial=sum(chunks[:len(writer.segments)]), unit="chunk",
               unit_scale=True, desc="converting bank", disable=not progress)
    share = 1.0 / max(1, len(source.model_info.router_layers))
    for index in range(len(writer.segments), len(segments)):
        tables, layers = source.read_segment(index)
        writer.add_pooled_segment(tables["doc_ids"], tables["doc_num_tokens"],
                                  tables["doc_num_chunks"], layers,
                                  on_layer=lambda n=chunks[index]: bar.update(n * share))
        del layers
    bar.close()
    info = source.model_info
    template = torch.stack([torch.stack(source.template_kv(layer), 1)
                            for layer in range(info.num_layers)], 1)  # [T, layers, 2, kv, hd]
    writer.finish(source.template_ids, template,
                  ((doc_id, source.text(doc_id)) for doc_id in source.doc_ids))
    return MemoryBank.open(out, info)
