"""Tiers that grow while served: a tensor's rows as the first rows of a larger allocation.

A live add appends a few chunks to every router layer's routing index (and host tier). With
room reserved (`additional_config["msa"]["reserve_tokens"]`) the new rows are written after
the served ones and the served view is widened: no copy of the index, no second allocation of
its size on a GPU that vLLM's KV cache has filled. Without room, or once it is used up, the
rows move to a new allocation with room again. Rows past a view are never read through it,
so writing them while requests route over the view is safe.
"""

from __future__ import annotations

import torch

from .compressed_index import CompressedKeys


def with_room(t: torch.Tensor, room: int) -> torch.Tensor:
    """A `[len(t) + room, ...]` allocation (on `t`'s device) whose first rows are `t`."""
    backing = torch.empty((t.shape[0] + room, *t.shape[1:]), dtype=t.dtype, device=t.device)
    _copy(backing[: t.shape[0]], t)
    return backing


def grown(backing: torch.Tensor, n: int, added: torch.Tensor, room: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(allocation, view of its first n + len(added) rows) with `added` after the first `n`
    rows of `backing`: in place where it has room, else in a new allocation with `room`."""
    m = added.shape[0]
    if backing.shape[0] < n + m:
        backing = with_room(backing[:n], m + room)
    _copy(backing[n:n + m], added.to(backing.device))
    return backing, backing[:n + m]


def keys_with_room(keys: CompressedKeys, room: int) -> CompressedKeys:
    """`keys` as the first rows of allocations with `room` more (a shared scale: its one
    stored column)."""
    return CompressedKeys(with_room(keys.values, room), _scale_rows(keys, with_room, room),
                          with_room(keys.residual, room), with_room(keys.magnitude, room),
                          keys.shared_scale)


def grown_keys(backing: CompressedKeys, n: int, more: CompressedKeys, room: int
               ) -> tuple[CompressedKeys, CompressedKeys]:
    """`grown` for compressed keys: (allocations, the first n + len(more) chunks)."""
    if more.shared_scale != backing.shared_scale or more.values.dtype != backing.values.dtype:
        raise ValueError("appended keys must be compressed as the index is")
    if backing.num_chunks < n + more.num_chunks:
        backing = keys_with_room(prefix(backing, n), more.num_chunks + room)
    total = n + more.num_chunks
    for part in ("values", "residual", "magnitude"):
        _copy(getattr(backing, part)[n:total], getattr(more, part))
    if backing.shared_scale:
        _copy(backing.scale[n:total, 0], more.scale[:, 0])
    else:
        _copy(backing.scale[n:total], more.scale)
    return backing, prefix(backing, total)


def prefix(keys: CompressedKeys, n: int) -> CompressedKeys:
    """The first `n` chunks of `keys` (views)."""
    return CompressedKeys(keys.values[:n], keys.scale[:n], keys.residual[:n],
                          keys.magnitude[:n], keys.shared_scale)


def _scale_rows(keys: CompressedKeys, make, room: int) -> torch.Tensor:
    if not keys.shared_scale:
        return make(keys.scale, room)
    column = make(keys.scale[:, 0].contiguous(), room)  # (stored once: [C] seen as [C, KV])
    return column[:, None].expand(-1, keys.scale.shape[1])


def _copy(out: torch.Tensor, src: torch.Tensor) -> None:
    if out.element_size() == 1 and out.is_contiguous() and src.is_contiguous():
        out.view(torch.uint8).copy_(src.view(torch.uint8))  # (FP8: copied as bytes)
    else:
        out.copy_(src)
