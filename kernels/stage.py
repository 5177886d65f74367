"""Staging of routed documents in one launch: from the routing kernel's top-k sort keys to
the documents' K̄/V̄ chunks in their reserved staging-pool slots.

A router layer's prefill routes R requests; each then needs its selected documents' chunks
(ascending document id, then chunk: the order `ServedBank.chunk_indices` gives) copied from
the host tier into the pool slots it reserved for its worst case. Done with torch ops that
is a dozen small launches per layer plus a copy (tens of microseconds of host time each,
which at batch 1 costs more than the GPU work); here one program per (request, selected
document, block of its chunks):

1. loads the request's top-k sort keys (`kernels/routing.py`: low 32 bits = the document's
   tie-break rank, larger for smaller ids), sorts the tie-breaks in descending order
   (= ascending id), maps them to bank positions and chunk ranges, and takes the exclusive
   prefix sum of chunk counts: where each document starts in the request's slot list;
2. copies its block of the document's chunks, host rows -> pool rows (16-byte words, host
   memory read through its mapped device address like `kernels/fetch.py`);
3. program (r, 0, 0) writes how many chunks request r staged (`counts[r]`), which memory
   attention reads on the device: the host never waits for routing's result.

The plain-torch equivalent is `ServedBank.selected_chunks` + `staging.chunk_rows` + a copy
(`StagingPool.stage_documents`); the tests compare each with the host chunk lists
(`ServedBank.chunk_indices`). Under TRITON_INTERPRET=1 the kernel runs on CPU tensors.
"""

from __future__ import annotations

import functools
import math
import os

import torch

try:  # the dequantising row copy the kernels call (a Triton function: looked up as a global)
    from .fp8_rows import copy_fp8_rows
except ImportError:  # pragma: no cover - no Triton: the kernels are never built
    copy_fp8_rows = None

__all__ = ["stage_routed"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCK_ROWS = 4  # chunks per program: more programs in flight reading host memory


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def stage_routed(src_k: torch.Tensor, src_v: torch.Tensor, dst_k: torch.Tensor,
                 dst_v: torch.Tensor, keys: torch.Tensor, ks: torch.Tensor,
                 positions: torch.Tensor, doc_start: torch.Tensor, table: torch.Tensor,
                 counts: torch.Tensor, max_doc_chunks: int,
                 scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """On the current stream: for every request r, the chunks of the first ks[r] documents of
    `keys[r]` into pool rows `table[r, 0:n_r]`, and counts[r] = n_r.

    src_k, src_v: [chunks, ...] host tier (pinned; read through UVA) or device, contiguous;
    dst_k, dst_v: [slots, ...] device pool; keys: [R, k_top] int64 sort keys; ks: [R] int32;
    positions: [N] int64, the bank position of each tie-break value; doc_start: [N + 1] int64
    chunk offsets by bank position; table: [R, W] int64 reserved slots (W >= every n_r);
    counts: [R] int64, written; max_doc_chunks: the bank's largest document, in chunks;
    scales: an FP8 source's float32 [chunks, heads] scales (K, V), dequantised into the
    pool's dtype on the way (`fp8_rows.py`)."""
    num, k_top = keys.shape
    if num == 0 or k_top == 0:
        return
    from .fetch import _shape, _word_view, _Words, fp8_layout  # the gather kernel's views

    words = _word_view if INTERPRET else _Words  # the interpreter reads real tensors
    row_bytes = math.prod(src_k.shape[1:]) * src_k.element_size()
    word, row_words, block_c, block_r = _shape(row_bytes, BLOCK_ROWS, 8192)
    fp8, heads, head_dim, d_pad = fp8_layout(src_k, scales)
    if fp8:
        def typed(t: torch.Tensor):
            return t if INTERPRET else _Words(t, t.dtype)

        pointers = (words(src_k, torch.uint8), words(src_v, torch.uint8), typed(dst_k),
                    typed(dst_v), typed(scales[0]), typed(scales[1]))
    else:
        pointers = (words(src_k, word), words(src_v, word), words(dst_k, word),
                    words(dst_v, word), keys, keys)  # (no scales: unused)
    grid = (num, k_top, -(-max_doc_chunks // block_r))
    _kernel()[grid](
        *pointers, keys, ks, positions, doc_start, table, counts, keys.stride(0),
        table.stride(0), ROW=row_words, K_PAD=max(2, _next_pow2(k_top)), BLOCK_R=block_r,
        BLOCK_C=block_c, FP8=fp8, HEADS=heads, HEAD_DIM=head_dim, D_PAD=d_pad, num_warps=4,
    )


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["keys_stride", "table_stride"])
    def stage_routed_kernel(src_k, src_v, dst_k, dst_v, scale_k, scale_v, keys, ks, positions,
                            doc_start, table, counts, keys_stride, table_stride,
                            ROW: tl.constexpr, K_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_C: tl.constexpr, FP8: tl.constexpr, HEADS: tl.constexpr,
                            HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
        r = tl.program_id(0)
        j = tl.program_id(1)
        blk = tl.program_id(2)
        kk = tl.arange(0, K_PAD)
        k_r = tl.load(ks + r)
        chosen = kk < k_r
        key = tl.load(keys + r * keys_stride + kk, mask=chosen, other=0)
        tie = tl.where(chosen, key & 0xFFFFFFFF, -1)
        tie = tl.sort(tie, descending=True)  # ascending document id; holes (-1) last
        ok = tie >= 0
        pos = tl.load(positions + tl.maximum(tie, 0), mask=ok, other=0)
        start = tl.load(doc_start + pos, mask=ok, other=0)
        count = tl.where(ok, tl.load(doc_start + pos + 1, mask=ok, other=0) - start, 0)
        before = tl.cumsum(count, 0) - count
        tl.store(counts + r, tl.sum(count, 0), mask=(j == 0) & (blk == 0))
        mine = kk == j
        my_start = tl.sum(tl.where(mine, start, 0), 0)
        my_count = tl.sum(tl.where(mine, count, 0), 0)
        my_before = tl.sum(tl.where(mine, before, 0), 0)
        i = blk * BLOCK_R + tl.arange(0, BLOCK_R)
        rows_ok = i < my_count
        src_row = (my_start + i).to(tl.int64)
        dst_row = tl.load(table + r * table_stride + my_before + i, mask=rows_ok,
                          other=0).to(tl.int64)
        if FP8:
            copy_fp8_rows(src_k, src_v, scale_k, scale_v, dst_k, dst_v, src_row, dst_row,
                          rows_ok, HEADS, HEAD_DIM, D_PAD)
        else:
            cols = tl.arange(0, BLOCK_C)
            for c0 in tl.static_range(0, ROW, BLOCK_C):
                c = c0 + cols
                mask = rows_ok[:, None] & (c < ROW)[None, :]
                s_off = src_row[:, None] * ROW + c[None, :]
                d_off = dst_row[:, None] * ROW + c[None, :]
                tl.store(dst_k + d_off, tl.load(src_k + s_off, mask=mask), mask=mask)
                tl.store(dst_v + d_off, tl.load(src_v + s_off, mask=mask), mask=mask)

    return stage_routed_kernel
