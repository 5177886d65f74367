"""An independent plain-torch float64 implementation of MSA stage 2 + decode, from msa-spec.md §3.

One request, no batching, no caching: every decode step recomputes the whole sequence, and memory
attention is written literally as one softmax over `[template head] + [memory] + [own, causal]`
(the plugin computes it as an LSE merge of two attentions; the reference must not share that
formulation). It reuses ReferenceMSA (tests/reference.py) for weights, Qwen3 pieces and stage 1,
and never imports the code under test.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import torch
from reference import ReferenceMSA

Tensor = torch.Tensor
REDUCTIONS = {"head": ("mean", "max"), "query": ("max", "mean", "last"), "chunk": ("max", "mean")}
SCORE_MODES = ("auto", "cosine", "dot")


@dataclass
class ReferenceAnswer:
    """What the plugin's output is compared with for one request."""

    selections: dict[int, list[int]]  # router layer -> selected doc ids, ascending
    scores: dict[int, list[float]]  # router layer -> document score of each selected id
    tokens: list[int]  # greedily generated token ids
    logprobs: list[Tensor]  # per generated token, the full float64 log-softmax row


@dataclass
class BankLayer:
    """One router layer of an encoded bank: pooled chunks of all documents, in bank order."""

    routing_keys: Tensor  # [chunks, kv_heads, head_dim]
    keys: Tensor
    values: Tensor
    chunk_doc: list[int]  # doc id of each chunk


@dataclass
class RoutingConfig:
    top_k: int
    head_reduce: str = "mean"
    query_reduce: str = "max"
    chunk_reduce: str = "max"
    score: str = "auto"

    def __post_init__(self) -> None:
        for kind, value in (("head", self.head_reduce), ("query", self.query_reduce),
                            ("chunk", self.chunk_reduce)):
            if value not in REDUCTIONS[kind]:
                raise ValueError(f"{kind}_reduce must be one of {REDUCTIONS[kind]}: {value!r}")
        if self.score not in SCORE_MODES:
            raise ValueError(f"score must be one of {SCORE_MODES}: {self.score!r}")


# -- stage 1 bank ------------------------------------------------------------------------------
def encode_bank(ref: ReferenceMSA, docs: list[tuple[int, list[int]]]) -> dict[int, BankLayer]:
    """Pooled K̄/V̄/K̄r per router layer, via ReferenceMSA.encode_document (doc-local RoPE)."""
    ids = [doc_id for doc_id, _ in docs]
    if len(set(ids)) != len(ids):
        raise ValueError("document ids must be unique")
    encoded = [(doc_id, ref.encode_document(tokens)) for doc_id, tokens in docs]
    bank = {}
    for layer in ref.router_layers:
        parts = [enc[layer] for _, enc in encoded]
        empty = torch.zeros(0, ref.kv_heads, ref.head_dim, dtype=torch.float64)
        bank[layer] = BankLayer(
            routing_keys=torch.cat([p["routing_keys"] for p in parts]) if parts else empty,
            keys=torch.cat([p["keys"] for p in parts]) if parts else empty,
            values=torch.cat([p["values"] for p in parts]) if parts else empty,
            chunk_doc=[d for (d, _), p in zip(encoded, parts, strict=True)
                       for _ in range(p["keys"].shape[0])],
        )
    return bank


