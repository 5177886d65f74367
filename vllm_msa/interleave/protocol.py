"""Memory Interleave for one question (msa-spec §4): what each engine request is, and what
follows from its output.

A `Conversation` is a pure state machine over token ids; drivers (offline over `LLM`, and the
HTTP route over the server's engine client) ask it for the next request, run that request on
the engine, and hand back the output. The rules, in the order the model meets them:

- Round 1 is the MSA prompt of `vllm_msa.prompt.build_prompt`, routed on its routing span.
- A retrieval step stops at `<|object_ref_end|>` or `<End-of-Retrieve>`. Every `[n]` the step
  wrote is a requested document id; the distinct ids that are in the bank, ascending, are
  appended as `[n]. {text}\\n...` followed by one `<|object_ref_end|>` (unknown ids dropped,
  a bare delimiter when none is left). The output ended in `<|object_ref_end|>` without an
  answer, so a new round starts and re-routes: its routing query is the question (the routing
  span of round 1 up to and including "Please return all documents related to the question",
  as the reference engine marks it) plus the latest non-empty block of appended texts.
- `<End-of-Retrieve>` appends `<|im_start|>The user's question is: {question}\\n
  <|object_ref_end|>` and the model writes the answer under the same routing (the reference
  continues the same call; here the next request routes on the same ranges, which selects the
  same documents). The answer is the text after "The answer to the question is:".
- A retrieval step that ends any other way is final (the model answered, or stopped).

Bounds (`InterleaveLimits`): retrieval rounds, appended documents, generated tokens in all,
and tokens per retrieval step (the reference's 1000-character guard). Reaching a retrieval
bound stops retrieving: the question turn is appended and the model answers with what it has.
Every appended prompt must also still be routable in one scheduler step and fit the model's
context; if not, retrieval stops the same way (`stopped_by="context"`).

Generated tokens are kept as the model produced them (never re-tokenized from text), and the
appended parts are tokenized on their own, like the prompt's parts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..prompt import ROUTING_PREFIX, TEMPLATE_HEAD, build_prompt, routing_text

RETRIEVAL_END = "<|object_ref_end|>"
END_OF_RETRIEVE = "<End-of-Retrieve>"
ANSWER_MARKER = "The answer to the question is:"
ROUTING_ANCHOR = "Please return all documents related to the question"
DOCUMENT_ID = re.compile(r"\[(\d+)\]")
_TRAILING_SPECIALS = ("<|im_end|>", "<|endoftext|>")


def question_turn(question: str) -> str:
    return f"<|im_start|>The user's question is: {question}\n{RETRIEVAL_END}"


def requested_ids(text: str) -> list[int]:
    """Distinct document ids written as `[n]` in a step's output, ascending."""
    return sorted({int(m) for m in DOCUMENT_ID.findall(text)})


def extract_answer(text: str) -> str | None:
    """The text after the answer marker (None if the model wrote none)."""
    if ANSWER_MARKER not in text:
        return None
    answer = text.split(ANSWER_MARKER, 1)[1]
    for special in _TRAILING_SPECIALS:
        answer = answer.split(special, 1)[0]
    return answer.strip()


