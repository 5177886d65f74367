"""A vLLM logits processor that makes the real engine write scripted outputs.

Random tiny checkpoints never write document ids, so Memory Interleave tests script what the
model "says": a request whose `extra_args["scripted_outputs"]` maps its prompt length (as a
string, JSON-friendly) to a list of token ids gets those tokens, one per step, and the model's
own choice after them. Only sampling is forced: the logprobs vLLM reports are the model's raw
ones (vLLM's default `logprobs_mode`), so they can still be compared with the reference.

Load it with `LLM(logits_processors=[ScriptedOutputs])` or
`--logits-processors scripted_outputs:ScriptedOutputs` (tests/ on PYTHONPATH).
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

KEY = "scripted_outputs"


class ScriptedOutputs(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        # batch row -> (tokens to force, the request's live output token list)
        self.rows: dict[int, tuple[list[int], list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, prompt_ids, output_ids in batch_update.added:
            script = (params.extra_args or {}).get(KEY) if params is not None else None
            forced = script.get(str(len(prompt_ids or []))) if script else None
            if forced is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = (list(forced), output_ids)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if direction == MoveDirectionality.SWAP and row_b is not None:
                self.rows[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, (forced, output_ids) in self.rows.items():
            done = len(output_ids)
            if done < len(forced):
                token = forced[done]
                logits[index] = float("-inf")
                logits[index, token] = 0.0
        return logits