# -- routing -----------------------------------------------------------------------------------
def _l2(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def chunk_scores(qr: Tensor, routing_keys: Tensor, scale: float, head_reduce: str,
                 query_reduce: str) -> Tensor:
    """S(c) of spec §3: s(t,h,c) = Qr[t,h]·K̄r[c, h // group] * scale, reduced over heads
    then over the routing-span tokens. qr: [t, heads, d]; routing_keys: [c, kv_heads, d]."""
    group = qr.shape[1] // routing_keys.shape[1]
    keys = routing_keys.repeat_interleave(group, 1)  # [c, heads, d]
    s = torch.einsum("thd,chd->thc", qr, keys) * scale
    s = s.mean(1) if head_reduce == "mean" else s.amax(1)  # [t, c]
    if query_reduce == "last":
        return s[-1]
    return s.mean(0) if query_reduce == "mean" else s.amax(0)


def document_scores(chunk_s: Tensor, chunk_doc: list[int], chunk_reduce: str) -> dict[int, float]:
    """Document score = max (or mean) of its chunks' S(c)."""
    per_doc: dict[int, list[Tensor]] = {}
    for s, doc in zip(chunk_s, chunk_doc, strict=True):
        per_doc.setdefault(doc, []).append(s)
    reduce = (lambda t: t.max()) if chunk_reduce == "max" else (lambda t: t.mean())
    return {doc: float(reduce(torch.stack(v))) for doc, v in per_doc.items()}


def select_top_k(doc_scores: dict[int, float], top_k: int) -> list[int]:
    """Top-k doc ids by score (all if fewer), ties -> smaller id first; returned ascending."""
    ranked = sorted(doc_scores, key=lambda doc: (-doc_scores[doc], doc))
    return sorted(ranked[: max(top_k, 0)])


def routing_scale(ref: ReferenceMSA, mode: str) -> float:
    """head_dim^-0.5, except cosine scores (INFONCE + decouple, or mode 'cosine'): 1.0."""
    if mode == "cosine" or (mode == "auto" and ref.infonce and ref.decouple):
        return 1.0
    return ref.head_dim**-0.5


# -- attention ---------------------------------------------------------------------------------
def msa_attention(q: Tensor, k: Tensor, v: Tensor, mem_k: Tensor | None, mem_v: Tensor | None,
                  template_len: int, scale: float) -> Tensor:
    """Literal spec §3 attention: one softmax per query over the concatenation
    [template head K/V] + [memory K̄/V̄, all visible] + [own K/V, causal].

    q: [n, heads, d]; k, v: [n, kv_heads, d] (the request's own tokens, template head first);
    mem_k, mem_v: [m, kv_heads, d] or None. Rows < template_len see only themselves, causally.
    Returns [n, heads, d].
    """
    n, t = q.shape[0], template_len
    if mem_k is None:
        mem_k = mem_v = k.new_zeros(0, *k.shape[1:])
    m = mem_k.shape[0]
    keys = torch.cat([k[:t], mem_k, k[t:]])
    values = torch.cat([v[:t], mem_v, v[t:]])
    own_index = torch.cat([torch.arange(t), torch.full((m,), -1), torch.arange(t, n)])
    rows = torch.arange(n)[:, None]
    is_mem = (own_index == -1)[None]
    visible = torch.where(is_mem, rows >= t, own_index[None] <= rows)  # [n, t + m + n - t]
    mask = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, float("-inf"))
    group = q.shape[1] // k.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    logits = torch.einsum("qhd,khd->hqk", q, keys) * scale + mask
    return torch.einsum("hqk,khd->qhd", logits.softmax(-1), values)


# -- forward -----------------------------------------------------------------------------------
@dataclass
class _Request:
    """One request's routing state: selection is made on the first forward, then kept."""

    ref: ReferenceMSA
    bank: dict[int, BankLayer] | None
    span: list[tuple[int, int]]  # routing token ranges, in order
    routing: RoutingConfig | None
    selections: dict[int, list[int]] = field(default_factory=dict)
    scores: dict[int, list[float]] = field(default_factory=dict)

    def memory(self, layer: int, x: Tensor, q: Tensor) -> tuple[Tensor, Tensor] | None:
        """Selected pooled K̄/V̄ of this router layer (routing on first call)."""
        if self.bank is None or layer not in self.bank:
            return None
        if layer not in self.selections:
            self._route(layer, x, q)
        bl, chosen = self.bank[layer], set(self.selections[layer])
        idx = [i for i, _ in sorted(((i, d) for i, d in enumerate(bl.chunk_doc) if d in chosen),
                                    key=lambda p: (p[1], p[0]))]
        index = torch.tensor(idx, dtype=torch.long)
        return bl.keys[index], bl.values[index]

    def _route(self, layer: int, x: Tensor, q: Tensor) -> None:
        ref, cfg, bl = self.ref, self.routing, self.bank[layer]
        rows = torch.tensor([i for lo, hi in self.span for i in range(lo, hi)])
        if ref.decouple:
            w = ref.w[f"model.layers.{layer}.self_attn.router_q_proj.0.weight"]
            qr = (x[rows] @ w.T).view(len(rows), ref.heads, ref.head_dim)
        else:
            qr = q[rows]
        keys = bl.routing_keys
        if cfg.score == "cosine":
            qr, keys = _l2(qr), _l2(keys)
        elif cfg.score == "auto" and ref.infonce:
            qr = _l2(qr)
        if bl.keys.shape[0] == 0 or cfg.top_k <= 0:
            self.selections[layer], self.scores[layer] = [], []
            return
        s = chunk_scores(qr, keys, routing_scale(ref, cfg.score), cfg.head_reduce,
                         cfg.query_reduce)
        doc_s = document_scores(s, bl.chunk_doc, cfg.chunk_reduce)
        chosen = select_top_k(doc_s, cfg.top_k)
        self.selections[layer], self.scores[layer] = chosen, [doc_s[d] for d in chosen]


def request_positions(n: int, template_len: int, rope_offset_k: int) -> Tensor:
    """Template head at 0..T-1; every later token (prompt and generated) at i + k."""
    pos = torch.arange(n)
    return torch.where(pos < template_len, pos, pos + rope_offset_k)


def lm_head(ref: ReferenceMSA) -> Tensor:
    """The embedding when tie_word_embeddings (as vLLM does), else lm_head.weight.

    ReferenceMSA.run always reads lm_head.weight; tiny checkpoints are untied, so both agree."""
    if ref.cfg.get("tie_word_embeddings", False) or "lm_head.weight" not in ref.w:
        return ref.w["model.embed_tokens.weight"]
    return ref.w["lm_head.weight"]


