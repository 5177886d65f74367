"""`vllm-msa bank compact`: rewrite a bank without its removed documents.

The live documents, in bank order, are cut into segments by the rule of a build
(`build.segment_runs`, the same segment size), so a compacted bank holds exactly the
segments `bank build` writes for those documents: every tensor is copied as stored (an FP8
tier with its scales, never re-quantised) and the document tables are derived as a build
derives them, so the files' bytes match a build whose encodings match. A segment that comes
out equal to an existing one (the same documents, none removed) is kept as it is; the
others are written under the new generation's names, committed, and only then are the old
files deleted (`generations.py`): a compaction killed at any moment leaves the previous
generation, and re-running it continues (or, if it had committed, only cleans up).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .format import DEFAULT_SEGMENT_MB, POOLED_ORDER, layer_key
from .generations import (
    PendingGeneration,
    clean_up,
    edit_lock,
    editable_bank,
)
from .quant import SCALE_SUFFIX
from .reader import MemoryBank
from .segmenting import segment_chunk_bytes, segment_runs
from .writer import serialize_segment


def compact_bank(bank: str | Path | MemoryBank, *, segment_mb: float | None = None,
                 progress: bool = True) -> MemoryBank:
    """Rewrite `bank` without removed documents, in segments of `segment_mb` MiB (default:
    the size the bank was built with); returns the compacted generation (the bank itself
    when it is compact already)."""
    path = bank.path if isinstance(bank, MemoryBank) else Path(bank)
    with edit_lock(path):
        opened = editable_bank(path, "compact", synthetic_ok=True)
        segment_mb = segment_mb or opened.manifest.get("segment_mb", DEFAULT_SEGMENT_MB)
        plan = _plan(opened, segment_mb)
        if all(isinstance(target, dict) for target in plan) and len(plan) == len(
                opened.manifest["segments"]):
            clean_up(opened)  # (what a compaction killed after its commit left)
            return opened
        identity = {"operation": "compact", "segment_mb": segment_mb}
        pending = PendingGeneration.start(opened, identity)
        new = [i for i, target in enumerate(plan) if not isinstance(target, dict)]
        layout = opened.physical
        chunks = layout.doc_num_chunks
        todo = new[len(pending.segments):]
        bar = tqdm(total=sum(int(chunks[p]) for i in new for p in plan[i]),
                   initial=sum(int(chunks[p]) for i in new[:len(pending.segments)]
                               for p in plan[i]),
                   unit="chunk", unit_scale=True, desc="compacting bank", disable=not progress)
        for index in todo:
            positions = plan[index]
            segment = serialize_segment(
                opened.model_info, opened.dtypes,
                [int(layout.doc_ids[p]) for p in positions],
                [int(layout.doc_num_tokens[p]) for p in positions],
                [int(chunks[p]) for p in positions], _stored_rows(opened, positions))
            pending.add_segment(segment, [(int(layout.doc_ids[p]),
                                           opened.text(int(layout.doc_ids[p])))
                                          for p in positions], index=index)
            opened.release_mappings()  # (the rows are copied: drop the source mappings)
            bar.update(sum(int(chunks[p]) for p in positions))
        bar.close()
        written = iter(pending.segments)
        segments = [target if isinstance(target, dict) else next(written) for target in plan]
        segments, texts = _own_texts(opened, pending, segments)
        return pending.commit(segments, identity, texts)


def _own_texts(bank: MemoryBank, pending: PendingGeneration, segments: list[dict[str, Any]]
               ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """`segments` where no kept segment reads a build's documents file that also holds texts
    of documents compaction dropped or moved: those get a texts file of their own, so the
    old file goes and no removed document's text stays on disk. (A build's file is kept
    when every segment that reads it is kept: then it holds exactly their texts.)"""
    readers = [s for s in bank.manifest["segments"] if "texts" not in s]
    if all(any(s is kept for kept in segments) for s in readers):
        return segments, {}
    out, files = [], {}
    for index, seg in enumerate(segments):
        if "texts" not in seg:
            start = bank.physical.segment_doc_starts[bank.manifest["segments"].index(seg)]
            doc_ids = bank.physical.doc_ids[start:start + int(seg["documents"])].tolist()
            name, meta = pending.write_texts(index, [(i, bank.text(i)) for i in doc_ids])
            seg, files[name] = {**seg, "texts": name}, meta
        out.append(seg)
    return out, files


def _plan(bank: MemoryBank, segment_mb: float) -> list[dict[str, Any] | list[int]]:
    """Per segment of the compacted bank: an existing segment entry it equals, or the
    physical positions of the live documents it will hold."""
    layout = bank.physical
    live = torch.nonzero(layout.live).flatten().tolist()
    chunks = layout.doc_num_chunks.tolist()
    starts = layout.segment_doc_starts
    plan: list[dict[str, Any] | list[int]] = []
    for run in segment_runs(live, chunks.__getitem__, segment_chunk_bytes(bank.model_info),
                            segment_mb * 2**20):
        seg = layout.segment_of(run[0])
        entry = bank.manifest["segments"][seg]
        same = run == list(range(starts[seg], starts[seg + 1])) and not entry.get("removed")
        plan.append(entry if same else run)
    return plan


def _stored_rows(bank: MemoryBank, positions: list[int]) -> dict[str, torch.Tensor]:
    """Every stored tensor (values and scales, as stored) of the chunks of the stored
    documents `positions`, in that order: runs of neighbours in one segment read at once."""
    layout = bank.physical
    offsets = layout.doc_chunk_offsets.tolist()
    seg_chunk_starts = bank._segment_starts
    runs: list[tuple[int, int, int]] = []  # (segment, first chunk, end chunk) in the segment
    for p in positions:
        seg = layout.segment_of(p)
        lo, hi = offsets[p] - int(seg_chunk_starts[seg]), offsets[p + 1] - int(
            seg_chunk_starts[seg])
        if runs and runs[-1][0] == seg and runs[-1][2] == lo:
            runs[-1] = (seg, runs[-1][1], hi)
        else:
            runs.append((seg, lo, hi))
    keys = [layer_key(layer, name) + suffix for layer in bank.router_layers
            for name in POOLED_ORDER
            for suffix in ("", *((SCALE_SUFFIX,) if bank.dtypes.scaled(name) else ()))]
    return {key: torch.cat([bank._mapped(seg, key)[lo:hi] for seg, lo, hi in runs])
            for key in keys}
