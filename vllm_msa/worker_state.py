"""What a worker's MSA runtime holds right now, and the bank edits it applies.

Every worker has these as methods (`vllm_msa/patches/worker_methods.py` adds them to vLLM's
worker wrapper; `--worker-extension-cls vllm_msa.worker_state.MSAWorkerState` does the same
where a deployment prefers vLLM's own mechanism), reached through
`LLM.collective_rpc("msa_state")`, the engine client's `collective_rpc`, or, on a server
started with `VLLM_SERVER_DEV_MODE=1`, vLLM's `POST /collective_rpc {"method": "msa_state"}`:

- `msa_state()`: the runtime's figures; the soak test and benchmark read it after their load
  to check that the staging pool emptied and device memory came back;
- `msa_apply_generation(bank)`: route over the bank's latest generation on disk from the
  next step on (the edit routes call it on every worker between two steps:
  `serving/edits.py`);
- `msa_take_encoded(keys)`: the pooled K̄/V̄/K̄r this worker captured for documents the
  API server encoded with the engine (`attention/capture.py`, `serving/encode.py`).
"""

from __future__ import annotations

import time
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
                     generations={name: bank.generation
                                  for name, bank in runtime.banks.items()},
                     slots_in_use=pool.num_slots - pool.num_free, slots=pool.num_slots,
                     overflows=pool.overflows, preempted=runtime.num_preempted,
                     tp_rank=runtime.tp_rank, late_compiles=list(runtime.late_compiles),
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


def apply_generation(name: str) -> dict[str, Any]:
    """Switch this process's served bank `name` to the latest generation on disk
    (`ServedBank.apply_generation`: removed documents masked, added ones appended); what it
    now serves."""
    from .attention.runtime import current_runtime
    from .bank.reader import MemoryBank

    runtime = current_runtime()
    served = None if runtime is None else runtime.banks.get(name)
    if served is None:
        raise KeyError(f"no bank {name!r} is served here")
    started = time.perf_counter()
    runtime.locate_selections(name)  # (running requests keep what they selected)
    located = time.perf_counter()
    bank = MemoryBank.open(served.bank.path)
    opened = time.perf_counter()
    removed, added = served.apply_generation(bank)
    done = time.perf_counter()
    return {"bank": name, "generation": served.generation, "removed": removed, "added": added,
            "documents": served.num_documents, "tp_rank": runtime.tp_rank,
            # (host time the switch held this worker, by part: what an edit costs serving)
            "seconds": {"locate": located - started, "open": opened - located,
                        "apply": done - opened}}


def take_encoded(keys: list[str]) -> dict[str, Any]:
    """This process's captures of the encode requests with these keys (`EncodeCaptures.take`), each
    document's rows as safetensors bytes (what the engine's RPC carries without pickle)."""
    from safetensors.torch import save

    from .attention.runtime import current_runtime

    runtime = current_runtime()
    if runtime is None:
        return {"layers": [], "kv_heads": [0, 0], "documents": {}}
    taken = runtime.encodes.take(list(keys))
    for doc in taken["documents"].values():
        doc["rows"] = save({"rows": doc["rows"].contiguous()})
    return {**taken, "tp_rank": runtime.tp_rank, "pp_rank": runtime.pp_rank}


class MSAWorkerState:
    """Mixed into vLLM's worker class by `--worker-extension-cls` (or added to its wrapper
    by `patches/worker_methods.py`)."""

    def msa_state(self) -> dict[str, Any]:
        return runtime_state()

    def msa_apply_generation(self, name: str) -> dict[str, Any]:
        return apply_generation(name)

    def msa_take_encoded(self, keys: list[str]) -> dict[str, Any]:
        return take_encoded(keys)
