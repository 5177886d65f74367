"""Fused, batched MSA routing (msa-spec §3) in Triton: R requests against one router layer.

Semantics are exactly `vllm_msa.attention.routing.route`, run for every request of a batch:

    s(t, h, c) = q[t, h] . key[c, h // (H / KV)]     (q L2-normalised for cosine, times scale)
    S(c)       = reduce_t reduce_h s(t, h, c)        (head: mean | max; query: max | mean | last)
    score(d)   = max | mean of S over the document's chunks
    selection  = top-k documents by score, ties to the smaller document id, all if fewer than k

Layout of the work (one router layer, one call):

1. `_chunk_scores_kernel`: the grid runs over tiles of BLOCK_C chunks. The routing tokens of
   all requests form one stream, cut into blocks of BLOCK_T tokens that may span requests. A
   program walks the token blocks and, for each, the KV heads: it loads the key tile
   [BLOCK_C, head_dim] of a KV head and multiplies it with the query heads that share it
   (`tl.dot`, bf16 inputs and fp32 accumulation on tensor cores; IEEE fp32 for fp32 keys).
   Heads are reduced in registers, then each block's columns are reduced into the requests
   they belong to (a request's running max/sum carries over to the next block; its S(c) is
   stored when it ends). So the [tokens, heads, chunks] score tensor never exists anywhere;
   only S(c) per request ([R, C] fp32: 4 bytes per chunk and request, against 2 * KV * D
   bytes of key per chunk) is written. The key tiles come from HBM once per call: with one
   token block (up to BLOCK_T tokens in all) they are read exactly once; further blocks re-read
   the program's tile while it is hot in L2. With head_reduce "mean" the query heads of a group
   are summed before the kernel (mean_h q_h . k_kv(h) = sum_kv (sum_g q_kv,g / H) . k_kv:
   linear), which divides the tensor-core work by the group size; "max" needs every head.
2. `_document_keys_kernel`: chunk scores -> document scores (max | mean over the document's
   contiguous chunks, loaded a tile of chunks at a time and reduced by position within the
   document, so identical documents get bit-identical scores; means divide with IEEE
   rounding, like torch) -> one int64 sort key per document: the
   order-preserving int32 image of the fp32 score in the high half and (N - 1 - rank of the
   document id) in the low half, so the largest keys are the best documents with ties going
   to the smaller id. Each program of BLOCK_N documents hands up its TOP largest keys
   (TOP = k rounded up to a power of two, for k <= 64; else every key), and
3. the last block of a request to finish (a per-request atomic counter) merges those
   candidates into the request's TOP best keys: the whole selection (exact tie rule, no sort
   of N) without another launch. Where the candidates are too many for one program
   (`MAX_MERGE`) or TOP is 0, `torch.topk` over them does it. Ids and scores are decoded
   from the chosen keys (the keys hold the scores' bits).

A persistent variant of (1) (a fixed grid striding over the chunk tiles, for steps whose
routing tokens fit one block) was built, tested and measured on an H100: no faster than the
tiled kernel at 10M-100M tokens (README, Performance), so it was removed (last in 8e5c79d).

Triton's import is guarded (this module imports on CPU-only machines): without Triton, or
without a GPU outside Triton's interpreter, `route_batched` runs `route_batched_reference`,
the plain-torch loop over `route`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm_msa.attention.index_parallel import NO_CANDIDATE
from vllm_msa.attention.routing import RoutingIndex, Selection, route
from vllm_msa.attention.uploads import upload
from vllm_msa.config import MSAParams

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

HAS_TRITON = triton is not None
# Triton's CPU interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors; it cannot
# multiply bf16 operands, so under it the kernel upcasts them to fp32 first (exact products:
# a bf16 x bf16 product fits in fp32), which computes the same function.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Gathers every tensor-parallel rank's [R, k] candidate sort keys into [R, ranks * k].
Exchange = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of `_chunk_scores_kernel`; `None` fields are chosen from the inputs."""

    block_c: int | None = None  # chunks per program
    block_t: int | None = None  # at most this many routing tokens per block (power of two)
    num_warps: int | None = None
    num_stages: int | None = None
    # Documents per program of the document kernel; None: the smallest of DOCUMENT_BLOCKS
    # whose candidates one program can merge (`document_block`).
    block_n: int | None = None


# Triton's int8 tensor-core products need K >= 32: the int8 x int8 pass needs head_dim >= this.
INT_DOT_MIN_DIM = 32

# Per-block candidates are used for top-k up to this (else keys for every document + topk).
MAX_BLOCK_TOP = 64


def default_config(keys_dtype: torch.dtype, head_max: bool = False) -> KernelConfig:
    """Tiles by the queries' dtype (int8: the bounded pass's integer queries) and head
    reduce. Measured on an H100 for the MSA-4B shape
    (benchmarks/results/routing-*.json, "sweep"); where a default does not fit a shape's
    shared memory, `route_batched` shrinks it (stages, then token and chunk blocks)."""
    if keys_dtype == torch.float32:  # tests / fp32 banks: fp32 tiles are twice the bytes
        return KernelConfig(block_c=64, block_t=64, num_warps=4, num_stages=2)
    if keys_dtype == torch.int8:  # the int8 x int8 bounded pass (`_int8_tile_scores`):
        # measured on an H200 at 100M tokens (compressed-routing-*.json, "sweep"), the best
        # of seven tilings at 1, 8 and 64 questions (0.44 / 2.6 / 19.7 ms per layer)
        return KernelConfig(block_c=128, block_t=64, num_warps=4, num_stages=3)
    if head_max:  # every query head of a group is a tile of its own: fewer stages fit
        return KernelConfig(block_c=128, block_t=64, num_warps=8, num_stages=2)
    return KernelConfig(block_c=128, block_t=128, num_warps=8, num_stages=3)


@dataclass(frozen=True)
class PreparedRoutingIndex:
    """A `RoutingIndex` plus what the kernels need of it, computed once per bank layer."""

    index: RoutingIndex
    keys: torch.Tensor  # [C, KV, D], contiguous
    doc_start: torch.Tensor  # [n + 1] int64: the index's document d has chunks doc_start[d]:[d+1]
    # [n] int64: N - 1 - (rank of the document id among the bank's N ids): larger wins a tie
    tiebreak: torch.Tensor
    ids_by_tiebreak: torch.Tensor  # [N] int64: the document id of each tiebreak value
    positions_by_tiebreak: torch.Tensor  # [N] int64: the bank position of each tiebreak value
    bank_doc_start: torch.Tensor  # [N + 1] int64: chunk offsets of the bank (the host tier)
    # A bank with removed documents (`RoutingIndex.live`): [n] int8, 0 for a removed one,
    # which the document kernels score -inf; None: every document is live.
    live: torch.Tensor | None = None
    num_live: int | None = None  # this index's live documents (None: n)
    bank_live: int | None = None  # the bank's live documents (None: N)

    @property
    def num_bank_documents(self) -> int:
        """N: every document of the bank (a shard's index holds n of them)."""
        return self.ids_by_tiebreak.shape[0]

    @property
    def live_documents(self) -> int:
        """The most one request can select from this index."""
        return self.tiebreak.shape[0] if self.num_live is None else self.num_live

    @property
    def bank_live_documents(self) -> int:
        """The most one request can select from the bank."""
        return self.num_bank_documents if self.bank_live is None else self.bank_live


