"""What every benchmark here reports with: the card's name, a file-name slug of it, and
matplotlib (optional: without it a benchmark prints its table and skips the plot)."""

from __future__ import annotations

import platform
import re
import subprocess
from typing import Any


def nvidia_smi(query: str) -> str:
    """One `nvidia-smi --query-gpu` field of the first GPU, or "" without one."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return ""


def card_name() -> str:
    """The GPU's name (e.g. "NVIDIA H100 80GB HBM3"), or the CPU's on a machine without one."""
    name = nvidia_smi("name")
    if name:
        return name
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"CPU ({platform.processor() or platform.machine()})"


def card_slug(name: str) -> str:
    """`name` as a file-name part: "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def pyplot() -> Any | None:
    """matplotlib.pyplot on the file-only Agg backend, or None where matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
