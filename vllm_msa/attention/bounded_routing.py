"""Routing over an 8-bit index that selects exactly what the full-precision index selects.

Two passes per router layer and batch of requests:

1. **Bounded pass** over the compressed keys (`compressed_index.py`): for every request r and
   document d an interval [lo, hi] that certainly holds S_r(d), the document score that the
   full-precision routing (`routing.route`, or the Triton kernels on a GPU) computes.
2. **Exact re-score** of the candidates: the documents whose hi reaches the k-th largest lo.
   Their full-precision keys are read back (the bank files, memory-mapped) and routed by the
   same full-precision code, as a small index of their own; its top-k is the answer.

Why the answer is exactly the full-precision one (ids, order, scores). Let τ_r be the k-th
largest lo_r(d). At least k documents have S_r(d) >= lo_r(d) >= τ_r, so the k-th best score
S_r(k) >= τ_r; a document with hi_r(d) < τ_r has S_r(d) < τ_r <= S_r(k), so it is strictly
outside the top-k, ties included. Every document of the top-k is thus a candidate, and the
full-precision code scores each candidate exactly as it scores it in the whole index (a
document's score depends only on its own chunks: `routing.PAD_CHUNKS`, and the kernels reduce
by position within the document), with the same tie rule (the bank's document ids). Taking
the union of the batch's candidates for every request only adds documents that lose.

The interval. Write the scores in real arithmetic with the exact scorer's query q (after
normalisation, scale and, for the head mean, each KV group's mean of heads: the head mean of
q_h . k_kv(h) equals Σ_kv q̄_kv . k_kv), and ŝ for the same computed with k̂ instead of k.
For one token t and chunk c, by Cauchy-Schwarz with ρ >= ||k - k̂|| (`residual`):

    head mean:  |s_t - ŝ_t| <= Σ_kv ||q̄_t,kv|| ρ_kv
    head max:   |s_t - ŝ_t| <= max_h ||q_t,h|| ρ_kv(h)   (a max moves at most as its terms)

The token reduce moves by at most the largest per-token move (max, last) or their mean
(mean), so the chunk score S(c) is within E_r(c) of Ŝ(c): E = Σ_kv n_kv ρ_c,kv (head mean) or
max_kv n_kv ρ_c,kv (head max), where n_kv is, over the request's tokens, the mean of
||q̄_t,kv|| (head mean with the token mean) or else the largest ||q_t,h|| of the group's heads.
[Ŝ - E, Ŝ + E] reduced over each document's chunks like the scores (max and mean are
monotone) brackets S_r(d). So the bounded pass is the exact routing computation run on k̂
(the chunk-score kernel reading 8-bit values and scales: `kernels.routing`) plus a small
[requests, chunks] product for E; no per-token bound is ever formed.

Where E is formed was measured on an H200 (MSA-4B shape, 100M tokens; the records are
compressed-routing-*-nvidia-h200.json): in the chunk-score kernel's epilogue (here), about
0.07 ms of GPU time at one question; from each document's largest ρ instead, in the document
kernel, 0.05 ms less, but 30-50 % more documents re-scored, whose host reads cost more than
that; per chunk in the document kernel, 0.3 ms more.

Over an int8 index the kernel multiplies int8 queries too (`compressed_index.IntegerQueries`:
q̂ = s (hi + lo / 128), one s per token; exact integer products on tensor cores), so ŝ is
q̂ . k̂. Then |q . k - q̂ . k̂| <= ||q|| ||k - k̂|| + ||q - q̂|| ||k̂||, and ||k̂|| <= M_c (the
chunk's `magnitude`): E gains μ_r M_c, μ_r the Σ_kv (head mean) or max_kv (head max) of the
query errors ||q - q̂|| reduced over tokens like n. Q_r then also bounds ||s hi|| +
||s lo / 128||, the size of the terms the kernel rounds (a few roundings a score: the int32
sums' float32 images, the level sum, the two scales; far inside the margin below).

Floating point. Every quantity involved, each path's own way of computing it included, is at
most A = Q_r * M_d in magnitude, with Q_r the largest over r's tokens of Σ_kv ||q̄_kv||
(mean; the torch path's per-head mean (1/H) Σ_h ||q_h||) or max_h ||q_h|| (max), and M_d
the largest `magnitude` of d's chunks (>= ||k||, ||k̂||). A dot product of D terms, a sum of
H heads and a reduce of n values, computed in float32 in any order, are within
(D + H) u_dot A and n u_sum A of their real values. With u_dot = 2^-20 (IEEE float32 rounds
at 2^-24; the margin covers tensor-core accumulators and the scale and norm roundings) and
u_sum = 2^-23 for the plain float32 token and chunk reduces, both the full-precision score
and the computed lo/hi are within γ A of their real values, γ = (D + H + 8) u_dot +
(T + C_d + 8) u_sum (T: the request's routing tokens; C_d: the document's chunks). Widening
each chunk's [lo, hi] by 2 γ A on each side (A with its document's M_d) makes it hold the
computed chunk score; the document reduce, monotone, then holds the computed S_r(d).

What it costs: the pass reads 1 byte a value instead of 2, and computes the intervals; the
re-score reads 2 bytes a value of the candidates only. How many candidates there are depends
on how close the scores near the k-th are (docs/compressed-banks.md has measured rates);
`RescoreStats` counts them.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import MSAParams
from .compressed_index import CompressedKeys, ExactKeys, IntegerQueries, integer_queries
from .routing import RoutingIndex, normalized_keys
from .uploads import upload

DOT_UNIT = 2.0**-20
SUM_UNIT = 2.0**-23
MAX_TILE_ELEMENTS = 1 << 26  # float32 scores per tile of the bounded pass (256 MiB)


@dataclass
class RescoreStats:
    """How much exact re-scoring the bounded pass left, summed over routing calls."""

    calls: int = 0
    requests: int = 0
    documents: int = 0  # the index's documents, per call
    candidates: int = 0  # documents re-scored, per call (the union over its requests)
    chunks_read: int = 0
    bytes_read: int = 0
    seconds: float = 0.0  # reading the candidates' exact keys and moving them to the device

    def add(self, requests: int, documents: int, candidates: int, chunks: int,
            nbytes: int, seconds: float) -> None:
        self.calls += 1
        self.requests += requests
        self.documents += documents
        self.candidates += candidates
        self.chunks_read += chunks
        self.bytes_read += nbytes
        self.seconds += seconds

    def to_json(self) -> dict[str, Any]:
        return {"calls": self.calls, "requests": self.requests, "documents": self.documents,
                "candidates": self.candidates,
                "rescored_fraction": self.candidates / self.documents if self.documents else 0.0,
                "chunks_read": self.chunks_read, "bytes_read": self.bytes_read,
                "seconds": round(self.seconds, 6)}


@dataclass(frozen=True)
class CompressedRoutingIndex:
    """A router layer's index served from `CompressedKeys`, with the way back to exact keys.

    `layout` is the `RoutingIndex` the full-precision keys would make (the chunk -> document
    map, ids, shard); its `routing_keys` are the 8-bit values (for shapes and device only)."""

    layout: RoutingIndex
    keys: CompressedKeys
    exact: ExactKeys
    model_dtype: torch.dtype  # the full-precision keys' dtype (what the kernels multiply)
    prepared: Any  # kernels.routing.PreparedRoutingIndex of `layout`: offsets, tie-breaks
    max_doc_chunks: int
    normalize: bool = False  # the served keys are the stored ones L2-normalised (cosine)
    stats: RescoreStats = field(default_factory=RescoreStats, compare=False)

    @classmethod
    def build(cls, layout: RoutingIndex, keys: CompressedKeys, exact: ExactKeys,
              model_dtype: torch.dtype, normalize: bool = False, like: Any = None
              ) -> CompressedRoutingIndex:
        """`keys`: the served keys compressed (normalised first where `normalize`). Each
        chunk's `magnitude` becomes its document's largest (M_d, module docstring).
        `like`: another layer's `prepared`, shared where the layout is the same."""
        from ..kernels.routing import prepare_index

        prepared = prepare_index(layout, like)
        n = layout.num_documents
        docs = layout.chunk_doc_index.to(keys.magnitude.device)
        if docs.numel():
            per_doc = torch.zeros(n, dtype=torch.float32, device=docs.device).scatter_reduce(
                0, docs, keys.magnitude, reduce="amax", include_self=False)
            keys = dataclasses.replace(keys, magnitude=per_doc[docs])
        counts = prepared.doc_start.diff()
        return cls(layout, keys, exact, model_dtype, prepared,
                   int(counts.max()) if n else 0, normalize)

    @property
    def num_documents(self) -> int:
        return self.layout.num_documents

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes


