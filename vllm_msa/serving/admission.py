"""Front-end admission of MSA requests: validate their options, find their routing span.

Runs where vLLM turns a prompt into an engine request (the `LLM` process, or `vllm serve`'s
API server), so a bad request fails there — a ValueError, which the OpenAI server answers
with HTTP 400 — and never reaches the engine. An admitted request carries its resolved options
in `extra_args` (see `RequestOptions`) and a cache salt of its own: its KV after the template
head depends on its selection, so no other request may reuse its prefix-cache blocks.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from ..attention.capture import ENCODE_KEY
from ..bank.reader import MemoryBank
from ..config import MSAParams
from ..options import (
    MSARequestError,
    RequestOptions,
    ServingConfig,
    parse_bool,
    parse_routing,
    parse_top_k,
    requested_bank,
)
from ..prompt import SPAN_END_TOKEN, find_routing_span


@dataclass(frozen=True)
class BankFacts:
    num_documents: int
    template_ids: list[int]


class Admission:
    def __init__(self, vllm_config: Any, banks: dict[str, MemoryBank]) -> None:
        model_config = vllm_config.model_config
        self.serving = ServingConfig.from_additional_config(vllm_config.additional_config)
        self.msa = MSAParams.from_hf_config(model_config.hf_config)
        self.default_top_k = self.serving.configured_top_k(self.msa)
        self.banks = {name: BankFacts(b.num_documents, b.template_ids)
                      for name, b in banks.items()}
        self.opened = dict(banks)  # document texts, for Memory Interleave's appends
        scheduler = vllm_config.scheduler_config
        budget = scheduler.max_num_batched_tokens
        if scheduler.long_prefill_token_threshold and scheduler.long_prefill_token_threshold > 0:
            budget = min(budget, scheduler.long_prefill_token_threshold)
        self.step_budget = budget
        self._end_id: int | None = None

    def end_id(self, tokenizer: Any) -> int:
        if self._end_id is None:
            if tokenizer is None:
                raise MSARequestError("MSA requests need the model's tokenizer "
                                      "(the engine was started with skip_tokenizer_init)")
            self._end_id = int(tokenizer.convert_tokens_to_ids(SPAN_END_TOKEN))
        return self._end_id

    def admit(self, request: Any, tokenizer: Any) -> None:
        """Validate and resolve an `EngineCoreRequest`'s MSA options in place."""
        params = request.sampling_params
        if params is None:
            return
        extra = dict(params.extra_args or {})
        if ENCODE_KEY in extra:
            self.admit_encode(request, extra)
            return
        bank = requested_bank(extra, self.serving)
        if bank is None:
            stray = sorted(k for k in extra if k.startswith("msa_") and k != "msa_bank")
            if stray:
                raise MSARequestError(f"{', '.join(stray)} given but the request uses no "
                                      "bank (set msa_bank or the server's default_bank)")
            return
        facts = self.banks[bank]
        top_k = parse_top_k(extra, min(self.default_top_k, facts.num_documents),
                            facts.num_documents)
        return_selection = parse_bool(extra, "msa_return_selection")
        prompt = list(request.prompt_token_ids or [])
        template = facts.template_ids
        ranges = parse_routing(extra, len(template), len(prompt))
        if ranges is not None and prompt[: len(template)] != list(template):
            raise MSARequestError("the prompt does not start with the MSA template head")
        if ranges is None:
            try:
                ranges = (find_routing_span(prompt, template, self.end_id(tokenizer)),)
            except ValueError as e:
                raise MSARequestError(str(e)) from None
        end = ranges[-1][1]
        if end > self.step_budget:
            raise MSARequestError(
                f"the routing span ends at token {end}, but the engine schedules at most "
                f"{self.step_budget} tokens per step and routing needs every token up to the "
                "span's end in one step; shorten the question or raise "
                "--max-num-batched-tokens")
        options = RequestOptions(bank, top_k, ranges, return_selection)
        extra.update(options.to_extra_args())
        params.extra_args = extra
        request.cache_salt = f"{request.cache_salt or ''}|msa:{uuid.uuid4().hex}"

    def admit_encode(self, request: Any, extra: dict[str, Any]) -> None:
        """A document of a live add, encoded by this engine (`serving/encode.py`): only that
        module makes these (its nonce), for a served bank, with no other MSA option."""
        from .encode import is_ours

        value = extra[ENCODE_KEY]
        if not is_ours(value):
            raise MSARequestError(f"{ENCODE_KEY} is reserved for the server's bank edits")
        others = sorted(k for k in extra if k.startswith("msa_") and k != ENCODE_KEY)
        if others or value.get("bank") not in self.banks:
            raise MSARequestError(f"an encode request names a served bank and no other MSA "
                                  f"option (got {value.get('bank')!r}, {others})")
        # Its own prefix-cache blocks: every position must be computed (and captured).
        request.cache_salt = f"{request.cache_salt or ''}|msa-encode:{uuid.uuid4().hex}"

    def refresh(self, name: str, bank: MemoryBank) -> None:
        """Admit requests over `bank`, the generation of served bank `name` the workers now
        route over (a live edit): its document count, and its texts for Memory Interleave
        (a removed document's text is never appended again)."""
        self.banks[name] = BankFacts(bank.num_documents, bank.template_ids)
        self.opened[name] = bank