def prepare_index(index: RoutingIndex | PreparedRoutingIndex,
                  like: PreparedRoutingIndex | None = None) -> PreparedRoutingIndex:
    """Document offsets and id ranks of `index` (its chunks must be grouped by document, in
    bank order, as `RoutingIndex.from_bank` makes them). A shard's tie-breaks rank its ids
    among the whole bank's, so every shard's sort keys compare with every other's. `like`:
    another router layer's, taken over where it has the same document layout (`same_layout`:
    one computation for every layer of a bank, at load and at each live edit)."""
    if isinstance(index, PreparedRoutingIndex):
        return index
    if like is not None and same_layout(like.index, index):
        return dataclasses.replace(like, index=index, keys=index.routing_keys.contiguous())
    keys = index.routing_keys.contiguous()
    device = keys.device
    docs = index.chunk_doc_index.to(device=device, dtype=torch.int64)
    n = index.num_documents
    if docs.numel() > 1 and bool((docs[1:] < docs[:-1]).any()):
        raise ValueError("routing index: a document's chunks must be contiguous, in bank order")
    counts = torch.bincount(docs, minlength=n)
    doc_start = torch.zeros(n + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=doc_start[1:])
    bank_ids = index.doc_ids if index.bank_doc_ids is None else index.bank_doc_ids
    bank_ids = bank_ids.to(device=device, dtype=torch.int64)
    total = bank_ids.shape[0]
    by_id = torch.argsort(bank_ids, stable=True)
    rank = torch.empty(total, dtype=torch.int64, device=device)
    rank[by_id] = torch.arange(total, device=device)
    tiebreak = (total - 1) - rank[index.shard_start:index.shard_start + n]
    bank_doc_start = (doc_start if index.bank_doc_start is None
                      else index.bank_doc_start.to(device=device, dtype=torch.int64))
    return with_live(PreparedRoutingIndex(index=index, keys=keys, doc_start=doc_start,
                                          tiebreak=tiebreak,
                                          ids_by_tiebreak=bank_ids[by_id].flip(0),
                                          positions_by_tiebreak=by_id.flip(0),
                                          bank_doc_start=bank_doc_start), index)


