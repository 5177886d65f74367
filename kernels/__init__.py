"""Triton kernels of vllm-msa, shipped as `vllm_msa.kernels` (routing, staging of routed
documents, host->GPU gather, memory attention). Each kernel comes with a torch reference used
by its tests."""
