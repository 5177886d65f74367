"""Memory Interleave over vLLM's offline `LLM` class: many questions, one engine, all at once.

Every question's current step is in the engine together with the others' (continuous
batching): when one step finishes, the question's next step is added right away, while the
other questions' steps keep running.
"""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from collections.abc import Sequence
from typing import Any

from ..options import SELECTION_KEY
from .protocol import InterleaveLimits, InterleaveResult
from .session import InterleaveSession


def answer(
    llm: Any,
    questions: str | Sequence[str],
    *,
    bank: str | None = None,
    top_k: int | None = None,
    limits: InterleaveLimits | None = None,
    sampling_params: Any | Sequence[Any] | None = None,
    **limit_overrides: int,
) -> list[InterleaveResult]:
    """Answer `questions` with Memory Interleave (msa-spec §4) on `llm`, an `LLM` serving an MSA
    checkpoint with banks. Returns one result per question, in order.

    `bank` (default: the engine's default bank) and `top_k` (default: the engine's) apply to
    every routing. `limits` or keyword overrides (`max_rounds=...`, `max_retrieved_docs=...`,
    `max_tokens=...`, `max_retrieval_tokens=...`) bound each question's loop.
    `sampling_params` (one for all, or one per question) gives the sampling settings of every
    step (greedy by default); the loop sets lengths and stops itself.

    It drives `llm.llm_engine` directly (like `LLM.generate`, it expects to be the engine's
    only user while it runs).
    """
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    single = isinstance(questions, str)
    questions = [questions] if single else list(questions)
    limits = dataclasses.replace(limits or InterleaveLimits(), **limit_overrides)
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        bases = [sampling_params or SamplingParams(temperature=0.0)] * len(questions)
    else:
        bases = list(sampling_params)
        if len(bases) != len(questions):
            raise ValueError(f"{len(bases)} sampling_params for {len(questions)} questions")
    engine = llm.llm_engine
    session = InterleaveSession(engine.vllm_config, llm.get_tokenizer())
    bank = session.resolve_bank(bank)
    session.check_top_k(bank, top_k)
    conversations = [session.conversation(q, bank, limits) for q in questions]
    tag = uuid.uuid4().hex[:12]
    counter = itertools.count()
    running: dict[str, int] = {}

    def submit(i: int) -> None:
        conversation = conversations[i]
        request = conversation.next_request()
        if request is None:
            return
        params = session.sampling_params(request, bases[i], bank, top_k,
                                         RequestOutputKind.FINAL_ONLY)
        request_id = f"msa-interleave-{tag}-{i}-{next(counter)}"
        try:
            engine.add_request(request_id, {"prompt_token_ids": request.prompt_token_ids},
                               params)
        except ValueError as e:  # refused at admission: this question ends with the reason
            conversation.fail(str(e))
            return
        running[request_id] = i

    try:
        for i in range(len(conversations)):
            submit(i)
        while running:
            for output in engine.step():
                i = running.pop(output.request_id, None)
                if i is None or not output.finished:
                    if i is not None:
                        running[output.request_id] = i
                    continue
                completion = output.outputs[0]
                selection = (output.kv_transfer_params or {}).get(SELECTION_KEY)
                conversations[i].advance(list(completion.token_ids),
                                         completion.finish_reason, selection,
                                         completion.logprobs)
                submit(i)
    except BaseException:
        if running:
            engine.abort_request(list(running))
        raise
    return [c.result() for c in conversations]
