"""Memory Interleave (msa-spec §4): multi-round generative retrieval over a bank.

`answer(llm, questions, ...)` runs it offline; `POST /v1/msa/answer` runs it in `vllm serve`.
The protocol itself (prompts, parsing, bounds) is `protocol.Conversation`.
"""

from .offline import answer
from .protocol import Conversation, InterleaveLimits, InterleaveResult, Step

__all__ = ["Conversation", "InterleaveLimits", "InterleaveResult", "Step", "answer"]
