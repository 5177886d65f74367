"""Version-guarded reaches into vLLM internals, shipped as `vllm_msa.patches`.

Only for places where vLLM has no extension point; each patch module says what it changes,
why, and for which vLLM versions. `require_vllm` refuses to apply them on any other version.
"""

from __future__ import annotations

import os

PATCHED_VLLM = ">=0.32,<0.34"


def require_vllm(what: str) -> None:
    """Raise unless the installed vLLM is one these patches were written for."""
    if os.environ.get("VLLM_MSA_SKIP_VERSION_CHECK") == "1":
        return
    import vllm
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    release = ".".join(map(str, Version(vllm.__version__).release))
    if Version(release) not in SpecifierSet(PATCHED_VLLM):
        raise RuntimeError(
            f"{what} is written for vLLM {PATCHED_VLLM}; vLLM {vllm.__version__} is installed"
        )
