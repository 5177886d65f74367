"""Self-test of the stage-2 reference (tests/msa_reference.py): CPU only, no vLLM engine."""

from __future__ import annotations

import pytest
import torch
from msa_reference import msa_attention, reference_answer, select_top_k
from reference import ReferenceMSA

T = 3  # template head length
VARIANTS = {
    "decouple": {},  # GQA 4/2, router layers 2,3, INFONCE_DECOUPLE (dot scores), pooling 4
    "no-decouple-infonce": {"router_layers": "1,3", "pooling": 3, "decouple_router": False,
                            "aux_loss_method": "INFONCE", "seed": 2},
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def ref(request, checkpoints) -> ReferenceMSA:
    return ReferenceMSA(checkpoints(**VARIANTS[request.param]))


def _ids(gen: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=gen).tolist()


def _request(ref: ReferenceMSA, n_docs: int, seed: int = 0):
    """A prompt (template head + span of 9 + tail of 3) and a bank of n_docs small documents."""
    gen, vocab = torch.Generator().manual_seed(seed), ref.cfg["vocab_size"]
    prompt = _ids(gen, T + 12, vocab)
    docs = [(10 + 3 * i, _ids(gen, 5 + 2 * i, vocab)) for i in range(n_docs)]
    return prompt, (T, T + 9), docs


def _lse_attention(q, k, v, mask):
    """Masked attention returning (out [n,h,d], lse [n,h]); GQA by repeat."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    logits = torch.einsum("qhd,khd->qhk", q, k) / q.shape[-1] ** 0.5
    logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.einsum("qhk,khd->qhd", logits.softmax(-1), v), logits.logsumexp(-1)


def test_literal_attention_equals_lse_merge():
    gen = torch.Generator().manual_seed(0)
    n, m, heads, kv_heads, d = 9, 5, 4, 2, 8
    q = torch.randn(n, heads, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(n, kv_heads, d, generator=gen, dtype=torch.float64) for _ in range(2))
    mk, mv = (torch.randn(m, kv_heads, d, generator=gen, dtype=torch.float64) for _ in range(2))
    got = msa_attention(q, k, v, mk, mv, T, d**-0.5)

    causal = torch.ones(n, n, dtype=torch.bool).tril()
    local, local_lse = _lse_attention(q, k, v, causal)
    memory, mem_lse = _lse_attention(q[T:], mk, mv, torch.ones(n - T, m, dtype=torch.bool))
    lse = torch.logaddexp(local_lse[T:], mem_lse)
    merged = (local[T:] * (local_lse[T:] - lse).exp()[..., None]
              + memory * (mem_lse - lse).exp()[..., None])
    torch.testing.assert_close(got[T:], merged, rtol=0, atol=1e-12)
    torch.testing.assert_close(got[:T], local[:T], rtol=0, atol=1e-12)  # template: local only
    torch.testing.assert_close(msa_attention(q, k, v, None, None, T, d**-0.5), local,
                               rtol=0, atol=1e-12)


def test_top_k_ties_smaller_id_first():
    scores = {5: 1.0, 2: 1.0, 7: 0.5, 1: 1.0, 3: 2.0}
    assert select_top_k(scores, 3) == [1, 2, 3]
    assert select_top_k(scores, 2) == [1, 3]
    assert select_top_k(scores, 9) == [1, 2, 3, 5, 7]
    assert select_top_k(scores, 0) == []


def test_no_bank_path_is_plain_qwen3(ref):
    prompt, _, _ = _request(ref, 0)
    ans = reference_answer(ref, prompt, (T, T + 9), None, top_k=4, rope_offset_k=4,
                           template_len=T, max_tokens=4)
    assert ans.selections == {} and len(ans.tokens) == len(ans.logprobs) == 4
    for i, (token, row) in enumerate(zip(ans.tokens, ans.logprobs, strict=True)):
        logits = ref.run(prompt + ans.tokens[:i])["logits"][-1]
        torch.testing.assert_close(row, logits.log_softmax(-1), rtol=0, atol=1e-10)
        assert token == int(logits.argmax())


def test_empty_memory_without_offset_equals_no_bank(ref):
    prompt, span, _ = _request(ref, 0)
    kw = {"top_k": 4, "template_len": T, "max_tokens": 3}
    plain = reference_answer(ref, prompt, span, None, rope_offset_k=0, **kw)
    empty = reference_answer(ref, prompt, span, [], rope_offset_k=0, **kw)
    assert empty.selections == {layer: [] for layer in ref.router_layers}
    assert empty.tokens == plain.tokens
    torch.testing.assert_close(torch.stack(empty.logprobs), torch.stack(plain.logprobs),
                               rtol=0, atol=1e-12)
    shifted = reference_answer(ref, prompt, span, [], rope_offset_k=4, **kw)
    assert not torch.allclose(shifted.logprobs[0], plain.logprobs[0])  # the offset matters


@pytest.mark.parametrize("top_k", [0, 2, 3, 5])
def test_selection_count_order_and_scores(ref, top_k):
    prompt, span, docs = _request(ref, 3, seed=1)
    ans = reference_answer(ref, prompt, span, docs, top_k=top_k, rope_offset_k=4,
                           template_len=T, max_tokens=1)
    assert sorted(ans.selections) == ref.router_layers
    for layer, chosen in ans.selections.items():
        assert len(chosen) == min(top_k, len(docs))
        assert chosen == sorted(chosen) and set(chosen) <= {d for d, _ in docs}
        assert len(ans.scores[layer]) == len(chosen)


def test_memory_changes_the_output_and_cosine_scores_are_bounded(ref):
    prompt, span, docs = _request(ref, 3, seed=2)
    kw = {"rope_offset_k": 4, "template_len": T, "max_tokens": 1}
    none = reference_answer(ref, prompt, span, docs, top_k=0, **kw)
    full = reference_answer(ref, prompt, span, docs, top_k=3, **kw)
    assert not torch.allclose(none.logprobs[0], full.logprobs[0])
    cos = reference_answer(ref, prompt, span, docs, top_k=3, score="cosine", **kw)
    assert all(abs(s) <= 1 + 1e-12 for scores in cos.scores.values() for s in scores)


def test_scores_agree_with_selection_and_reductions(ref):
    prompt, span, docs = _request(ref, 4, seed=3)
    kw = {"rope_offset_k": 4, "template_len": T, "max_tokens": 0}
    full = reference_answer(ref, prompt, span, docs, top_k=4, **kw)
    best = reference_answer(ref, prompt, span, docs, top_k=1, **kw)
    # Only the first router layer: later layers' inputs depend on the earlier selections.
    first = ref.router_layers[0]
    by_doc = dict(zip(full.selections[first], full.scores[first], strict=True))
    top = max(by_doc.values())
    assert best.selections[first] == [min(d for d, s in by_doc.items() if s == top)]
    assert best.scores[first] == [top]
    # Max over tokens / heads / chunks bounds mean over them, document by document (top_k = all
    # docs, so every layer's memory, hence its input, is the same across these runs).
    for option in ("query_reduce", "head_reduce", "chunk_reduce"):
        mean = reference_answer(ref, prompt, span, docs, top_k=4, **{option: "mean"}, **kw)
        high = reference_answer(ref, prompt, span, docs, top_k=4, **{option: "max"}, **kw)
        for layer in full.selections:
            assert all(h >= m - 1e-12 for h, m in
                       zip(high.scores[layer], mean.scores[layer], strict=True))