@dataclass(frozen=True)
class InterleaveLimits:
    """Bounds of one question's loop (defaults documented in docs/interleave.md)."""

    max_rounds: int = 8  # routings (rounds), the first included
    max_retrieved_docs: int = 32  # documents appended over all rounds
    max_tokens: int = 512  # tokens generated over all steps, the answer included
    max_retrieval_tokens: int = 128  # tokens of one retrieval step without a delimiter

    def __post_init__(self) -> None:
        for name in ("max_rounds", "max_retrieved_docs", "max_tokens", "max_retrieval_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ProtocolTokens:
    """Token ids of the protocol's markers in the model's tokenizer."""

    retrieval_end: int
    end_of_retrieve: list[int]  # one id when the tokenizer has it as a special token

    @classmethod
    def of(cls, tokenizer: Any) -> ProtocolTokens:
        end = _encode(tokenizer, RETRIEVAL_END)
        if len(end) != 1:
            raise ValueError(f"the tokenizer has no {RETRIEVAL_END} token; Memory Interleave "
                             "needs an MSA (Qwen3) tokenizer")
        return cls(end[0], _encode(tokenizer, END_OF_RETRIEVE))

    def stops(self) -> dict[str, Any]:
        """SamplingParams fields that end a retrieval step."""
        if len(self.end_of_retrieve) == 1:
            return {"stop_token_ids": [self.retrieval_end, self.end_of_retrieve[0]]}
        return {"stop_token_ids": [self.retrieval_end], "stop": [END_OF_RETRIEVE],
                "include_stop_str_in_output": True}


@dataclass(frozen=True)
class EngineFacts:
    """What the loop must respect about the engine it drives."""

    routing_budget: int  # tokens one step can hold: the routing span must end within it
    max_model_len: int


@dataclass(frozen=True)
class StepRequest:
    """One engine request of the loop."""

    prompt_token_ids: list[int]
    routing: list[tuple[int, int]]
    max_tokens: int
    phase: str  # "retrieve" | "answer"
    stops: dict[str, Any]


@dataclass
class Step:
    """One engine request and what the loop did with its output."""

    round: int
    phase: str
    prompt_token_ids: list[int]
    routing: list[tuple[int, int]]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    selection: dict[str, Any] | None = None
    outcome: str = ""  # documents | end_of_retrieve | stopped | final
    requested_ids: list[int] = field(default_factory=list)
    doc_ids: list[int] = field(default_factory=list)  # appended, ascending
    unknown_ids: list[int] = field(default_factory=list)
    dropped_ids: list[int] = field(default_factory=list)  # known, over max_retrieved_docs
    logprobs: Any = None  # vLLM's per-token logprobs, when the caller asked for them

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round, "phase": self.phase,
            "prompt_tokens": len(self.prompt_token_ids),
            "routing": [list(r) for r in self.routing],
            "text": self.text, "finish_reason": self.finish_reason, "outcome": self.outcome,
            "requested_ids": self.requested_ids, "doc_ids": self.doc_ids,
            "unknown_ids": self.unknown_ids, "dropped_ids": self.dropped_ids,
            "selection": self.selection,
        }


@dataclass
class InterleaveResult:
    question: str
    answer: str | None
    text: str  # the last step's output
    finish_reason: str | None  # of the last step: "stop" or "length"
    stopped_by: str | None  # the bound that ended retrieval (or the answer) early, if any
    steps: list[Step]
    token_ids: list[int]  # the whole context: prompt, outputs and appended parts
    error: str | None = None

    @property
    def retrieved_doc_ids(self) -> list[int]:
        return [d for step in self.steps for d in step.doc_ids]

    @property
    def usage(self) -> dict[str, int]:
        prompt = sum(len(s.prompt_token_ids) for s in self.steps)
        completion = sum(len(s.token_ids) for s in self.steps)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def to_json(self) -> dict[str, Any]:
        return {
            "question": self.question, "answer": self.answer, "text": self.text,
            "finish_reason": self.finish_reason, "stopped_by": self.stopped_by,
            "retrieved_doc_ids": self.retrieved_doc_ids, "rounds": self.steps[-1].round
            if self.steps else 0, "usage": self.usage, "error": self.error,
            "steps": [s.to_json() for s in self.steps],
        }


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