def same_layout(a: RoutingIndex, b: RoutingIndex) -> bool:
    """Whether two indexes have one document layout: the same chunk -> document map, ids,
    offsets and live flags (the same tensors, views of one memory alike), which is all that
    `prepare_index` derives anything from."""
    def same(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
        if x is None or y is None:
            return x is y
        return (x is y or (x.device == y.device and x.dtype == y.dtype and x.shape == y.shape
                           and x.stride() == y.stride() and x.data_ptr() == y.data_ptr()))

    return (a.shard_start == b.shard_start and a.bank_live == b.bank_live
            and a.live_count == b.live_count
            and all(same(getattr(a, f), getattr(b, f)) for f in (
                "chunk_doc_index", "doc_ids", "bank_doc_ids", "bank_doc_start", "live")))


def with_live(prep: PreparedRoutingIndex, index: RoutingIndex,
              like: PreparedRoutingIndex | None = None) -> PreparedRoutingIndex:
    """`prep` over `index`, the same documents with other live flags (`RoutingIndex.live`):
    what a removal in a running server changes, nothing else recomputed. `like`: another
    layer's result for the same layout, whose flags it shares."""
    if index.live is None:
        return dataclasses.replace(prep, index=index, live=None, num_live=None,
                                   bank_live=None)
    live = (like.live if like is not None and like.live is not None
            and same_layout(like.index, index)
            else index.live.to(device=prep.keys.device, dtype=torch.int8))
    return dataclasses.replace(prep, index=index, live=live, num_live=index.num_live,
                               bank_live=index.num_bank_live)


if HAS_TRITON:
    from vllm_msa.kernels.fp8_rows import e4m3_to_f32

    @triton.jit
    def _prepare_queries_kernel(
        q_ptr,  # [T_in, H, D] routing queries (any float dtype, unit stride over D)
        rows_ptr,  # [T_out] int64: the input row of each output row (GATHER)
        out_ptr,  # [T_out, OUT_HEADS, D] keys dtype, contiguous
        stride_qt,
        stride_qh,
        scale,  # fp32: each head's factor after normalising (NORMALIZE)
        post,  # fp32: the group sum's factor
        OUT_HEADS: tl.constexpr,
        GROUP: tl.constexpr,  # input heads folded into an output head (1: none)
        HEAD_DIM: tl.constexpr,
        OUT_HEADS_P2: tl.constexpr,
        HEAD_DIM_P2: tl.constexpr,
        NORMALIZE: tl.constexpr,
        GATHER: tl.constexpr,
    ):
        """One output token: out[o] = post * sum_g f(q[o * GROUP + g]) in fp32, rounded once to
        the output dtype, with f(x) = x / max(|x|, 1e-12) * scale (NORMALIZE) or x."""
        t = tl.program_id(0).to(tl.int64)
        src = tl.load(rows_ptr + t) if GATHER else t
        offs_o = tl.arange(0, OUT_HEADS_P2)
        offs_d = tl.arange(0, HEAD_DIM_P2)
        mask = (offs_o[:, None] < OUT_HEADS) & (offs_d[None, :] < HEAD_DIM)
        acc = tl.zeros([OUT_HEADS_P2, HEAD_DIM_P2], dtype=tl.float32)
        for g in tl.static_range(GROUP):
            heads = offs_o * GROUP + g
            x = tl.load(q_ptr + src * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                        mask=mask, other=0.0).to(tl.float32)
            if NORMALIZE:
                norm = tl.sqrt_rn(tl.sum(x * x, axis=1))
                x = tl.math.div_rn(x, tl.maximum(norm, 1e-12)[:, None]) * scale
            acc += x
        out = out_ptr + t * (OUT_HEADS * HEAD_DIM) + offs_o[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(out, (acc * post).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_kv_head(acc, k, scale, q_head_ptr, stride_qh, mask_t, Q_PER_KV: tl.constexpr,
                     HEAD_MAX: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     UPCAST: tl.constexpr, SCALED: tl.constexpr):
        """`acc` [BLOCK_C, BLOCK_T] with one KV head's key tile `k` scored against the query
        heads that share it (`q_head_ptr`: the first of them): summed, or maxed over heads.
        SCALED: `k` holds 8-bit values and each score is multiplied by its chunk's `scale`."""
        if UPCAST:
            k = k.to(tl.float32)
        for g in tl.static_range(Q_PER_KV):
            q = tl.load(q_head_ptr + g * stride_qh, mask=mask_t[:, None], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            if SCALED:
                s = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale[:, None]
                if HEAD_MAX:
                    acc = tl.maximum(acc, s)
                else:
                    acc += s
            elif HEAD_MAX:
                s = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
                acc = tl.maximum(acc, s)
            else:
                acc = tl.dot(k, tl.trans(q), acc, input_precision=DOT_PRECISION)
        return acc

    @triton.jit
    def _int8_tile_scores(k_tile, stride_kh, mask_c, scale_c, qhi_tile, qlo_tile, stride_qh,
                          s_q, mask_t, KV_HEADS: tl.constexpr, Q_PER_KV: tl.constexpr,
                          HEAD_MAX: tl.constexpr, UPCAST: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
        """Scores [BLOCK_C, BLOCK_T] fp32 of int8 keys (one scale per chunk, `scale_c`)
        against int8 queries in two levels (one scale per token, `s_q`:
        `compressed_index.IntegerQueries`), with every product in int32 on tensor cores.
        Head mean: each level's products of all KV heads sum in one int32 accumulator, then
        (hi + lo / 128) * s_q * scale_c. Head max: per head hi * 128 + lo in int32, the max
        taken there (the scales are positive and shared by the heads, so the max is the
        max of the scores), then scaled. Integers stay below 2^31; their float32 images are
        exact below 2^24 and otherwise rounded once."""
        if HEAD_MAX:
            best = tl.full([BLOCK_C, BLOCK_T], -(2**31) + 1, dtype=tl.int32)
        elif UPCAST:  # the interpreter: float32 sums of small integers are exact
            acc_hi = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.float32)
            acc_lo = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.float32)
        else:
            acc_hi = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.int32)
            acc_lo = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.int32)
        for j in range(KV_HEADS):
            k = tl.load(k_tile + j * stride_kh, mask=mask_c[:, None], other=0)
            if UPCAST:
                k = k.to(tl.float32)
            for g in tl.static_range(Q_PER_KV):
                head = j * Q_PER_KV + g
                q_hi = tl.load(qhi_tile + head * stride_qh, mask=mask_t[:, None], other=0)
                q_lo = tl.load(qlo_tile + head * stride_qh, mask=mask_t[:, None], other=0)
                if UPCAST:
                    q_hi = q_hi.to(tl.float32)
                    q_lo = q_lo.to(tl.float32)
                if HEAD_MAX:
                    if UPCAST:
                        a_hi = tl.dot(k, tl.trans(q_hi), input_precision="ieee").to(tl.int32)
                        a_lo = tl.dot(k, tl.trans(q_lo), input_precision="ieee").to(tl.int32)
                    else:
                        a_hi = tl.dot(k, tl.trans(q_hi), out_dtype=tl.int32)
                        a_lo = tl.dot(k, tl.trans(q_lo), out_dtype=tl.int32)
                    best = tl.maximum(best, a_hi * 128 + a_lo)
                elif UPCAST:
                    acc_hi = tl.dot(k, tl.trans(q_hi), acc_hi, input_precision="ieee")
                    acc_lo = tl.dot(k, tl.trans(q_lo), acc_lo, input_precision="ieee")
                else:
                    acc_hi = tl.dot(k, tl.trans(q_hi), acc_hi, out_dtype=tl.int32)
                    acc_lo = tl.dot(k, tl.trans(q_lo), acc_lo, out_dtype=tl.int32)
        if HEAD_MAX:
            raw = best.to(tl.float32) * (1.0 / 128.0)
        else:
            raw = acc_hi.to(tl.float32) + acc_lo.to(tl.float32) * (1.0 / 128.0)
        return raw * s_q[None, :] * scale_c[:, None]

    # Token and request counts change every step: not specialised (a compiled variant per
    # count == 1 / divisible by 16 would compile on requests, past the engine's warm-up).
    # Compiled for sm_90 both ways, the kernel has the same shared memory, MMAs and loads;
    # only the token loop's bounds become run-time values.
    # Sizes and row strides that follow the index's chunk and document counts are not
    # specialised: a live add grows the index by a few chunks, and a specialisation on
    # their divisibility would JIT-compile these kernels again in the middle of serving.
    @triton.jit(do_not_specialize=["num_chunks", "num_requests", "num_tokens", "stride_or"])
    def _chunk_scores_kernel(
        q_ptr,  # [T_total, QH, D]: prepared queries (normalised, scaled, maybe head-folded)
        k_ptr,  # [C, KV, D]: keys in the queries' dtype, or 8-bit values (SCALED)
        scale_ptr,  # [C, KV] fp32: the 8-bit values' scales (SCALED; else unused)
        cu_ptr,  # [R + 1] int32: request r's routing tokens are cu[r]:cu[r + 1] of q
        out_ptr,  # [R, C] fp32: S(c) per request
        num_chunks,
        num_requests,
        num_tokens,
        stride_qt,
        stride_qh,
        stride_kc,
        stride_kh,
        stride_sc,  # the scales' strides (SCALED; a scale shared by a chunk's heads: 1, 0)
        stride_sh,
        stride_or,
        KV_HEADS: tl.constexpr,
        Q_PER_KV: tl.constexpr,  # query heads (of q) per KV head: 1 when folded
        HEAD_DIM: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_T: tl.constexpr,
        HEAD_MAX: tl.constexpr,
        QUERY_MEAN: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        SCALED: tl.constexpr = False,  # 8-bit keys (`attention/compressed_index.py`)
        FP8: tl.constexpr = False,  # ... as e4m3 bytes (else int8)
        # int8 keys (one scale per chunk) against int8 queries in two levels: q_ptr holds the
        # high level, qlo_ptr the low one (same strides), qs_ptr [T_total] fp32 each token's
        # scale (`_int8_tile_scores`).
        INT_DOT: tl.constexpr = False,
        qlo_ptr=None,
        qs_ptr=None,
        # The bounded pass's intervals, stored instead of S(c): out = S - e, hi = S + e with
        # e = reduce_kv(norm[r, kv] * resid[c, kv]) + (extra[r]) * mag[c] (reduce: sum, or
        # max for HEAD_MAX); `bounded_routing.chunk_bounds` then `widened`, in one pass.
        BOUNDS: tl.constexpr = False,
        hi_ptr=None,  # [R, C] fp32
        resid_ptr=None,  # [C, KV] fp32
        mag_ptr=None,  # [C] fp32
        norm_ptr=None,  # [R, KV] fp32
        extra_ptr=None,  # [R] fp32
        KV_P2: tl.constexpr = 1,
    ):
        pid = tl.program_id(0)
        offs_c = pid.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < num_chunks
        offs_d = tl.arange(0, HEAD_DIM)
        offs_t = tl.arange(0, BLOCK_T)
        k_tile = k_ptr + offs_c[:, None] * stride_kc + offs_d[None, :]
        out_row = out_ptr + offs_c  # advanced a row per finished request (64-bit steps)
        if BOUNDS:
            hi_row = hi_ptr + offs_c
            offs_k = tl.arange(0, KV_P2)
        # The open request: the tokens of all requests form one stream, cut into blocks of
        # BLOCK_T that may span requests; each block's scores go to the requests it covers.
        r = tl.full([], 0, tl.int32)
        r_start = tl.load(cu_ptr)
        r_end = tl.load(cu_ptr + 1)
        if QUERY_MEAN:
            best = tl.zeros([BLOCK_C], dtype=tl.float32)
        else:
            best = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
        for t0 in range(0, num_tokens, BLOCK_T):
            toks = t0 + offs_t
            q_tile = q_ptr + toks[:, None] * stride_qt + offs_d[None, :]
            mask_t = toks < num_tokens
            if HEAD_MAX:
                acc = tl.full([BLOCK_C, BLOCK_T], float("-inf"), dtype=tl.float32)
            else:
                acc = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.float32)
            if INT_DOT:
                acc = _int8_tile_scores(
                    k_tile, stride_kh, mask_c,
                    tl.load(scale_ptr + offs_c * stride_sc, mask=mask_c, other=0.0),
                    q_tile, qlo_ptr + toks[:, None] * stride_qt + offs_d[None, :], stride_qh,
                    tl.load(qs_ptr + toks, mask=mask_t, other=0.0), mask_t, KV_HEADS,
                    Q_PER_KV, HEAD_MAX, UPCAST, BLOCK_C, BLOCK_T)
            else:
                for j in range(KV_HEADS):
                    scale = None
                    if SCALED:  # widened exactly (8-bit values fit the queries' dtype)
                        raw = tl.load(k_tile + j * stride_kh, mask=mask_c[:, None], other=0)
                        if FP8:  # noqa: SIM108 (constexpr branches)
                            k = e4m3_to_f32(raw.to(tl.int32))
                        else:
                            k = raw.to(tl.float32)
                        if not UPCAST:
                            k = k.to(q_ptr.dtype.element_ty)
                        scale = tl.load(scale_ptr + offs_c * stride_sc + j * stride_sh,
                                        mask=mask_c, other=0.0)
                    else:
                        k = tl.load(k_tile + j * stride_kh, mask=mask_c[:, None], other=0.0)
                    acc = _add_kv_head(acc, k, scale, q_tile + j * Q_PER_KV * stride_qh,
                                       stride_qh, mask_t, Q_PER_KV, HEAD_MAX, DOT_PRECISION,
                                       UPCAST, SCALED)
            t1 = t0 + BLOCK_T
            more = r < num_requests
            while more:
                cols = (toks >= r_start) & (toks < r_end)
                if QUERY_MEAN:
                    best += tl.sum(tl.where(cols[None, :], acc, 0.0), axis=1)
                else:
                    best = tl.maximum(
                        best, tl.max(tl.where(cols[None, :], acc, float("-inf")), axis=1))
                done = r_end <= t1
                if done:  # the request ends in this block: store S(c), open the next one
                    if QUERY_MEAN:
                        n = tl.full([BLOCK_C], 0, tl.int32) + (r_end - r_start)
                        best = tl.math.div_rn(best, n.to(tl.float32))
                    if BOUNDS:  # (loaded here, not held in registers through the loop)
                        resid = tl.load(
                            resid_ptr + offs_c[:, None] * KV_HEADS + offs_k[None, :],
                            mask=mask_c[:, None] & (offs_k < KV_HEADS)[None, :], other=0.0)
                        mag = tl.load(mag_ptr + offs_c, mask=mask_c, other=0.0)
                        norms = tl.load(norm_ptr + r * KV_HEADS + offs_k,
                                        mask=offs_k < KV_HEADS, other=0.0)
                        if HEAD_MAX:
                            err = tl.max(resid * norms[None, :], axis=1)
                        else:
                            err = tl.sum(resid * norms[None, :], axis=1)
                        err += tl.load(extra_ptr + r) * mag
                        tl.store(out_row, best - err, mask=mask_c)
                        tl.store(hi_row, best + err, mask=mask_c)
                        hi_row += stride_or
                    else:
                        tl.store(out_row, best, mask=mask_c)
                    out_row += stride_or
                    r += 1
                    r_start = r_end
                    r_end = tl.load(cu_ptr + r + 1, mask=r < num_requests, other=0)
                    if QUERY_MEAN:
                        best = tl.zeros([BLOCK_C], dtype=tl.float32)
                    else:
                        best = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
                more = done & (r < num_requests) & (r_start < t1)

    @triton.jit
    def _store_top(keys, out, TOP: tl.constexpr):
        """out[0:TOP] = the TOP largest of `keys` (distinct), largest first, as TOP serial
        maxima. (Triton's bitonic `tl.topk` measured no better on the H100: 1.6x slower for
        one question, 1.3x faster for 64, where this stage is 3% of routing.)"""
        for i in tl.static_range(TOP):
            m = tl.max(keys, axis=0)
            tl.store(out + i, m)
            keys = tl.where(keys == m, -(2**63), keys)

    @triton.jit
    def _document_scores(row_ptr, doc_start_ptr, offs, mask, BLOCK_N: tl.constexpr,
                         CHUNK_MEAN: tl.constexpr, CHUNK_TILE: tl.constexpr,
                         live_ptr=None, LIVE: tl.constexpr = False):
        """Scores [BLOCK_N] fp32 of documents `offs` from one request's chunk scores
        `row_ptr` (max | mean over each document's contiguous chunks; -0.0 made +0.0);
        with LIVE, -inf for a removed document (`live_ptr` [N] int8 0)."""
        start = tl.load(doc_start_ptr + offs, mask=mask, other=0)
        count = tl.load(doc_start_ptr + offs + 1, mask=mask, other=0) - start
        row = row_ptr + start
        if CHUNK_MEAN:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        else:
            acc = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        # A tile of CHUNK_TILE chunks of every document per load (one memory round trip
        # for typical documents instead of one per chunk), reduced by position within the
        # document: identical documents get bit-identical scores.
        offs_j = tl.arange(0, CHUNK_TILE)
        for j0 in range(0, tl.max(count, axis=0), CHUNK_TILE):
            m = (j0 + offs_j)[None, :] < count[:, None]
            v = tl.load(row[:, None] + j0 + offs_j[None, :], mask=m,
                        other=0.0 if CHUNK_MEAN else float("-inf"))
            if CHUNK_MEAN:
                acc += tl.sum(v, axis=1)
            else:
                acc = tl.maximum(acc, tl.max(v, axis=1))
        if CHUNK_MEAN:  # a document without chunks keeps 0, as scatter_reduce leaves it
            acc = tl.where(count > 0,
                           tl.math.div_rn(acc, tl.maximum(count, 1).to(tl.float32)), 0.0)
        if LIVE:
            acc = tl.where(tl.load(live_ptr + offs, mask=mask, other=0) != 0, acc,
                           float("-inf"))
        return tl.where(acc == 0.0, 0.0, acc)  # -0.0 -> +0.0: zeros tie, as they compare

    @triton.jit(do_not_specialize=["num_docs", "stride_hr", "stride_or"])
    def _candidate_documents_kernel(
        hi_ptr,  # [R, C] fp32: upper bounds of the chunk scores
        top_ptr,  # [R, K] int64: sort keys of the documents' lower bounds, best first
        kth_ptr,  # [R] int32: the column of each request's k-th (its score is tau)
        doc_start_ptr,  # [N + 1] int64
        out_ptr,  # [R, N] int8: 1 where the document's upper bound reaches tau
        live_ptr,  # [N] int8 (LIVE): 0 for a removed document, never a candidate
        num_docs,
        stride_hr,
        stride_tr,
        stride_or,
        BLOCK_N: tl.constexpr,
        CHUNK_MEAN: tl.constexpr,
        CHUNK_TILE: tl.constexpr = 8,
        LIVE: tl.constexpr = False,
    ):
        """The bounded pass's candidate test (`attention/bounded_routing.py`): the documents'
        upper bounds reduced as the document kernel reduces scores (same order: a monotone
        image of the computed document scores), against tau."""
        pid = tl.program_id(0)
        r = tl.program_id(1).to(tl.int64)
        offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = offs < num_docs
        hi = _document_scores(hi_ptr + r * stride_hr, doc_start_ptr, offs, mask, BLOCK_N,
                              CHUNK_MEAN, CHUNK_TILE, live_ptr, LIVE)
        high = (tl.load(top_ptr + r * stride_tr + tl.load(kth_ptr + r)) >> 32).to(tl.int32)
        tau = tl.where(high < 0, high ^ 0x7FFFFFFF, high).to(tl.float32, bitcast=True)
        hit = hi >= tau
        if LIVE:  # (a removed document's -inf must not pass a -inf tau)
            hit = hit & (tl.load(live_ptr + offs, mask=mask, other=0) != 0)
        tl.store(out_ptr + r * stride_or + offs, hit.to(tl.int8), mask=mask)

    @triton.jit(do_not_specialize=["num_docs", "stride_cr", "stride_kr"])
    def _document_keys_kernel(
        chunk_ptr,  # [R, C] fp32
        doc_start_ptr,  # [N + 1] int64
        tiebreak_ptr,  # [N] int64
        key_ptr,  # out: [R, N] int64 (TOP == 0) or [R, cdiv(N, BLOCK_N), TOP] candidates
        best_ptr,  # out with MERGE: [R, TOP] int64, the row's TOP largest keys, largest first
        done_ptr,  # [R] int32 zeros with MERGE: blocks of the row done (left at zero again)
        num_docs,
        stride_cr,
        stride_kr,
        stride_br,
        BLOCK_N: tl.constexpr,
        TOP: tl.constexpr,
        CHUNK_MEAN: tl.constexpr,
        MERGE: tl.constexpr,  # 0, or a power of two >= cdiv(N, BLOCK_N) * TOP
        CHUNK_TILE: tl.constexpr = 8,  # chunks of a document loaded at once
        live_ptr=None,  # [N] int8 (LIVE): removed documents (0) get the lowest keys
        LIVE: tl.constexpr = False,
    ):
        pid = tl.program_id(0)
        r = tl.program_id(1).to(tl.int64)
        offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = offs < num_docs
        acc = _document_scores(chunk_ptr + r * stride_cr, doc_start_ptr, offs, mask,
                               BLOCK_N, CHUNK_MEAN, CHUNK_TILE, live_ptr, LIVE)
        bits = acc.to(tl.int32, bitcast=True)
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # int order == float order
        tiebreak = tl.load(tiebreak_ptr + offs, mask=mask, other=0)
        key = (ordered.to(tl.int64) << 32) | tiebreak
        if TOP == 0:
            tl.store(key_ptr + r * stride_kr + offs, key, mask=mask)
        else:  # this block's TOP largest keys, largest first (keys are distinct)
            key = tl.where(mask, key, -(2**63))
            out = key_ptr + r * stride_kr + pid * TOP
            _store_top(key, out, TOP)
            if MERGE > 0:
                # The row's last block to finish merges every block's candidates: the
                # release half of the atomic publishes this block's stores, its acquire
                # half (in the last block) makes the others' visible; loads skip L1.
                blocks = tl.num_programs(0)
                if tl.atomic_add(done_ptr + r, 1, sem="acq_rel") == blocks - 1:
                    offs_m = tl.arange(0, MERGE)
                    cand = tl.load(key_ptr + r * stride_kr + offs_m,
                                   mask=offs_m < blocks * TOP, other=-(2**63),
                                   cache_modifier=".cg")
                    _store_top(cand, best_ptr + r * stride_br, TOP)
                    tl.atomic_xchg(done_ptr + r, 0)  # ready for the next call


