"""Admit MSA requests in the front end (validation, routing span, cache salt).

What: wraps `InputProcessor.process_inputs` so every engine request of an MSA model passes
through `vllm_msa.serving.admission.Admission.admit` before it is sent to the engine.
Why: vLLM has no per-request validation hook for plugin args (`extra_args`) that also sees the
prompt tokens; rejecting a bad request here is what keeps the engine (and the server) up.
Versions: vLLM 0.32.x and 0.33.x (`InputProcessor.process_inputs` returns the
`EngineCoreRequest`, with `sampling_params` already cloned from the caller's).
"""

from __future__ import annotations

import functools
from typing import Any

from . import require_vllm

_admissions: dict[int, Any] = {}
_installed = False


def admission_for(vllm_config: Any) -> Any | None:
    """The admission installed for an engine's config (None: the engine serves no bank)."""
    config, admission = _admissions.get(id(vllm_config), (None, None))
    return admission if config is vllm_config else None


def install_admission(vllm_config: Any, admission: Any) -> None:
    """Admit requests of engines built from `vllm_config` with `admission`."""
    global _installed
    require_vllm("MSA request admission")
    _admissions[id(vllm_config)] = (vllm_config, admission)
    if _installed:
        return
    from vllm.v1.engine.input_processor import InputProcessor

    process_inputs = InputProcessor.process_inputs

    @functools.wraps(process_inputs)
    def _process_inputs(self, *args, **kwargs):
        request = process_inputs(self, *args, **kwargs)
        config, admission = _admissions.get(id(self.vllm_config), (None, None))
        if config is self.vllm_config:
            admission.admit(request, self.tokenizer)
        return request

    InputProcessor.process_inputs = _process_inputs
    _installed = True