@dataclass(frozen=True)
class BoundQueries:
    """The queries of the bounded pass, as the exact scorer multiplies them."""

    q: torch.Tensor  # [T', QH, D] float32: QH = KV (head mean, folded) or H (head max)
    cu: list[int]  # request r's rows are cu[r]:cu[r + 1] of q
    head_max: bool
    magnitude: torch.Tensor  # [R] float32: Q_r (module docstring)
    num_tokens: int  # the most routing tokens of any request (T in γ)
    num_heads: int  # the model's query heads (H in γ)
    kernel_q: torch.Tensor | None = None  # q in the kernels' dtype: the bounds kernel reads it
    integer: IntegerQueries | None = None  # kernel_q in two int8 levels (int8 indexes)
    int8: bool = False  # the kernels multiply int8 queries (`integer`, or made by the kernels)


def bound_queries(qr_all: torch.Tensor, cu: list[int], num_kv_heads: int, msa: MSAParams,
                  kernel_dtype: torch.dtype | None, integer: bool = False) -> BoundQueries:
    """The exact scorer's queries: the kernels' (rounded to `kernel_dtype`, as
    `kernels.routing.prepare_queries` makes them; with `integer`, also as `IntegerQueries`
    for an int8 index) or, with `kernel_dtype` None, the torch path's (`routing.chunk_scores`:
    float32, per head)."""
    from ..kernels.routing import prepare_queries, prepare_queries_torch

    num_heads, d = qr_all.shape[1], qr_all.shape[2]
    tokens = max(b - a for a, b in itertools.pairwise(cu))
    if kernel_dtype is not None:
        kernel_q, cu_q, head_max = prepare_queries(qr_all, cu, num_kv_heads, msa, kernel_dtype)
        q = kernel_q.float()
        norms = q.norm(dim=-1)
        if integer:
            ints = integer_queries(kernel_q)
            norms = torch.maximum(norms, ints.size)
        per_token = norms.amax(1) if head_max else norms.sum(1)
        rows = cu_q  # (with the "last" reduce: one row per request)
    else:
        q, cu_q, head_max = prepare_queries_torch(qr_all, cu, num_kv_heads, msa, torch.float32)
        kernel_q = ints = None
        heads = qr_all.float()
        if msa.normalize_routing:
            heads = torch.nn.functional.normalize(heads, p=2, dim=-1)
        norms = heads.norm(dim=-1) * msa.routing_scale(d)  # [T, H]
        per_token = norms.amax(1) if head_max else norms.sum(1) / num_heads
        rows = cu  # (every token: an upper bound of the last one's)
    magnitude = torch.stack([per_token[a:b].amax() for a, b in itertools.pairwise(rows)])
    return BoundQueries(q, cu_q, head_max, magnitude, tokens, num_heads, kernel_q,
                        ints if integer else None, bool(integer and kernel_q is not None))