class Conversation:
    """The Memory Interleave state of one question (see the module docstring)."""

    def __init__(self, question: str, tokenizer: Any, document_text: Callable[[int], str | None],
                 limits: InterleaveLimits, engine: EngineFacts,
                 markers: ProtocolTokens | None = None) -> None:
        self.question = question
        self.tokenizer = tokenizer
        self.document_text = document_text
        self.limits = limits
        self.engine = engine
        self.markers = markers or ProtocolTokens.of(tokenizer)
        self.tokens: list[int] = build_prompt(tokenizer, question)["prompt_token_ids"]
        head = len(_encode(tokenizer, TEMPLATE_HEAD))
        span = _encode(tokenizer, routing_text(question))
        self.question_range = (head, head + _anchor_length(tokenizer, question, span))
        self.routing: list[tuple[int, int]] = [(head, head + len(span))]
        self.latest_block: tuple[int, int] | None = None
        self.round = 1
        self.phase = "retrieve"
        self.steps: list[Step] = []
        self.docs_appended = 0
        self.stopped_by: str | None = None
        self.done = False
        self.final_reason: str | None = None
        self.error: str | None = None

    # ------------------------------------------------------------------ driving
    @property
    def tokens_left(self) -> int:
        return self.limits.max_tokens - sum(len(s.token_ids) for s in self.steps)

    def next_request(self) -> StepRequest | None:
        if self.done:
            return None
        room = self.engine.max_model_len - len(self.tokens)
        if not self.steps and room < 1:
            self.fail(f"the question's prompt has {len(self.tokens)} tokens; the model's "
                      f"context is {self.engine.max_model_len}")
            return None
        budget = min(self.tokens_left, room)
        if self.phase == "retrieve":
            budget = min(budget, self.limits.max_retrieval_tokens)
            stops = self.markers.stops()
        else:
            stops = {}
        if budget < 1:  # nothing more may be generated
            self._finish("length", "max_tokens" if self.tokens_left < 1 else "context")
            return None
        self.steps.append(Step(self.round, self.phase, list(self.tokens), list(self.routing)))
        return StepRequest(list(self.tokens), list(self.routing), budget, self.phase, stops)

    def fail(self, message: str) -> None:
        """The engine refused this question's request: end the loop with the reason."""
        if self.steps and not self.steps[-1].token_ids:
            self.steps.pop()
        self.error = message
        self.done = True

    def advance(self, token_ids: list[int], finish_reason: str | None,
                selection: dict[str, Any] | None, logprobs: Any = None) -> Step:
        """Take the output of the request `next_request` returned; returns its step."""
        step = self.steps[-1]
        step.token_ids = list(token_ids)
        step.logprobs = logprobs
        step.text = self.tokenizer.decode(step.token_ids, skip_special_tokens=False)
        step.finish_reason = finish_reason
        step.selection = selection
        self.tokens += step.token_ids
        cut = finish_reason == "length" and self.tokens_left < 1  # max_tokens spent
        if self.phase == "answer":
            step.outcome = "final"
            self._finish(finish_reason, "max_tokens" if cut else None)
        elif END_OF_RETRIEVE in step.text:
            step.outcome = "end_of_retrieve"
            self._to_answer(None)
        elif step.token_ids and step.token_ids[-1] == self.markers.retrieval_end:
            self._append_documents(step)
        elif finish_reason == "length" and len(step.token_ids) >= \
                self.limits.max_retrieval_tokens and self.tokens_left > 0:
            step.outcome = "stopped"
            self._to_answer("max_retrieval_tokens")
        else:
            step.outcome = "final"
            self._finish(finish_reason, "max_tokens" if cut else None)
        return step

    # ------------------------------------------------------------------ transitions
    def _append_documents(self, step: Step) -> None:
        step.requested_ids = requested_ids(step.text)
        known = [i for i in step.requested_ids if self.document_text(i) is not None]
        step.unknown_ids = [i for i in step.requested_ids if i not in set(known)]
        if self.round >= self.limits.max_rounds:
            step.outcome = "stopped"
            return self._to_answer("max_rounds")
        room = self.limits.max_retrieved_docs - self.docs_appended
        if known and room < 1:
            step.outcome = "stopped"
            return self._to_answer("max_retrieved_docs")
        step.doc_ids, step.dropped_ids = known[:room], known[room:]
        block_text = "".join(f"[{i}]. {self.document_text(i)}\n" for i in step.doc_ids)
        block = _encode(self.tokenizer, block_text) if block_text else []
        start = len(self.tokens)
        latest = (start, start + len(block)) if block else self.latest_block
        routing = [self.question_range] + ([latest] if latest else [])
        appended = [*block, self.markers.retrieval_end]
        if not self._fits(start + len(appended), routing[-1][1]):
            step.outcome = "stopped"
            step.doc_ids, step.dropped_ids = [], known
            return self._to_answer("context")
        step.outcome = "documents"
        self.tokens += appended
        self.docs_appended += len(step.doc_ids)
        self.latest_block = latest
        self.routing = routing
        self.round += 1

    def _to_answer(self, stopped_by: str | None) -> None:
        """Append the question turn; the model answers under the current routing."""
        turn = _encode(self.tokenizer, question_turn(self.question))
        self.stopped_by = stopped_by
        if not self._fits(len(self.tokens) + len(turn), self.routing[-1][1]):
            return self._finish("length", "context")
        self.tokens += turn
        self.phase = "answer"

    def _fits(self, prompt_len: int, routing_end: int) -> bool:
        return (routing_end <= self.engine.routing_budget
                and prompt_len < self.engine.max_model_len)

    def _finish(self, finish_reason: str | None, stopped_by: str | None) -> None:
        self.done = True
        self.stopped_by = self.stopped_by or stopped_by
        self.final_reason = finish_reason

    def result(self) -> InterleaveResult:
        last = self.steps[-1] if self.steps else None
        text = last.text if last else ""
        return InterleaveResult(
            question=self.question,
            answer=extract_answer(text) if last and last.outcome == "final" else None,
            text=text,
            finish_reason=self.final_reason,
            stopped_by=self.stopped_by,
            steps=self.steps,
            token_ids=list(self.tokens),
            error=self.error,
        )


def _anchor_length(tokenizer: Any, question: str, span: list[int]) -> int:
    """Routing-span tokens up to and including the anchor sentence (the reference engine's
    re-routing query): the span without its final newline when that tokenizes as a prefix,
    else the whole span."""
    prefix = _encode(tokenizer, ROUTING_PREFIX + question + "\n" + ROUTING_ANCHOR)
    return len(prefix) if span[: len(prefix)] == prefix else len(span)
