"""The MSA prompt layout (msa-spec §2–3): template head and how documents are wrapped."""

from __future__ import annotations

# The chat-template tokens before the user text (Qwen3 instruct): computed alone, stored once
# per bank, attended by every later token.
TEMPLATE_HEAD = "<|im_start|>user\n"


def document_text(doc_id: int, text: str) -> str:
    """A bank document as stage 1 encodes it; tokenized without special tokens added."""
    return f"<|im_start|>[{doc_id}]. {text}[{doc_id}]<|im_end|>"