def _token_ranges(cu_tokens, num_tokens: int) -> list[int]:
    cu = [int(x) for x in (cu_tokens.tolist() if torch.is_tensor(cu_tokens) else cu_tokens)]
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != num_tokens:
        raise ValueError(f"cu_tokens must run from 0 to {num_tokens} (the routing tokens), "
                         f"got {cu}")
    if any(b <= a for a, b in itertools.pairwise(cu)):
        raise ValueError("routing needs at least one routing-span token")
    return cu


def _top_ks(top_k, num_requests: int) -> list[int]:
    if isinstance(top_k, int):
        ks = [top_k] * num_requests
    else:
        ks = [int(k) for k in (top_k.tolist() if torch.is_tensor(top_k) else top_k)]
    if len(ks) != num_requests or any(k < 1 for k in ks):
        raise ValueError(f"top_k: expected {num_requests} values >= 1, got {ks}")
    return ks


def route_batched_reference(
    qr_all: torch.Tensor,
    cu_tokens,
    index: RoutingIndex | PreparedRoutingIndex,
    msa: MSAParams,
    top_k,
) -> list[Selection]:
    """The plain-torch path: `route` for each request in turn."""
    if isinstance(index, PreparedRoutingIndex):
        index = index.index
    cu = _token_ranges(cu_tokens, qr_all.shape[0])
    ks = _top_ks(top_k, len(cu) - 1)
    return [route(qr_all[a:b], index, msa, k)
            for a, b, k in zip(cu, cu[1:], ks, strict=False)]


