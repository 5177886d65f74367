"""The MSA prompt layout (msa-spec §2–3): template head, routing span, tail, response head.

A question becomes `[template head] + [routing span] + [template tail] + [response head]`:
`<|im_start|>user\\n`, then the routing text (the question between the two instructions the
model was trained with), then `<|im_end|>\\n<|im_start|>`. Each part is tokenized on its own,
as the reference engine does, so the token boundaries are the trained ones.

The routing span needs no side channel: it is the token range after the *last* occurrence of
the template head up to the next `<|im_end|>`. `find_routing_span` implements that rule; the
front end applies it to every request that uses a bank (chat completions included, where the
span is the content of the last user message) and records the result in the request.
"""

from __future__ import annotations

from typing import Any

# The chat-template tokens before the user text (Qwen3 instruct): computed alone, stored once
# per bank, attended by every later token.
TEMPLATE_HEAD = "<|im_start|>user\n"
TEMPLATE_TAIL = "<|im_end|>\n"
RESPONSE_HEAD = "<|im_start|>"
SPAN_END_TOKEN = "<|im_end|>"
ROUTING_PREFIX = (
    "\nPlease answer the question based on the above historical document information\n\n"
)
ROUTING_SUFFIX = "\nPlease return all documents related to the question\n"


def document_text(doc_id: int, text: str) -> str:
    """A bank document as stage 1 encodes it; tokenized without special tokens added."""
    return f"<|im_start|>[{doc_id}]. {text}[{doc_id}]<|im_end|>"


def routing_text(question: str) -> str:
    """The routing span's text for a question (msa-spec §3)."""
    return ROUTING_PREFIX + question + ROUTING_SUFFIX


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def build_prompt(tokenizer: Any, question: str) -> dict[str, Any]:
    """A vLLM `TokensPrompt` for `question`, laid out as msa-spec §3.

    Pass it to `LLM.generate` with `SamplingParams(extra_args={"msa_bank": ...})`; the front
    end finds the routing span in it (see `find_routing_span`).
    """
    head = _encode(tokenizer, TEMPLATE_HEAD)
    span = _encode(tokenizer, routing_text(question))
    tail = _encode(tokenizer, TEMPLATE_TAIL) + _encode(tokenizer, RESPONSE_HEAD)
    return {"prompt_token_ids": head + span + tail}


def find_routing_span(
    token_ids: list[int], template_ids: list[int], end_id: int
) -> tuple[int, int]:
    """[start, end) of the routing span in a prompt, by the rule in this module's docstring.

    Raises ValueError (with the reason) when the prompt does not start with the template head
    or has no non-empty span closed by `<|im_end|>`.
    """
    n = len(template_ids)
    if list(token_ids[:n]) != list(template_ids):
        raise ValueError(
            "the prompt does not start with the MSA template head "
            f"{TEMPLATE_HEAD!r} (tokens {template_ids}); build it with "
            "vllm_msa.prompt.build_prompt, or send a chat whose first message is the user's"
        )
    start = n
    for i in range(len(token_ids) - n, n - 1, -1):
        if list(token_ids[i : i + n]) == list(template_ids):
            start = i + n
            break
    try:
        end = list(token_ids).index(end_id, start)
    except ValueError:
        raise ValueError(
            f"the prompt has no routing span: no {SPAN_END_TOKEN} after the template head"
        ) from None
    if end == start:
        raise ValueError("the prompt's routing span (the user text) is empty")
    return start, end
