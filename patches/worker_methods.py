"""The MSA worker methods on every vLLM worker, without `--worker-extension-cls`.

What: adds `MSAWorkerState`'s methods (`msa_state`, `msa_apply_generation`:
`vllm_msa/worker_state.py`) to `vllm.v1.worker.worker_base.WorkerWrapperBase`, the object
every executor (uniprocess, multiprocess, Ray) runs `collective_rpc` methods on by name.
Why: the bank-edit routes must reach every worker of a running server (`serving/edits.py`),
and a deployment should not need a worker extension for that; vLLM's own extension option
stays free for the user's. A name the class already has is left alone. Versions: vLLM 0.32.x
and 0.33.x (`collective_rpc` resolves a method name with `getattr` on the wrapper, which
forwards unknown names to the worker).
"""

from __future__ import annotations

from . import require_vllm

_installed = False


def install_worker_methods() -> None:
    global _installed
    if _installed:
        return
    require_vllm("the MSA worker methods")
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    from vllm_msa.worker_state import MSAWorkerState

    for name, method in vars(MSAWorkerState).items():
        if name.startswith("msa_") and not hasattr(WorkerWrapperBase, name):
            setattr(WorkerWrapperBase, name, method)
    _installed = True