def kernel_supported(qr_all: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether `route_batched` runs the Triton kernels for these inputs."""
    d = keys.shape[-1]
    return (HAS_TRITON and (keys.is_cuda or INTERPRET) and keys.dtype in KERNEL_DTYPES
            and d >= 16 and d & (d - 1) == 0 and qr_all.device == keys.device
            and qr_all.shape[1] % keys.shape[1] == 0)


def _int_tensor(values: list[int], device: torch.device, dtype=torch.int32) -> torch.Tensor:
    """A small host list on `device` without a blocking copy (pinned, non_blocking), uploaded
    once: every router layer of a step routes the same requests, so their offsets repeat
    (the kernels only read these tensors, so one copy serves every call)."""
    return _uploaded(tuple(values), torch.device(device), dtype)


@functools.lru_cache(maxsize=16)
def _uploaded(values: tuple[int, ...], device: torch.device, dtype: torch.dtype
              ) -> torch.Tensor:
    return upload(values, device, dtype)


def prepare_queries(qr_all: torch.Tensor, cu: list[int], num_kv_heads: int, msa: MSAParams,
                    dtype: torch.dtype) -> tuple[torch.Tensor, list[int], bool]:
    """Queries as the kernel reads them: fp32 normalise (cosine) and scale as `chunk_scores`
    does; with head_reduce "mean" each group's heads summed (fp32) and divided by num_heads;
    rounded once to the keys' dtype. With query_reduce "last" only each request's last token
    is kept. Returns (q [T, QH, D] contiguous, its cu offsets, head_max).

    One launch of `_prepare_queries_kernel` (`prepare_queries_torch` is the same in torch
    ops, five or so launches: what this replaces, kept as the tests' cross-check)."""
    t, num_heads, d = qr_all.shape
    head_max = msa.head_reduce == "max"
    if qr_all.stride(2) != 1:
        qr_all = qr_all.contiguous()
    rows = None
    if msa.query_reduce == "last":
        rows = _int_tensor([e - 1 for e in cu[1:]], qr_all.device, torch.int64)
        t, cu = len(cu) - 1, list(range(len(cu)))
    out_heads = num_heads if head_max else num_kv_heads
    out = torch.empty(t, out_heads, d, dtype=dtype, device=qr_all.device)
    if t == 0:
        return out, cu, head_max
    scale = msa.routing_scale(d)
    if msa.normalize_routing:
        post = 1.0 if head_max else 1.0 / num_heads
    else:  # no per-head factor: one multiply after the group sum
        scale, post = 1.0, scale if head_max else scale / num_heads
    _prepare_queries_kernel[(t,)](
        qr_all, qr_all if rows is None else rows, out, qr_all.stride(0), qr_all.stride(1),
        scale, post, OUT_HEADS=out_heads, GROUP=num_heads // out_heads, HEAD_DIM=d,
        OUT_HEADS_P2=triton.next_power_of_2(out_heads), HEAD_DIM_P2=triton.next_power_of_2(d),
        NORMALIZE=msa.normalize_routing, GATHER=rows is not None, num_warps=4)
    return out, cu, head_max


def prepare_queries_torch(qr_all: torch.Tensor, cu: list[int], num_kv_heads: int,
                          msa: MSAParams, dtype: torch.dtype
                          ) -> tuple[torch.Tensor, list[int], bool]:
    """`prepare_queries` in torch ops."""
    if msa.query_reduce == "last":
        last = _int_tensor([e - 1 for e in cu[1:]], qr_all.device, torch.int64)
        qr_all, cu = qr_all.index_select(0, last), list(range(len(cu)))
    t, num_heads, d = qr_all.shape
    scale = msa.routing_scale(d)
    head_max = msa.head_reduce == "max"
    if msa.normalize_routing:
        q = torch.nn.functional.normalize(qr_all.float(), p=2, dim=-1).mul_(scale)
        if not head_max:
            q = q.reshape(t, num_kv_heads, -1, d).sum(2).mul_(1.0 / num_heads)
    elif head_max:
        q = qr_all.float() * scale  # not in place: .float() of fp32 input is the input
    else:  # sum the group's heads in fp32, then one multiply by scale / num_heads
        q = qr_all.reshape(t, num_kv_heads, -1, d).sum(2, dtype=torch.float32)
        q = q.mul_(scale / num_heads)
    return q.to(dtype).contiguous(), cu, head_max


def _is_explicit(config: KernelConfig | None) -> bool:
    return config is not None and None not in (config.block_c, config.block_t,
                                               config.num_warps, config.num_stages)


@functools.lru_cache(maxsize=256)
def resolve_config(config: KernelConfig | None, keys_dtype: torch.dtype,
                   head_max: bool = False) -> KernelConfig:
    """`config` with its `None` fields taken from `default_config`."""
    auto = default_config(keys_dtype, head_max)
    if config is None:
        return auto
    return KernelConfig(**{f: getattr(auto, f) if getattr(config, f) is None
                           else getattr(config, f) for f in KernelConfig.__dataclass_fields__})


def _smaller(cfg: KernelConfig) -> KernelConfig | None:
    """The next smaller tiles to try when `cfg` does not fit (out of shared memory)."""
    if cfg.num_stages > 1:
        return dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
    if cfg.block_t > 16:
        return dataclasses.replace(cfg, block_t=cfg.block_t // 2)
    if cfg.block_c > 16:
        return dataclasses.replace(cfg, block_c=cfg.block_c // 2)
    return None


_FITTED: dict[tuple, KernelConfig] = {}  # (config, shape key) -> tiles that fit


def chunk_scores_batched(
    qr_all: torch.Tensor,
    cu_tokens,
    index: RoutingIndex | PreparedRoutingIndex,
    msa: MSAParams,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """S(c) for every request and chunk: [R, C] fp32 (the fused kernel)."""
    prep = prepare_index(index)
    cu = _token_ranges(cu_tokens, qr_all.shape[0])
    return _chunk_scores(qr_all, cu, prep, msa, config)


def _chunk_scores(qr_all, cu, prep: PreparedRoutingIndex, msa: MSAParams,
                  config: KernelConfig | None) -> torch.Tensor:
    q, cu, head_max = prepare_queries(qr_all, cu, prep.keys.shape[1], msa, prep.keys.dtype)
    return launch_chunk_scores(q, cu, head_max, msa.query_reduce == "mean", prep.keys,
                               config=config)


def launch_chunk_scores(q: torch.Tensor, cu: list[int], head_max: bool, query_mean: bool,
                        keys: torch.Tensor, scale: torch.Tensor | None = None,
                        config: KernelConfig | None = None, integer=None,
                        bounds: tuple | None = None) -> torch.Tensor:
    """S(c) [R, C] fp32 of prepared queries `q` (`prepare_queries`) against `keys` in their
    dtype, or against 8-bit keys (int8, or e4m3 as `torch.float8_e4m3fn`) times `scale`
    [C, KV] (any strides: a scale shared by a chunk's KV heads is a broadcast column;
    `attention/bounded_routing.py`'s bounded pass). `integer`: the queries as
    `compressed_index.IntegerQueries` (int8 keys with one scale per chunk), multiplied on
    int8 tensor cores; `q` is then unused. `bounds` = (resid [C, KV], mag [C], norm [R, KV],
    extra [R]), all fp32: the intervals instead of S (the kernel's BOUNDS), returned as
    (lower, upper)."""
    if integer is not None:
        if keys.dtype != torch.int8 or scale is None:
            raise ValueError("integer queries need int8 keys and their scales (one per chunk)")
        q = integer.hi
    num_chunks, kv, d = keys.shape
    num_requests, num_tokens = len(cu) - 1, q.shape[0]
    # (lower and upper bounds: two allocations, so both stay 16-byte aligned at any R x C:
    # Triton compiles a variant per pointer alignment)
    out = torch.empty(num_requests, num_chunks, dtype=torch.float32, device=keys.device)
    hi = torch.empty_like(out) if bounds else None
    rows = out
    if num_chunks == 0:
        return (out, hi) if bounds else out
    resid, mag, norm, extra = bounds or (None,) * 4
    scaled = scale is not None
    if integer is not None and kv > 1 and scale.stride(1) != 0:
        raise ValueError("integer queries need one scale per chunk (a broadcast column)")
    fp8 = scaled and keys.dtype != torch.int8
    if fp8:
        keys = keys.view(torch.uint8)  # decoded with integer ops (`fp8_rows.e4m3_to_f32`)
    cu_dev = _int_tensor(cu, keys.device)
    cfg = resolve_config(config, q.dtype, head_max)
    shape_key = (cfg, keys.dtype, head_max, q.shape[1] // kv, d, keys.device)
    cfg = _FITTED.get(shape_key, cfg)
    while True:
        block_t = min(cfg.block_t, max(16, triton.next_power_of_2(num_tokens)))
        try:
            _chunk_scores_kernel[(triton.cdiv(num_chunks, cfg.block_c),)](
                q, keys, scale if scaled else out, cu_dev, rows,
                num_chunks, num_requests, num_tokens,
                q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
                scale.stride(0) if scaled else 0, scale.stride(1) if scaled else 0,
                rows.stride(0),
                KV_HEADS=kv, Q_PER_KV=q.shape[1] // kv, HEAD_DIM=d,
                BLOCK_C=cfg.block_c, BLOCK_T=block_t,
                HEAD_MAX=head_max, QUERY_MEAN=query_mean,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                UPCAST=INTERPRET and q.dtype != torch.float32,
                SCALED=scaled, FP8=fp8, INT_DOT=integer is not None,
                qlo_ptr=None if integer is None else integer.lo,
                qs_ptr=None if integer is None else integer.scale,
                BOUNDS=bounds is not None, hi_ptr=hi,
                resid_ptr=resid, mag_ptr=mag, norm_ptr=norm, extra_ptr=extra,
                KV_P2=triton.next_power_of_2(kv),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        except Exception as e:  # Triton's OutOfResources: shrink defaults, never explicit
            smaller = _smaller(cfg)
            if type(e).__name__ != "OutOfResources" or _is_explicit(config) or smaller is None:
                raise
            cfg = smaller
            continue
        _FITTED[shape_key] = cfg
        return (out, hi) if bounds else out


def document_keys_batched(chunk: torch.Tensor, prep: PreparedRoutingIndex, msa: MSAParams,
                          top: int = 0, block_n: int = 1024, merge: bool = False,
                          num_warps: int | None = None, chunk_tile: int = 8) -> torch.Tensor:
    """Sort keys of the documents from [R, C] chunk scores: [R, N] int64 (top == 0), or each
    block of `block_n` documents' `top` largest keys, [R, cdiv(N, block_n) * top], or with
    `merge` (top > 0, see `merge_width`) the `top` largest keys of each row, largest first,
    [R, top]. A key is the order-preserving int32 image of the fp32 document score (high
    half) and the document's tiebreak (low half); `decode_keys` turns keys back into ids and
    scores. `num_warps` and `chunk_tile` (chunks of a document per load) are for the
    benchmark's sweep."""
    num_requests = chunk.shape[0]
    n = prep.tiebreak.shape[0]
    blocks = triton.cdiv(n, block_n) if n else 0
    width = n if top == 0 else blocks * top
    keys = torch.empty(num_requests, width, dtype=torch.int64, device=chunk.device)
    merged = merge_width(n, top, block_n) if merge else 0
    if merge and not merged:
        raise ValueError(f"no one-program merge of {width} candidates (top {top})")
    best = (torch.empty(num_requests, top, dtype=torch.int64, device=chunk.device)
            if merged else keys)
    if n:
        _document_keys_kernel[(blocks, num_requests)](
            chunk, prep.doc_start, prep.tiebreak, keys, best,
            _block_counters(chunk.device, num_requests) if merged else keys,
            n, chunk.stride(0), keys.stride(0), best.stride(0),
            BLOCK_N=block_n, TOP=top, CHUNK_MEAN=msa.chunk_reduce == "mean", MERGE=merged,
            CHUNK_TILE=chunk_tile, live_ptr=prep.live, LIVE=prep.live is not None,
            num_warps=num_warps or (8 if block_n >= 1024 else 4),
        )
    return best if merged else keys


# The most candidates the last block of a row merges (a power of two): more are left to topk.
MAX_MERGE = 4096


# Measured on an H100 (benchmarks/results/routing-stages-313cc5a-*.json, "stage_gpu_us"): at
# one question and 10M-25M memory tokens, blocks of 256 documents take 12-15 us with the
# merge, 1024 up to 2 us more; topk over candidates costs 6-11 us more than the merge.
DOCUMENT_BLOCKS = (256, 512, 1024)


def document_block(num_docs: int, top: int) -> int:
    """The document kernel's block: the smallest of DOCUMENT_BLOCKS that keeps the fused
    merge (the largest where none does)."""
    for block_n in DOCUMENT_BLOCKS:
        if merge_width(num_docs, top, block_n):
            return block_n
    return DOCUMENT_BLOCKS[-1]


def merge_width(num_docs: int, top: int, block_n: int) -> int:
    """The padded candidate count the fused merge loads (0: too many, or nothing to merge)."""
    if not num_docs or top == 0:
        return 0
    width = triton.next_power_of_2(triton.cdiv(num_docs, block_n) * top)
    return width if width <= MAX_MERGE else 0


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _block_counters(device: torch.device, rows: int) -> torch.Tensor:
    """Per-row block counters of the fused merge, zero between calls (the merging block
    resets its row). One buffer per device: calls on one stream run one after another."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.shape[0] < rows:
        counters = _COUNTERS[device] = torch.zeros(max(rows, 64), dtype=torch.int32,
                                                   device=device)
    return counters


def key_scores(keys: torch.Tensor) -> torch.Tensor:
    """The fp32 scores that sort keys hold (their high halves), exactly."""
    high = (keys >> 32).to(torch.int32)
    return torch.where(high < 0, high ^ 0x7FFFFFFF, high).view(torch.float32)


def decode_keys(keys: torch.Tensor, prep: PreparedRoutingIndex) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """(document ids, fp32 scores) of sort keys (exact: the keys hold the scores' bits)."""
    return prep.ids_by_tiebreak[keys & 0xFFFFFFFF], key_scores(keys)


def selection_keys(selections: list[Selection], prep: PreparedRoutingIndex, width: int
                   ) -> torch.Tensor:
    """The sort keys `_document_keys_kernel` makes, of torch-path selections: [R, width]
    int64, best first, padded with NO_CANDIDATE (`decode_keys` inverts it)."""
    keys = torch.full((len(selections), width), NO_CANDIDATE, dtype=torch.int64,
                      device=prep.ids_by_tiebreak.device)
    ascending = prep.ids_by_tiebreak.flip(0)
    for row, selection in enumerate(selections):
        ids = selection.doc_ids.to(device=keys.device, dtype=torch.int64)
        # (An id stored twice is a replaced document: the live copy is the later one.)
        tiebreak = (prep.num_bank_documents - 1) - (
            torch.searchsorted(ascending, ids, right=True) - 1)
        score = selection.scores.to(device=keys.device, dtype=torch.float32)
        bits = torch.where(score == 0, 0.0, score).view(torch.int32)  # -0.0 ties +0.0
        ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
        keys[row, :ids.shape[0]] = (ordered << 32) | tiebreak
    return keys


def top_candidates(candidates: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest sort keys of each row, largest first (keys are distinct)."""
    return torch.topk(candidates, k, dim=1, largest=True, sorted=True).values


@dataclass(frozen=True)
class RoutedBatch:
    """One layer's routing of R requests, left on the device as the top-k sort keys: staging
    reads them there (`kernels/stage.py`); ids and scores are decoded only when asked for."""

    keys: torch.Tensor  # [R, k_top] int64, best first
    ks: list[int]  # each request's own k (<= k_top)
    prep: PreparedRoutingIndex

    @functools.cached_property
    def decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        return decode_keys(self.keys, self.prep)

    def selection(self, row: int) -> Selection:
        ids, scores = self.decoded
        k = self.ks[row]
        return Selection(doc_ids=ids[row, :k], scores=scores[row, :k])


def top_document_keys(chunk: torch.Tensor, prep: PreparedRoutingIndex, msa: MSAParams,
                      k: int, config: KernelConfig | None = None) -> torch.Tensor:
    """The `k` (<= the index's documents) best documents' sort keys from [R, C] chunk scores:
    [R, k] int64, best first."""
    n = prep.tiebreak.shape[0]
    # Blocks of documents hand up their top candidates (a power of two, few compiled
    # variants); topk over those. Past MAX_BLOCK_TOP, keys of every document.
    top = max(1, triton.next_power_of_2(k))
    block_n = (config or KernelConfig()).block_n or document_block(n, top)
    top = 0 if top > min(MAX_BLOCK_TOP, block_n) else top
    if merge_width(n, top, block_n):  # the last block of each row merges: no topk launch
        return document_keys_batched(chunk, prep, msa, top, block_n, merge=True)[:, :k]
    return top_candidates(document_keys_batched(chunk, prep, msa, top, block_n), k)


def candidate_documents(hi: torch.Tensor, top: torch.Tensor, ks: list[int],
                        prep: PreparedRoutingIndex, msa: MSAParams, block_n: int = 1024
                        ) -> torch.Tensor:
    """[R, N] int8: 1 where a document's upper bound (its chunks' `hi` [R, C] reduced as the
    document kernel reduces scores) reaches τ_r, the score of request r's k-th sort key in
    `top` [R, >= k] (`top_document_keys` of the lower bounds; k = ks[r])."""
    num_requests, n = hi.shape[0], prep.tiebreak.shape[0]
    out = torch.empty(num_requests, n, dtype=torch.int8, device=hi.device)
    if n and num_requests:
        _candidate_documents_kernel[(triton.cdiv(n, block_n), num_requests)](
            hi, top, _int_tensor([k - 1 for k in ks], hi.device), prep.doc_start, out,
            out if prep.live is None else prep.live, n,
            hi.stride(0), top.stride(0), out.stride(0), BLOCK_N=block_n,
            CHUNK_MEAN=msa.chunk_reduce == "mean", LIVE=prep.live is not None,
            num_warps=8 if block_n >= 1024 else 4)
    return out


def route_batched_keys(
    qr_all: torch.Tensor,
    cu_tokens,
    index: RoutingIndex | PreparedRoutingIndex,
    msa: MSAParams,
    top_k,
    config: KernelConfig | None = None,
    exchange: Exchange | None = None,
) -> RoutedBatch | None:
    """`route_batched` without decoding: the top-k sort keys of every request, or None where
    the kernels cannot run. Nothing here waits for the GPU. On a shard of the index
    (`vllm_msa.attention.index_parallel`), `exchange` gathers every shard's candidates."""
    keys = index.keys if isinstance(index, PreparedRoutingIndex) else index.routing_keys
    if not kernel_supported(qr_all, keys):
        return None
    prep = prepare_index(index)
    cu = _token_ranges(cu_tokens, qr_all.shape[0])
    ks = _top_ks(top_k, len(cu) - 1)
    k_top = min(max(ks), prep.bank_live_documents)
    if k_top == 0:
        return RoutedBatch(torch.empty(len(ks), 0, dtype=torch.int64, device=keys.device),
                           [0] * len(ks), prep)
    # This index's live documents: a shard may hold fewer than k.
    k_local = min(k_top, prep.live_documents)
    best = torch.full((len(ks), k_top), NO_CANDIDATE, dtype=torch.int64, device=keys.device)
    if k_local:
        chunk = _chunk_scores(qr_all, cu, prep, msa, config)
        best[:, :k_local] = top_document_keys(chunk, prep, msa, k_local, config)
    if exchange is not None:  # a shard of the index: the best of every rank's candidates
        best = top_candidates(exchange(best), k_top)
    return RoutedBatch(best, [min(k, k_top) for k in ks], prep)


def route_batched(
    qr_all: torch.Tensor,
    cu_tokens,
    index: RoutingIndex | PreparedRoutingIndex,
    msa: MSAParams,
    top_k,
    config: KernelConfig | None = None,
    exchange: Exchange | None = None,
) -> list[Selection]:
    """Routing of R requests in one router layer: one `Selection` per request.

    qr_all: [T_total, num_heads, head_dim] fp32/bf16, the routing-span tokens of all requests
    concatenated; cu_tokens: [R + 1] offsets into it (a list, or an int tensor, read on the
    host); top_k: an int or one per request. Pass a `prepare_index(index)` to skip
    re-deriving the document offsets on every call. Nothing here waits for the GPU. Falls back
    to `route_batched_reference` where the kernels cannot run.
    """
    routed = route_batched_keys(qr_all, cu_tokens, index, msa, top_k, config, exchange)
    if routed is not None:
        return [routed.selection(r) for r in range(len(routed.ks))]
    selections = route_batched_reference(qr_all, cu_tokens, index, msa, top_k)
    if exchange is None:
        return selections
    # A shard's own selections as sort keys, exchanged and merged like the kernels' keys.
    prep = prepare_index(index)
    ks = _top_ks(top_k, len(selections))
    k_top = min(max(ks, default=0), prep.bank_live_documents)
    merged = RoutedBatch(top_candidates(exchange(selection_keys(selections, prep, k_top)),
                                        k_top), [min(k, k_top) for k in ks], prep)
    return [merged.selection(r) for r in range(len(ks))]


def routing_flops(num_tokens: int, num_heads: int, num_chunks: int, head_dim: int) -> float:
    """2 * T * H * C * D: the multiply-adds of every (token, head, chunk) score."""
    return 2.0 * num_tokens * num_heads * num_chunks * head_dim


__all__ = [
    "HAS_TRITON",
    "KernelConfig",
    "PreparedRoutingIndex",
    "RoutedBatch",
    "chunk_scores_batched",
    "decode_keys",
    "document_keys_batched",
    "kernel_supported",
    "prepare_index",
    "prepare_queries",
    "route_batched",
    "route_batched_keys",
    "route_batched_reference",
    "routing_flops",
    "selection_keys",
    "top_candidates",
]
