"""What both Memory Interleave drivers need from an engine: its banks' texts, its limits, and
the `SamplingParams` of each step."""

from __future__ import annotations

from typing import Any

from ..options import MSARequestError, parse_top_k
from .protocol import Conversation, EngineFacts, InterleaveLimits, ProtocolTokens, StepRequest


class InterleaveSession:
    """Memory Interleave over one engine (an `LLM`'s or the server's), built from its config."""

    def __init__(self, vllm_config: Any, tokenizer: Any) -> None:
        from ..patches.input_processor import admission_for

        admission = admission_for(vllm_config)
        if admission is None:
            raise MSARequestError("Memory Interleave needs an MSA engine with banks "
                                  '(additional_config={"msa": {"banks": ...}})')
        self.admission = admission
        self.tokenizer = tokenizer
        self.markers = ProtocolTokens.of(tokenizer)
        self.facts = EngineFacts(admission.step_budget,
                                 vllm_config.model_config.max_model_len)

    def resolve_bank(self, bank: str | None) -> str:
        name = bank if bank is not None else self.admission.serving.default_bank
        if name is None:
            raise MSARequestError("Memory Interleave needs a bank: name one, or start the "
                                  "engine with a default_bank")
        if name not in self.admission.opened:
            known = ", ".join(sorted(self.admission.opened))
            raise MSARequestError(f"unknown bank {name!r} (banks: {known})")
        return name

    def check_top_k(self, bank: str, top_k: int | None) -> None:
        if top_k is not None:
            parse_top_k({"msa_top_k": top_k}, top_k, self.admission.banks[bank].num_documents)

    def conversation(self, question: str, bank: str, limits: InterleaveLimits
                     ) -> Conversation:
        if not isinstance(question, str) or not question.strip():
            raise MSARequestError("the question must be a non-empty string")
        texts = self.admission.opened[bank]

        def document_text(doc_id: int) -> str | None:
            try:
                return texts.text(doc_id)
            except KeyError:
                return None

        return Conversation(question, self.tokenizer, document_text, limits, self.facts,
                            self.markers)

    @staticmethod
    def sampling_params(request: StepRequest, base: Any, bank: str, top_k: int | None,
                        output_kind: Any) -> Any:
        """A step's `SamplingParams`: the caller's sampling settings (`base`: temperature,
        top-p/k, penalties, seed, logprobs, `extra_args`) with the loop's length, stops and
        MSA options."""
        from vllm import SamplingParams

        extra = dict(base.extra_args or {})
        extra.update({"msa_bank": bank, "msa_routing": [list(r) for r in request.routing],
                      "msa_return_selection": True})
        if top_k is not None:
            extra["msa_top_k"] = top_k
        kept = {name: getattr(base, name) for name in _SAMPLING_FIELDS}
        return SamplingParams(**kept, max_tokens=request.max_tokens,
                              skip_special_tokens=False, output_kind=output_kind,
                              extra_args=extra, **request.stops)


# What a caller's SamplingParams contributes to every step of the loop.
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                    "frequency_penalty", "repetition_penalty", "logprobs", "logit_bias",
                    "allowed_token_ids", "bad_words")
