"""MSA's stage 2 inside vLLM: routing, per-request memory state and the attention backend."""
