"""Version-guarded reaches into vLLM internals, shipped as `vllm_msa.patches`.

Only for places where vLLM has no extension point; each patch says what it changes, why, and
for which vLLM versions. The foundation (model, encoder, banks) needs none.
"""