def forward_logits(ref: ReferenceMSA, token_ids: list[int], positions: Tensor,
                   template_len: int, request: _Request | None) -> Tensor:
    """Qwen3 forward in float64 with MSA memory attention in router layers; [n, vocab]."""
    w, n, d = ref.w, len(token_ids), ref.head_dim
    h = w["model.embed_tokens.weight"][torch.tensor(token_ids)]
    for layer in range(ref.num_layers):
        p = f"model.layers.{layer}"
        x = ref._rms(h, w[f"{p}.input_layernorm.weight"])
        q = (x @ w[f"{p}.self_attn.q_proj.weight"].T).view(n, ref.heads, d)
        k = (x @ w[f"{p}.self_attn.k_proj.weight"].T).view(n, ref.kv_heads, d)
        v = (x @ w[f"{p}.self_attn.v_proj.weight"].T).view(n, ref.kv_heads, d)
        q = ref._rope(ref._rms(q, w[f"{p}.self_attn.q_norm.weight"]), positions)
        k = ref._rope(ref._rms(k, w[f"{p}.self_attn.k_norm.weight"]), positions)
        mem = request.memory(layer, x, q) if request is not None else None
        mem_k, mem_v = mem if mem is not None else (None, None)
        attn = msa_attention(q, k, v, mem_k, mem_v, template_len, d**-0.5).reshape(n, -1)
        h = h + attn @ w[f"{p}.self_attn.o_proj.weight"].T
        x = ref._rms(h, w[f"{p}.post_attention_layernorm.weight"])
        gate = torch.nn.functional.silu(x @ w[f"{p}.mlp.gate_proj.weight"].T)
        h = h + (gate * (x @ w[f"{p}.mlp.up_proj.weight"].T)) @ w[f"{p}.mlp.down_proj.weight"].T
    return ref._rms(h, w["model.norm.weight"]) @ lm_head(ref).T


# -- public entry point ------------------------------------------------------------------------
def reference_answer(ref: ReferenceMSA, prompt_ids: list[int],
                     span: tuple[int, int] | list[tuple[int, int]],
                     docs: list[tuple[int, list[int]]] | None, *, top_k: int,
                     rope_offset_k: int, template_len: int, max_tokens: int,
                     head_reduce: str = "mean", query_reduce: str = "max",
                     chunk_reduce: str = "max", score: str = "auto",
                     forced: list[int] | None = None,
                     memory_kv: dict[int, tuple[Tensor, Tensor]] | None = None,
                     memory: dict[int, BankLayer] | None = None) -> ReferenceAnswer:
    """Selections, scores, greedy tokens and logprobs of one request (spec §3).

    `span` is the routing span [lo, hi) or a list of such ranges (their tokens, in order, form
    the routing query). docs=None is the plugin's no-bank path: plain causal Qwen3 at
    positions 0..n-1, no offset. docs=[] or top_k=0 keeps the MSA layout (offset positions)
    with an empty memory. `forced` replaces the greedy choice by these tokens (logprobs are
    still the model's), for outputs scripted through the engine. `memory_kv` replaces the
    pooled K̄/V̄ attended to (per router layer, [chunks, kv, hd] in bank order; e.g. an FP8
    bank's stored values), while routing keeps the reference's own routing keys. `memory`
    replaces the encoded bank altogether (a synthetic bank's tensors; `docs` is then unused).
    """
    ranges = [tuple(span)] if isinstance(span[0], int) else [tuple(r) for r in span]
    if docs is None:
        request, template_len, rope_offset_k = None, 0, 0
    else:
        bounds = [template_len, *(x for r in ranges for x in r), len(prompt_ids)]
        if any(b < a for a, b in itertools.pairwise(bounds)) or any(a == b for a, b in ranges):
            raise ValueError(f"bad span {span} for template_len {template_len}")
        routing = RoutingConfig(top_k, head_reduce, query_reduce, chunk_reduce, score)
        bank = dict(memory) if memory is not None else encode_bank(ref, docs)
        for layer, (keys, values) in (memory_kv or {}).items():
            assert keys.shape == bank[layer].keys.shape, (layer, keys.shape)
            bank[layer] = replace(bank[layer], keys=keys.double(), values=values.double())
        request = _Request(ref, bank, ranges, routing)
    tokens = list(prompt_ids)
    generated, logprobs = [], []
    for step in range(max_tokens):
        positions = request_positions(len(tokens), template_len, rope_offset_k)
        row = forward_logits(ref, tokens, positions, template_len, request)[-1]
        logprobs.append(row.log_softmax(-1))
        generated.append(int(row.argmax()) if forced is None else forced[step])
        tokens.append(generated[-1])
    if request is not None and max_tokens == 0:  # still route, so selections are reported
        positions = request_positions(len(tokens), template_len, rope_offset_k)
        forward_logits(ref, tokens, positions, template_len, request)
    selections = request.selections if request is not None else {}
    scores = request.scores if request is not None else {}
    return ReferenceAnswer(dict(selections), dict(scores), generated, logprobs)
