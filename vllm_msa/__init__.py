"""vllm-msa: serve MSA (Memory Sparse Attention) checkpoints with vLLM, as a plugin.

vLLM calls `register()` (entry point `vllm.general_plugins`) in every process it starts, so it
must be cheap and idempotent and must not initialise CUDA: models are registered lazily by
import path.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__version__ = "0.1.0"

# Installed, `kernels/` and `patches/` live inside this package (setup.py maps them there). Run
# from a source checkout (e.g. `python -m pytest` in the repo root, which puts the checkout
# ahead of the installed copy), they are the checkout's top-level folders: look there too.
_SOURCE_ROOT = Path(__file__).resolve().parent.parent
if (_SOURCE_ROOT / "setup.py").is_file() and (_SOURCE_ROOT / "patches" / "__init__.py").is_file():
    __path__.append(str(_SOURCE_ROOT))

SUPPORTED_VLLM = ">=0.32,<0.34"

# Architecture name -> lazy import path. `MSABankEncoder` is the stage-1 (bank building) view
# of the same checkpoint: a pooling model that returns pooled K/V/routing keys per document.
MODEL_ARCHITECTURES = {
    "MSAForCausalLM": "vllm_msa.model:MSAForCausalLM",
    "MSABankEncoder": "vllm_msa.encoder:MSABankEncoder",
}

logger = logging.getLogger(__name__)
_registered = False


def vllm_version_problem() -> str | None:
    """Why the installed vLLM cannot be used, or None when it is supported."""
    from importlib.metadata import PackageNotFoundError

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    try:
        import vllm
    except ImportError as e:  # pragma: no cover - depends on the environment
        return f"vLLM is not importable ({e}); install `vllm-msa[vllm]` or `vllm-msa[cpu]`"
    except PackageNotFoundError as e:  # pragma: no cover
        return f"vLLM's package metadata is missing ({e})"
    version = Version(vllm.__version__).release
    if Version(".".join(map(str, version))) not in SpecifierSet(SUPPORTED_VLLM):
        return (
            f"vllm-msa {__version__} supports vLLM {SUPPORTED_VLLM}, but vLLM "
            f"{vllm.__version__} is installed; install a supported vLLM "
            f'(pip install "vllm-msa[vllm]") or a vllm-msa release made for your vLLM'
        )
    return None


def register_config() -> None:
    """Teach transformers' AutoConfig the "msa" model type (all that reading a checkpoint's
    config needs: bank tools use this, not vLLM)."""
    from transformers import AutoConfig

    from .config import MSAConfig

    AutoConfig.register("msa", MSAConfig, exist_ok=True)


def register() -> None:
    """Register the "msa" config type and the MSA model classes (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True

    from .log import follow_vllm_logging

    follow_vllm_logging()
    register_config()

    if os.environ.get("VLLM_MSA_SKIP_VERSION_CHECK") != "1":
        problem = vllm_version_problem()
        if problem is not None:
            logger.error("vllm-msa is not active: %s", problem)
            return

    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for arch, path in MODEL_ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, path)

    from .patches.model_config import install_model_config_hook
    from .patches.worker_methods import install_worker_methods
    from .serving.connector import register_connectors

    install_model_config_hook()
    install_worker_methods()
    register_connectors()