def kernel_queries(qr_all: torch.Tensor, cu: list[int], num_kv_heads: int, msa: MSAParams,
                   kernel_dtype: torch.dtype, integer: bool) -> BoundQueries:
    """The kernels' queries alone (one launch), for `fused_intervals`: `integer` marks int8
    queries (made there), `q` and `magnitude` are left empty."""
    from ..kernels.routing import prepare_queries

    kernel_q, cu_q, head_max = prepare_queries(qr_all, cu, num_kv_heads, msa, kernel_dtype)
    empty = torch.empty(0, dtype=torch.float32, device=kernel_q.device)
    return BoundQueries(empty, cu_q, head_max, empty,
                        max(b - a for a, b in itertools.pairwise(cu)), qr_all.shape[1],
                        kernel_q, int8=integer)


def query_norms(queries: BoundQueries, num_kv_heads: int, query_reduce: str,
                norms: torch.Tensor | None = None) -> torch.Tensor:
    """n [R, KV] of the module docstring: each request's query norms per KV head (or of
    other per-row norms [T', QH], `norms`: μ's query errors)."""
    norms = queries.q.norm(dim=-1) if norms is None else norms  # [T', QH]
    if queries.head_max:
        norms = norms.view(norms.shape[0], num_kv_heads, -1).amax(-1)
    mean = query_reduce == "mean" and not queries.head_max
    return torch.stack([norms[a:b].mean(0) if mean else norms[a:b].amax(0)
                        for a, b in itertools.pairwise(queries.cu)])


