"""What a worker's MSA runtime holds right now, for checking that nothing leaks.

`MSAWorkerState` is a vLLM worker extension: start the engine with
`--worker-extension-cls vllm_msa.worker_state.MSAWorkerState` (or
`LLM(worker_extension_cls=...)`) and every worker gains `msa_state()`, reached through
`LLM.collective_rpc("msa_state")` or, on a server started with `VLLM_SERVER_DEV_MODE=1`,
vLLM's `POST /collective_rpc {"method": "msa_state"}`. The soak test and benchmark read it
after their load to check that the staging pool emptied and device memory came back.
"""

from __future__ import annotations

from typing import Any


def runtime_state() -> dict[str, Any]:
    """This process's MSA runtime figures (all zero without banks)."""
    import torch

    from .attention.runtime import current_runtime
    from .attention.tiers import synthetic_label

    runtime = current_runtime()
    state: dict[str, Any] = {"banks": 0, "requests": 0, "slots_in_use": 0, "slots": 0,
                             "overflows": 0, "preempted": 0}
    if runtime is not None:
        pool = runtime.pool
        state.update(banks=len(runtime.banks), requests=len(runtime.requests),
                     slots_in_use=pool.num_slots - pool.num_free, slots=pool.num_slots,
                     overflows=pool.overflows, preempted=runtime.num_preempted,
                     tp_rank=runtime.tp_rank,
                     bank_tiers={name: {"index_bytes": bank.index_bytes,
                                        "host_bytes": bank.host_bytes,
                                        "documents": [bank.shard.documents.start,
                                                      bank.shard.documents.stop],
                                        "chunks": bank.shard.num_chunks,
                                        "shared_files": list(bank.shared_files),
                                        "tiers": bank.bank.dtypes.to_json(),
                                        "index_dtype": bank.index_dtype,
                                        "rescore": bank.rescore_stats(),
                                        "host_cache": bank.host_cache.stats()
                                        if bank.host_cache is not None else None,
                                        "synthetic": synthetic_label(bank.bank).rstrip(": ")}
                                 for name, bank in runtime.banks.items()})
    if torch.cuda.is_available():
        state["gpu_allocated"] = torch.cuda.memory_allocated()
        state["gpu_reserved"] = torch.cuda.memory_reserved()
    return state


class MSAWorkerState:
    """Mixed into vLLM's worker class by `--worker-extension-cls`."""

    def msa_state(self) -> dict[str, Any]:
        return runtime_state()
