"""Memory Interleave written from msa-spec §4 (and the reference engine's re-routing regions),
independently of `vllm_msa.interleave`: given what the model writes at each step, the prompts
and routing ranges the serving loop must produce.

The context is kept as a list of labelled segments (template head, routing span, tail, model
outputs, appended document blocks, delimiters, question turn); prompts are their
concatenation and routing ranges are computed from segment offsets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

HEAD = "<|im_start|>user\n"
WRAP_BEFORE = "\nPlease answer the question based on the above historical document information\n\n"
ANCHOR = "\nPlease return all documents related to the question"
TAIL = "<|im_end|>\n"
RESPONSE = "<|im_start|>"
DELIMITER = "<|object_ref_end|>"
EOR = "<End-of-Retrieve>"


@dataclass
class ExpectedStep:
    round: int
    phase: str
    prompt: list[int]
    routing: list[tuple[int, int]]
    output: list[int]
    outcome: str = ""
    doc_ids: list[int] = field(default_factory=list)
    unknown_ids: list[int] = field(default_factory=list)
    dropped_ids: list[int] = field(default_factory=list)


@dataclass
class ExpectedRun:
    steps: list[ExpectedStep]
    stopped_by: str | None
    answer: str | None


def simulate(tokenizer, question: str, texts: dict[int, str], outputs: list[list[int]], *,
             max_rounds: int = 8, max_docs: int = 32, max_tokens: int = 512,
             max_retrieval_tokens: int = 128, budget: int = 10**9,
             max_len: int = 10**9) -> ExpectedRun:
    """Replay the loop for scripted `outputs` (one token list per step, in order; each is
    what the engine returns for that step, so already cut at the step's stop or length)."""
    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    delimiter = enc(DELIMITER)
    segments: list[tuple[str, list[int]]] = [
        ("head", enc(HEAD)), ("span", enc(WRAP_BEFORE + question + ANCHOR + "\n")),
        ("tail", enc(TAIL) + enc(RESPONSE))]
    head_len = len(segments[0][1])
    question_part = (head_len, head_len + len(enc(WRAP_BEFORE + question + ANCHOR)))

    def flat() -> list[int]:
        return [t for _, ids in segments for t in ids]

    def offset(index: int) -> int:
        return sum(len(ids) for _, ids in segments[:index])

    def latest_block() -> tuple[int, int] | None:
        for i in range(len(segments) - 1, -1, -1):
            if segments[i][0] == "documents" and segments[i][1]:
                return (offset(i), offset(i) + len(segments[i][1]))
        return None

    routing = [(head_len, head_len + len(segments[1][1]))]
    steps: list[ExpectedStep] = []
    phase, rnd, used, appended, stopped = "retrieve", 1, 0, 0, None
    answer = None

    def question_turn(reason):
        nonlocal phase, stopped
        stopped = reason
        turn = enc(f"<|im_start|>The user's question is: {question}\n{DELIMITER}")
        if len(flat()) + len(turn) >= max_len or routing[-1][1] > budget:
            return False
        segments.append(("question", turn))
        phase = "answer"
        return True

    for output in outputs:
        steps.append(ExpectedStep(rnd, phase, flat(), list(routing), list(output)))
        step = steps[-1]
        used += len(output)
        segments.append(("output", list(output)))
        text = tokenizer.decode(output, skip_special_tokens=False)
        if phase == "answer":
            step.outcome = "final"
            if used >= max_tokens and output[-1:] != enc("<|im_end|>") and stopped is None:
                stopped = "max_tokens"  # the answer was cut
            break
        if EOR in text:
            step.outcome = "end_of_retrieve"
            if not question_turn(None):
                break
            continue
        if output[-1:] == delimiter:
            wanted = sorted({int(n) for n in re.findall(r"\[(\d+)\]", text)})
            step.unknown_ids = [n for n in wanted if n not in texts]
            known = [n for n in wanted if n in texts]
            if rnd >= max_rounds:
                step.outcome = "stopped"
                question_turn("max_rounds")
                continue
            if known and appended >= max_docs:
                step.outcome = "stopped"
                question_turn("max_retrieved_docs")
                continue
            take = known[: max_docs - appended]
            block = enc("".join(f"[{n}]. {texts[n]}\n" for n in take)) if take else []
            trial = [*segments, ("documents", block), ("delimiter", delimiter)]
            size = sum(len(ids) for _, ids in trial)
            segments.extend(trial[len(segments):])
            latest = latest_block()
            new_routing = [question_part] + ([latest] if latest else [])
            if new_routing[-1][1] > budget or size >= max_len:
                del segments[-2:]
                step.outcome, step.dropped_ids = "stopped", known
                question_turn("context")
                continue
            step.outcome, step.doc_ids, step.dropped_ids = "documents", take, known[len(take):]
            appended += len(take)
            routing, rnd = new_routing, rnd + 1
            continue
        if len(output) >= max_retrieval_tokens and used < max_tokens:
            step.outcome = "stopped"
            question_turn("max_retrieval_tokens")
            continue
        step.outcome = "final"
        if used >= max_tokens and output[-1:] != enc("<|im_end|>"):
            stopped = "max_tokens"
        break
    last = tokenizer.decode(steps[-1].output, skip_special_tokens=False)
    if steps[-1].outcome == "final" and "The answer to the question is:" in last:
        answer = last.split("The answer to the question is:", 1)[1]
        answer = answer.split("<|im_end|>", 1)[0].strip()
    return ExpectedRun(steps, stopped, answer)
