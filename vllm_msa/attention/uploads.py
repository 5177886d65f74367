"""Small host-built index arrays to the device without stalling the host.

A copy from pageable host memory is synchronous: the host waits until the stream has drained
up to it. In a router layer that wait serialises the host's Python with the GPU's work, layer
after layer (a prefill step's time then is their sum, not their max). Pinned copies are
asynchronous; torch's pinned allocator keeps the buffer until the copy is done.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def upload(values: np.ndarray | Sequence[int], device: torch.device,
           dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """`values` as a tensor on `device`, copied asynchronously when it is a GPU."""
    host = torch.from_numpy(np.ascontiguousarray(values)).to(dtype) if isinstance(
        values, np.ndarray) else torch.tensor(values, dtype=dtype)
    return upload_tensor(host, device)


def upload_tensor(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host tensor `t` on `device`, copied asynchronously when it is a GPU."""
    if torch.device(device).type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def ranges(spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """The integers of the half-open ranges `spans`, concatenated (int64)."""
    if not spans:
        return np.zeros(0, dtype=np.int64)
    starts = np.fromiter((a for a, _ in spans), dtype=np.int64, count=len(spans))
    lengths = np.fromiter((b - a for a, b in spans), dtype=np.int64, count=len(spans))
    # Position i of range j is starts[j] + (i - where range j begins in the output).
    offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return offsets + np.arange(offsets.shape[0], dtype=np.int64)