def approximate_scores(queries: BoundQueries, keys: CompressedKeys, query_reduce: str
                       ) -> torch.Tensor:
    """Ŝ [R, C]: the chunk scores of the 8-bit keys k̂, computed as the exact scorer computes
    them: by the chunk-score kernel (one read of the 8-bit index) with the kernels' queries,
    else in torch a tile of chunks at a time."""
    if queries.kernel_q is not None:
        from ..kernels.routing import launch_chunk_scores

        return launch_chunk_scores(queries.kernel_q, queries.cu, queries.head_max,
                                   query_reduce == "mean", keys.values, keys.scale,
                                   integer=queries.integer)
    q = queries.q
    t, qh, d = q.shape
    kv = keys.values.shape[1]
    out = torch.empty(len(queries.cu) - 1, keys.num_chunks, dtype=torch.float32,
                      device=q.device)
    tile = max(64, MAX_TILE_ELEMENTS // max(1, t * qh))
    for start in range(0, keys.num_chunks, tile):
        stop = min(keys.num_chunks, start + tile)
        k_hat = keys.dequantized(start, stop)  # [c, KV, D]
        if queries.head_max:
            s = torch.einsum("tkgd,ckd->tkgc", q.view(t, kv, qh // kv, d), k_hat)
            s = s.amax(dim=(1, 2))
        else:
            s = torch.einsum("tkd,ckd->tc", q, k_hat)
        for r, (a, b) in enumerate(itertools.pairwise(queries.cu)):
            # max; "last": the queries hold each request's last token only
            out[r, start:stop] = s[a:b].mean(0) if query_reduce == "mean" else s[a:b].amax(0)
    return out


def chunk_bounds(queries: BoundQueries, keys: CompressedKeys, query_reduce: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) = Ŝ -/+ E: [R, C] float32 brackets of every request's chunk scores S(c),
    before the floating-point widening (`document_bounds`)."""
    s_hat = approximate_scores(queries, keys, query_reduce)
    norms = query_norms(queries, keys.values.shape[1], query_reduce)
    if queries.head_max:
        err = torch.stack([(keys.residual * n).amax(-1) for n in norms])
    else:
        err = norms @ keys.residual.t()
    if queries.integer is not None:  # the queries' own error, times ||k̂|| <= magnitude
        mu = query_error(queries, keys.values.shape[1], query_reduce)
        err = torch.addcmul(err, mu[:, None], keys.magnitude[None, :])
    return s_hat - err, s_hat + err


def widened(queries: BoundQueries, index: CompressedRoutingIndex, lo: torch.Tensor,
            hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk brackets widened by 2 γ A for floating point (module docstring): [R, C] each,
    certain to hold each chunk score as the exact scorer computes it."""
    slack = ((2 * gamma(queries, index)) * queries.magnitude[:, None]
             * index.keys.magnitude[None, :])
    return lo - slack, hi + slack


def document_bounds(index: CompressedRoutingIndex, msa: MSAParams, lo: torch.Tensor,
                    hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Widened chunk brackets reduced to documents as the torch path reduces scores
    (`routing.document_scores`; the kernels' path reduces them in `fused_candidates`).
    [R, n] each."""
    n = index.num_documents
    reduce = "amax" if msa.chunk_reduce == "max" else "mean"
    docs = index.layout.chunk_doc_index.to(lo.device).expand(lo.shape[0], -1)
    live = index.layout.live
    out = []
    for x in (lo, hi):
        init = torch.full((x.shape[0], n), float("-inf") if reduce == "amax" else 0.0,
                          dtype=torch.float32, device=x.device)
        doc = (init.scatter_reduce(1, docs, x, reduce=reduce, include_self=False)
               if x.shape[1] else init)
        if live is not None:  # removed documents: never candidates
            doc = doc.masked_fill(~live.to(doc.device), float("-inf"))
        out.append(doc)
    return out[0], out[1]


def candidates(doc_lo: torch.Tensor, doc_hi: torch.Tensor, top_ks: list[int],
               live: torch.Tensor | None = None, num_live: int | None = None) -> torch.Tensor:
    """[n] bool: the documents some request may select (hi >= that request's k-th lo);
    never a removed one (`live` False, `num_live` of them True: their bounds are -inf)."""
    n = doc_lo.shape[1] if live is None else num_live
    if live is not None:
        live = live.to(doc_lo.device)
    ks = [min(k, n) for k in top_ks]
    if not n or not max(ks):
        return torch.zeros(doc_lo.shape[1], dtype=torch.bool, device=doc_lo.device)
    best = torch.topk(doc_lo, max(ks), dim=1).values  # one launch for the batch
    if len(set(ks)) == 1:
        tau = best[:, -1:]
    else:  # (a pinned upload: nothing waits, and the pass stays capturable in a CUDA graph)
        tau = best.gather(1, upload([k - 1 for k in ks], doc_lo.device)[:, None])
    hit = (doc_hi >= tau).any(0)
    return hit if live is None else hit & live


def candidate_index(index: CompressedRoutingIndex, docs: torch.Tensor, device: torch.device
                    ) -> tuple[Any, int, int]:
    """The candidates `docs` (index positions, ascending) as a full-precision
    `PreparedRoutingIndex` of their own, with the whole index's tie-breaks and bank tables
    (so its sort keys and selections are those of the whole index). Returns (it, chunks
    read, bytes read)."""
    from ..kernels.routing import PreparedRoutingIndex

    prep = index.prepared
    start, stop = prep.doc_start[docs], prep.doc_start[docs + 1]
    # Runs of neighbouring documents read as one range (tensor ops: thousands of them).
    first = torch.ones_like(docs, dtype=torch.bool)
    first[1:] = docs[1:] != docs[:-1] + 1
    last = torch.ones_like(first)
    last[:-1] = first[1:]
    ranges = list(zip(start[first].tolist(), stop[last].tolist(), strict=True))
    kv, d = index.keys.values.shape[1:]
    keys = (index.exact(ranges) if ranges
            else torch.empty(0, kv, d, dtype=index.model_dtype))
    keys = keys.to(device=device, dtype=index.model_dtype).contiguous()
    if index.normalize:  # as the load normalised them: on the device, the same bits
        keys = normalized_keys(keys)
    counts = (stop - start).to(device)
    doc_start = torch.zeros(docs.numel() + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=doc_start[1:])
    chunk_doc = torch.repeat_interleave(torch.arange(docs.numel(), device=device), counts)
    layout = index.layout
    bank_ids = layout.doc_ids if layout.bank_doc_ids is None else layout.bank_doc_ids
    sub = RoutingIndex(keys, chunk_doc, layout.doc_ids[docs.to(layout.doc_ids.device)],
                       bank_doc_ids=bank_ids, bank_doc_start=prep.bank_doc_start)
    return (PreparedRoutingIndex(index=sub, keys=keys, doc_start=doc_start,
                                 tiebreak=prep.tiebreak[docs.to(prep.tiebreak.device)],
                                 ids_by_tiebreak=prep.ids_by_tiebreak,
                                 positions_by_tiebreak=prep.positions_by_tiebreak,
                                 bank_doc_start=prep.bank_doc_start,
                                 bank_live=prep.bank_live),
            keys.shape[0], keys.numel() * keys.element_size())


def bounded_candidates(qr_all: torch.Tensor, cu: list[int], index: CompressedRoutingIndex,
                       msa: MSAParams, ks: list[int], kernel: bool,
                       integer: bool | None = None) -> torch.Tensor:
    """[n] bool: the documents the exact re-score must see (the bounded pass, all on the
    device; nothing waits for it). `integer`: multiply int8 queries (None: wherever the
    kernels run over an int8 index)."""
    from ..kernels.routing import INT_DOT_MIN_DIM

    usable = index.keys.shared_scale and index.keys.values.shape[2] >= INT_DOT_MIN_DIM
    if integer is None:
        integer = kernel and usable
    elif integer and not usable:
        raise ValueError("int8 queries need int8 keys with one scale per chunk and a head_dim "
                         f"of at least {INT_DOT_MIN_DIM}")
    kv = index.keys.values.shape[1]
    if kernel:  # (the bounds of the queries come from the kernels: `fused_intervals`)
        return fused_candidates(kernel_queries(qr_all, cu, kv, msa, index.model_dtype,
                                               integer), index, msa, ks)
    queries = bound_queries(qr_all, cu, kv, msa, None)
    lo, hi = widened(queries, index, *chunk_bounds(queries, index.keys, msa.query_reduce))
    return candidates(*document_bounds(index, msa, lo, hi), ks, index.layout.live,
                      index.prepared.live_documents)


def gamma(queries: BoundQueries, index: CompressedRoutingIndex) -> float:
    """γ of the module docstring's floating-point margin."""
    return ((index.keys.values.shape[2] + queries.num_heads + 8) * DOT_UNIT
            + (queries.num_tokens + index.max_doc_chunks + 8) * SUM_UNIT)


def query_error(queries: BoundQueries, num_kv_heads: int, query_reduce: str) -> torch.Tensor:
    """μ [R] of the module docstring (zeros without int8 queries)."""
    if queries.integer is None:
        return torch.zeros(len(queries.cu) - 1, dtype=torch.float32, device=queries.q.device)
    mu = query_norms(queries, num_kv_heads, query_reduce, queries.integer.error)
    return mu.amax(-1) if queries.head_max else mu.sum(-1)


def fused_intervals(queries: BoundQueries, index: CompressedRoutingIndex, query_reduce: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`widened(chunk_bounds(...))` on the kernels (`queries` of the kernel path): the query
    side in two launches (`kernels/routing_bounds.py`), then one pass of the chunk-score
    kernel storing the intervals. (lower, upper), [R, C] each."""
    from ..kernels.routing import launch_chunk_scores
    from ..kernels.routing_bounds import bound_rows, request_bounds

    keys = index.keys
    norms, ints = bound_rows(queries.kernel_q, queries.int8)
    n, extra = request_bounds(norms, ints, queries.cu, keys.values.shape[1], queries.head_max,
                              query_reduce == "mean", 2 * gamma(queries, index))
    return launch_chunk_scores(queries.kernel_q, queries.cu, queries.head_max,
                               query_reduce == "mean", keys.values, keys.scale, integer=ints,
                               bounds=(keys.residual, keys.magnitude, n, extra))


def fused_candidates(queries: BoundQueries, index: CompressedRoutingIndex, msa: MSAParams,
                     ks: list[int]) -> torch.Tensor:
    """`bounded_candidates` on the kernels: `fused_intervals`, the document kernel's top
    keys of the lower bounds (the k-th is τ), and the candidate test of the upper bounds."""
    from ..kernels.routing import candidate_documents, top_document_keys

    n = index.prepared.live_documents
    if not n:
        return torch.zeros(index.num_documents, dtype=torch.bool,
                           device=index.keys.values.device)
    lo, hi = fused_intervals(queries, index, msa.query_reduce)
    ks = [min(k, n) for k in ks]
    top = top_document_keys(lo, index.prepared, msa, max(ks))
    return candidate_documents(hi, top, ks, index.prepared, msa).any(0)


def route_compressed(qr_all: torch.Tensor, cu_tokens, index: CompressedRoutingIndex,
                     msa: MSAParams, top_k, exchange: Any = None, keys_only: bool = False,
                     integer: bool | None = None) -> Any:
    """Routing of R requests over a compressed index, exactly as the full-precision index
    routes them: the kernels' `RoutedBatch` (`keys_only`, where the kernels run) or one
    `Selection` per request (`kernels.routing.route_batched`'s contract). `integer`: as
    `bounded_candidates` (the tests force both ways)."""
    from ..kernels.routing import (
        KernelConfig,
        _token_ranges,
        _top_ks,
        document_block,
        kernel_supported,
        route_batched,
        route_batched_keys,
        triton,
    )

    cu = _token_ranges(cu_tokens, qr_all.shape[0])
    ks = _top_ks(top_k, len(cu) - 1)
    device = index.keys.values.device
    kv, d = index.keys.values.shape[1:]
    probe = torch.empty(0, kv, d, dtype=index.model_dtype, device=device)
    kernel = kernel_supported(qr_all, probe)
    docs = bounded_candidates(qr_all, cu, index, msa, ks, kernel, integer).nonzero().flatten()
    started = time.perf_counter()
    sub, chunks, nbytes = candidate_index(index, docs, device)
    index.stats.add(len(ks), index.num_documents, int(docs.numel()), chunks, nbytes,
                    time.perf_counter() - started)
    config = None
    if kernel:  # the whole index's document blocks: the variants warm-up compiled
        n = index.num_documents
        top = triton.next_power_of_2(max(1, min(max(ks), index.prepared.num_bank_documents,
                                                n)))
        config = KernelConfig(block_n=document_block(max(n, 1), top))
    if kernel and keys_only:
        return route_batched_keys(qr_all, cu, sub, msa, ks, config, exchange)
    return route_batched(qr_all, cu, sub, msa, ks, config, exchange)
