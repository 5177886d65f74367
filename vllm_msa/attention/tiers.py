"""A bank as one worker serves it: the routing index on the device, K̄/V̄ in host memory.

The routing keys of every router layer (all KV heads: routing scores sum over every query
head) and the chunk -> document map go to the device; K̄ and V̄ stay in host RAM — pinned
when a GPU will read them, plain memory on CPU — holding only the KV heads this tensor-parallel
rank attends with.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import logging
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..bank.format import BankError
from ..bank.quant import SCALE_SUFFIX, check_scales
from ..bank.reader import MemoryBank
from .bounded_routing import CompressedRoutingIndex, RescoreStats
from .compressed_index import BankExactKeys, compress
from .growth import grown, grown_keys, keys_with_room, prefix
from .host_cache import HostCache
from .host_share import SHM_DIR, on_tmpfs, shared_tensor
from .index_parallel import IndexShard, bank_identity, index_bytes
from .routing import RoutingIndex, normalized_keys
from .uploads import ranges, upload_tensor

logger = logging.getLogger(__name__)


def local_kv_heads(total: int, tp_rank: int, tp_size: int) -> slice:
    """The KV heads a TP rank holds, by the rule of vLLM's `QKVParallelLinear`."""
    if total >= tp_size:
        per_rank = total // tp_size
        return slice(tp_rank * per_rank, (tp_rank + 1) * per_rank)
    head = tp_rank // (tp_size // total)
    return slice(head, head + 1)


def page_lock(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (contiguous, host) page-locked in place, for kernels to read through UVA.

    Page-locking registers the exact-size buffer with `cudaHostRegister` (mapped) rather than
    copying it into `Tensor.pin_memory()`: torch's pinned allocator rounds every block up to a
    power of two, up to 2x the host RAM for a large bank's per-layer tensors. The buffer is
    unregistered when its storage is freed (the bank dropped, e.g. an `LLM` deleted in a
    process that goes on): until then every view of it keeps it registered."""
    storage = tensor.untyped_storage()
    flags = 1 | 2  # cudaHostRegisterPortable | cudaHostRegisterMapped
    err = torch.cuda.cudart().cudaHostRegister(storage.data_ptr(), storage.nbytes(), flags)
    registered = int(getattr(err, "value", err)) == 0
    if registered and tensor.is_pinned():
        # Runs as the storage's Python object dies, before torch frees the memory; not at
        # interpreter exit, when CUDA may already be gone (the process's memory goes anyway).
        weakref.finalize(storage, _unregister, storage.data_ptr()).atexit = False
        return tensor
    if registered:  # registered, yet torch does not see it as pinned: undo, use torch's
        _unregister(storage.data_ptr())
    else:  # the error stays as CUDA's last error, which the next CUDA call would raise
        _clear_cuda_error()
    logger.warning("cudaHostRegister failed (%s); pinning through torch's allocator", err)
    return tensor.pin_memory()


def _clear_cuda_error() -> None:
    """Reset CUDA's last error (torch's `cudart()` bindings lack cudaGetLastError): through
    the runtime library the process has loaded, where it can be found."""
    for name in (None, "libcudart.so", *(f"libcudart.so.{v}" for v in (13, 12, 11))):
        try:
            ctypes.CDLL(name).cudaGetLastError()
            return
        except (OSError, AttributeError):
            continue
    logger.warning("could not reset CUDA's last error after a failed cudaHostRegister")


def _unregister(address: int) -> None:
    with contextlib.suppress(Exception):  # a CUDA context being torn down: nothing to undo
        torch.cuda.cudart().cudaHostUnregister(address)


def release_freed_heap() -> None:
    """Give the C heap's free pages back to the system (glibc `malloc_trim`). Reading a bank
    frees many segment-sized buffers; glibc keeps such blocks (below its mmap threshold) in
    the heap, where the long-lived host tier pins them between live blocks, so without this
    the process keeps ~0.6 GB it no longer uses (benchmarks/memory.py measured it)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def synthetic_label(bank: MemoryBank) -> str:
    """"SYNTHETIC " (and "virtual") for a bank of random tensors, so no log passes it off as
    real memory."""
    if "virtual" in bank.manifest:
        return "SYNTHETIC, virtual: "
    return "SYNTHETIC: " if "synthetic" in (bank.manifest.get("source") or {}) else ""


def _check_scales(bank: MemoryBank, where: str, part: torch.Tensor) -> None:
    problem = check_scales(part)
    if problem:
        raise BankError(f"bank {bank.path}: {where} {problem}: its FP8 values cannot be "
                        "read back; convert the bank again from its source")


def shared_name(bank: MemoryBank) -> str:
    """The prefix of a bank's shared host-tier files: what the bank holds, not where."""
    return f"{bank_identity(bank)[:32]}-{str(bank.dtype).removeprefix('torch.')}"


def shared_part_name(share: str, layer: int, part: str, kv_heads: slice, info: Any,
                     reserve: int = 0) -> str:
    """The shared-memory file of one host-tier tensor (`host_share.py`), with `reserve`
    chunks of room for live adds."""
    heads = range(info.num_kv_heads)[kv_heads]
    return f"{share}-L{layer}-{part}-h{heads.start}-{heads.stop}" + (
        f"-r{reserve}" if reserve else "")


def host_part(shape: tuple[int, ...], dtype: torch.dtype, fill: Any, shared: str | None,
              pin: bool, shared_files: list | None) -> torch.Tensor:
    """One host-tier tensor filled by `fill(out)`: in the node's shared memory under the name
    `shared` where it fits (its path added to `shared_files`), else private; page-locked
    for the GPU where `pin`."""
    made = None if shared is None else shared_tensor(shared, shape, dtype, fill)
    if made is None:
        tensor = torch.empty(shape, dtype=dtype, device="cpu")
        fill(tensor)
    else:
        tensor = made.tensor
        if shared_files is not None:
            shared_files.append(str(made.path))
        if pin and not on_tmpfs(made.path):  # CUDA cannot page-lock it
            return tensor.pin_memory()
    return page_lock(tensor) if pin else tensor


@dataclass
class ServedBank:
    name: str
    bank: MemoryBank
    index: dict[int, RoutingIndex]  # router layer -> device routing index
    host_keys: dict[int, torch.Tensor]  # router layer -> [chunks, local kv, hd], host
    host_values: dict[int, torch.Tensor]  # (stored dtype: the model's, or FP8)
    doc_position: dict[int, int]  # doc id -> position in bank order
    chunk_offsets: list[int]  # bank order: document i owns chunks offsets[i]:offsets[i+1]
    shard: IndexShard  # the documents this rank's routing index holds
    shared_files: list[str] = field(default_factory=list)  # host tensors in shared memory
    # An FP8 host tier's scales: router layer -> (K, V) [chunks, local kv] float32, host.
    host_scales: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # The disk tier (`host_cache.py`): host_keys/values/scales are its buffers, indexed by
    # cache row through `host_cache.slot_table(layer)`; None: the whole tier is in RAM.
    host_cache: HostCache | None = None
    normalized: bool = False  # the index holds the stored keys L2-normalised (cosine)
    kv_heads: slice = field(default_factory=lambda: slice(None))  # the host tier's KV heads
    # Each host-tier tensor with its room for live adds: layer -> part -> [capacity, ...];
    # host_keys/values/scales are its first rows.
    host_backing: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    # The same for the routing index (this rank's, where it grows: the last shard):
    # layer -> keys [capacity, KV, D] or `CompressedKeys` of capacity chunks.
    index_backing: dict[int, Any] = field(default_factory=dict)
    reserve_chunks: int = 0  # the room each (re)allocation of a growing tier gets
    _prepared: dict[int, Any] = field(default_factory=dict)
    _tables: dict[torch.device, tuple] = field(default_factory=dict)

    @classmethod
    def load(cls, name: str, bank: MemoryBank, device: torch.device, kv_heads: slice,
             verify: bool = True, checksums: bool | None = None,
             shard: tuple[int, int] = (0, 1), layers: Any = None,
             share_host: bool = False, host_cache_bytes: float | None = None,
             index_dtype: str = "auto", normalize: bool = False, reserve_chunks: int = 0
             ) -> ServedBank:
        """Read `bank` into its tiers: the routing index of the documents of `shard`
        ((rank, ranks): `index_parallel.shard_bounds`; the whole bank by default), the host
        tier of every document for heads `kv_heads`. With `verify` every value read must be
        finite, and (unless `checksums` is False: tensor-parallel ranks after the first)
        every file's checksum is checked on background threads while the tensors are read
        (the same bytes: the second read comes from the page cache). Either problem refuses
        the bank with the reason instead of serving wrong memory. `layers`: the router
        layers to load (a pipeline stage's own; all by default). `share_host`: K̄/V̄ in the
        node's shared memory, one copy for every engine process that serves the bank
        (`host_share.py`), where it fits. `host_cache_bytes`: read K̄/V̄ on demand from the
        bank files into a cache of this many host bytes instead (`host_cache.py`).
        `index_dtype` "int8" | "fp8_e4m3": the routing index in 8 bits on the device
        (`compressed_index.py`; routing re-reads the bank files for exact scores);
        `normalize`: L2-normalise the routing keys (cosine scores of a bank built for dot).
        `reserve_chunks`: room for that many more chunks in each host-tier tensor, where
        live adds append (`apply_generation`)."""
        checksums = verify if checksums is None else checksums and verify
        # The tiers hold the bank as stored: an edited bank's removed documents keep their
        # rows and are masked out of routing (`RoutingIndex.live`), never rewritten here.
        physical = bank.physical
        offsets = physical.doc_chunk_offsets.tolist()
        own = IndexShard.of(offsets, *shard)
        pin = device.type == "cuda"
        index, keys, values, shared, scales, backing = {}, {}, {}, [], {}, {}
        index_backing: dict[int, Any] = {}
        started = time.monotonic()
        # Checks run beside the reading: the checksums (several files at once), and the
        # finite check of each host-tier part as soon as it is read (device parts are
        # checked on the device, in line). Torch and the hashes release the GIL.
        with ThreadPoolExecutor(4, thread_name_prefix="bank-verify") as pool:
            hashed = pool.submit(bank.verify) if checksums else None
            finite = []

            def check(where: str, part: torch.Tensor) -> None:
                if part.is_cuda:
                    bank.check_finite_part(where, part)
                else:
                    finite.append(pool.submit(bank.check_finite_part, where, part))

            def checked() -> None:  # every check so far passed (before a tier is shared)
                for future in finite:
                    future.result()

            layers = bank.router_layers if layers is None else list(layers)
            try:
                cls._read_tiers(bank, device, kv_heads, own, pin, check if verify else None,
                                layers, index, keys, values,
                                shared_name(bank) if share_host else None, checked, shared,
                                scales, host=host_cache_bytes is None,
                                index_dtype=index_dtype, normalize=normalize,
                                reserve=reserve_chunks, backing=backing,
                                index_backing=index_backing)
            finally:
                problems = hashed.result() if hashed is not None else []
                for future in finite:
                    future.result()  # raises the first non-finite part's BankError
        if problems:
            raise BankError(
                f"bank {name!r} at {bank.path} is corrupt: " + "; ".join(problems)
                + ". Rebuild it (`vllm-msa bank verify` lists the damage); "
                'additional_config {"msa": {"verify": false}} skips this check')
        if verify:
            logger.info("MSA bank %r: %s verified while loading (%.1f s)", name,
                        "checksums and values" if checksums else "values",
                        time.monotonic() - started)
        release_freed_heap()
        cache = None
        if host_cache_bytes is not None:
            heads = len(range(bank.model_info.num_kv_heads)[kv_heads])
            cache = HostCache(bank, layers, kv_heads,
                              HostCache.rows_for(bank, len(layers), heads, host_cache_bytes),
                              device, page_lock if pin else None)
            for layer, parts in cache.buffers.items():
                keys[layer], values[layer] = parts["keys"], parts["values"]
                if f"keys{SCALE_SUFFIX}" in parts:
                    scales[layer] = (parts[f"keys{SCALE_SUFFIX}"],
                                     parts[f"values{SCALE_SUFFIX}"])
        served = cls(
            name=name,
            bank=bank,
            index=index,
            host_keys=keys,
            host_values=values,
            doc_position=physical.live_positions(),
            chunk_offsets=offsets,
            shard=own,
            shared_files=shared,
            host_scales=scales,
            host_cache=cache,
            normalized=normalize,
            kv_heads=kv_heads,
            host_backing=backing,
            index_backing=index_backing,
            reserve_chunks=reserve_chunks,
        )
        sharded = (f"; index shard {own.rank + 1}/{own.size}: documents "
                   f"{own.documents.start}:{own.documents.stop} of {bank.num_documents}, "
                   f"{own.num_chunks} of {bank.num_chunks} chunks" if own.size > 1 else "")
        logger.info(
            "MSA bank %r (%s%s): %d documents, %d chunks, %d tokens; device index %.1f MiB, "
            "host K/V %.1f MiB (%s, %s%s)%s", name, synthetic_label(bank), bank.path,
            bank.num_documents,
            bank.num_chunks, bank.num_tokens, served.index_bytes / 2**20,
            served.host_bytes / 2**20, bank.dtypes.kv, "pinned" if pin else "plain memory",
            f", shared by the node's engines in {len(shared)} {SHM_DIR} files" if shared
            else f", a disk tier cache of {cache.rows} chunks per layer: documents are read "
            "from the bank files as requests select them" if cache else "", sharded)
        return served

    @staticmethod
    def _read_tiers(bank: MemoryBank, device: torch.device, kv_heads: slice,
                    shard: IndexShard, pin: bool, check: Any, layers: list[int],
                    index: dict, keys: dict, values: dict, share: str | None = None,
                    checked: Any = None, shared_files: list | None = None,
                    scales: dict | None = None, host: bool = True,
                    index_dtype: str = "auto", normalize: bool = False, reserve: int = 0,
                    backing: dict | None = None, index_backing: dict | None = None) -> None:
        # One chunk -> document map for every layer (bank order is the same in all of them),
        # of the stored documents, removed ones masked (`live`).
        physical = bank.physical
        doc_index = physical.chunk_doc_index.to(device)
        doc_ids = physical.doc_ids.to(device)
        live = physical.live if physical.has_removals else None
        offsets = physical.doc_chunk_offsets
        info = bank.model_info
        routed = (shard.num_chunks, info.num_kv_heads, info.head_dim)
        local = (bank.physical_chunks, len(range(info.num_kv_heads)[kv_heads]), info.head_dim)
        # Room for live adds in the index of the rank whose shard grows (the last).
        room = reserve if shard.rank == shard.size - 1 and index_backing is not None else 0
        uploaded: dict[torch.device, torch.Tensor] = {}  # `live` on the device, once
        like = None  # the first 8-bit layer's prepared tables: every layer's (one layout)
        for layer in layers:
            # Straight into the buffers serving reads, a segment at a time (the bank object
            # keeps no copy: that would double host memory for the life of the server).
            whole = torch.empty((routed[0] + (room if index_dtype == "auto" else 0),
                                 *routed[1:]), dtype=bank.dtype, device=device)
            routing_keys = whole[: routed[0]]
            bank.read_layer_into(layer, "routing_keys", routing_keys, on_segment=check,
                                 chunks=shard.chunks)
            if normalize:
                routing_keys.copy_(normalized_keys(routing_keys))
            if index_dtype == "auto":
                if room:
                    index_backing[layer] = whole
                index[layer] = RoutingIndex.of_shard(routing_keys, doc_index, doc_ids,
                                                     offsets, shard, live, uploaded)
            else:
                compressed = compress(routing_keys, index_dtype)
                del routing_keys, whole  # (only the 8-bit index stays on the device)
                if room:
                    index_backing[layer] = keys_with_room(compressed, room)
                    compressed = prefix(index_backing[layer], routed[0])
                index[layer] = CompressedRoutingIndex.build(
                    RoutingIndex.of_shard(compressed.values, doc_index, doc_ids, offsets,
                                          shard, live, uploaded),
                    compressed, BankExactKeys(bank, layer, shard.chunks.start or 0, device),
                    bank.dtype, normalize, like)
                like = like or index[layer].prepared
            if not host:
                continue  # the disk tier reads K̄/V̄ on demand
            tiers = {}
            for part in ("keys", "values", *(
                    (f"keys{SCALE_SUFFIX}", f"values{SCALE_SUFFIX}")
                    if bank.dtypes.scaled("keys") else ())):
                shape = local if not part.endswith(SCALE_SUFFIX) else local[:2]
                dtype = bank.stored_dtype(part)
                capacity = (shape[0] + reserve, *shape[1:])

                def fill(out: torch.Tensor, layer: int = layer, part: str = part) -> None:
                    out = out[: bank.physical_chunks]  # (the rest: room for live adds)
                    on_segment = check
                    if part.endswith(SCALE_SUFFIX):
                        on_segment = functools.partial(_check_scales, bank)
                    bank.read_layer_into(layer, part, out, kv_heads, on_segment=on_segment)
                    if checked is not None:
                        checked()  # a shared tier is published only once it checks out

                name = None if share is None else shared_part_name(share, layer, part,
                                                                   kv_heads, info, reserve)
                whole = host_part(capacity, dtype, fill, name, pin, shared_files)
                if backing is not None:
                    backing.setdefault(layer, {})[part] = whole
                tiers[part] = whole[: shape[0]]
            keys[layer], values[layer] = tiers["keys"], tiers["values"]
            if scales is not None and f"keys{SCALE_SUFFIX}" in tiers:
                scales[layer] = (tiers[f"keys{SCALE_SUFFIX}"], tiers[f"values{SCALE_SUFFIX}"])

    @property
    def generation(self) -> int:
        """The bank generation this worker routes over."""
        return self.bank.generation

    def apply_generation(self, bank: MemoryBank) -> tuple[list[int], list[int]]:
        """Route over `bank`, a later generation of this bank, from the next step on, in
        place of a reload: documents it removed are masked out of every router layer's index;
        documents it added (new segments after the stored ones: `bank.edit`) are read from
        their segment files and appended to the index and the host tier. Requests already
        admitted keep the selections they made (their sort keys name stored rows, which stay
        where they are). Returns (ids removed, ids added). Refuses a generation that moved
        or rewrote stored documents (a compaction: that needs a reload)."""
        old, new = self.bank.physical, bank.physical
        n = old.doc_ids.numel()
        if bank.path != self.bank.path or new.doc_ids.numel() < n or not (
                torch.equal(old.doc_ids, new.doc_ids[:n])
                and torch.equal(old.doc_num_chunks, new.doc_num_chunks[:n])):
            raise BankError(f"bank {self.name!r}: generation {bank.generation} stores other "
                            f"documents than generation {self.generation}; reload it")
        if bool((new.live[:n] & ~old.live).any()):
            raise BankError(f"bank {self.name!r}: generation {bank.generation} makes removed "
                            "documents live again")
        removed = old.doc_ids[old.live & ~new.live[:n]].tolist()
        added = new.doc_ids[n:][new.live[n:]].tolist()
        live = new.live if new.has_removals else None
        if new.doc_ids.numel() > n:
            self._append(bank, live)
        else:
            self._mask(live)
        # (live positions move only where this edit removed or added documents)
        for doc_id in removed:
            del self.doc_position[doc_id]
        positions = torch.nonzero(new.live[n:]).flatten() + n
        self.doc_position.update(zip(new.doc_ids[positions].tolist(), positions.tolist(),
                                     strict=True))
        self._tables.clear()
        for cached in ("_sizes_descending", "max_document_chunks", "_offsets_array"):
            self.__dict__.pop(cached, None)
        self.bank = bank
        return removed, added

    def _mask(self, live: torch.Tensor | None) -> None:
        """Every layer's index with the documents `live` (None: all) routable."""
        from ..kernels.routing import with_live

        uploaded: dict[torch.device, torch.Tensor] = {}
        like = None  # the first layer's re-masked tables: every layer's (one layout)
        for layer, idx in list(self.index.items()):
            compressed = isinstance(idx, CompressedRoutingIndex)
            layout = (idx.layout if compressed else idx).with_live(live, self.shard, uploaded)
            prepared = idx.prepared if compressed else self._prepared.get(layer)
            if prepared is not None:
                prepared = with_live(prepared, layout, like)
                like = like or prepared
            if compressed:
                self.index[layer] = dataclasses.replace(idx, layout=layout, prepared=prepared)
            else:
                self.index[layer] = layout
                if prepared is not None:
                    self._prepared[layer] = prepared

    def _append(self, bank: MemoryBank, live: torch.Tensor | None) -> None:
        """Grow every tier by `bank`'s documents after the ones served (an add of a running
        server: `serving/encode.py`), into the room reserved at load where there is enough
        (`growth.py`). All or nothing: every new tensor is made before any is served, so a
        failure (out of memory) leaves this worker on its generation. Memory Parallel: the
        added documents join the last rank's shard, so no stored row moves between ranks."""
        if "virtual" in bank.manifest:
            raise BankError(f"bank {self.name!r} is virtual: it cannot grow")
        physical = bank.physical
        offsets = physical.doc_chunk_offsets
        old_chunks, chunks = self.chunk_offsets[-1], int(offsets[-1])
        shard = self.shard
        grows = shard.rank == shard.size - 1
        if grows:
            shard = dataclasses.replace(
                shard, documents=slice(shard.documents.start, physical.doc_ids.numel()),
                chunks=slice(shard.chunks.start, chunks))
        new_rows = [(old_chunks, chunks)]
        index, backing, host, maps = {}, {}, {}, {}
        added_keys = self._added_routing_keys(bank, new_rows) if grows else {}
        uploaded: dict[torch.device, torch.Tensor] = {}  # `live` on each device, once
        like = None  # the first layer's prepared tables: every layer's (one layout)
        for layer, idx in self.index.items():
            compressed = isinstance(idx, CompressedRoutingIndex)
            device = (idx.layout if compressed else idx).routing_keys.device
            if device not in maps:  # (the chunk -> document map: the same in every layer)
                maps[device] = (upload_tensor(physical.chunk_doc_index, device),
                                upload_tensor(physical.doc_ids, device))
            doc_index, doc_ids = maps[device]
            added = added_keys.get(layer)
            if added is not None and (idx.normalize if compressed else self.normalized):
                added = normalized_keys(added)
            if compressed:
                keys = idx.keys
                if added is not None:
                    backing[layer], keys = grown_keys(
                        self.index_backing.get(layer, keys), keys.num_chunks,
                        compress(added, keys.dtype_name, keys.shared_scale),
                        self.reserve_chunks)
                layout = RoutingIndex.of_shard(keys.values, doc_index, doc_ids, offsets,
                                               shard, live, uploaded)
                exact = idx.exact
                if isinstance(exact, BankExactKeys):
                    exact = dataclasses.replace(exact, bank=bank)
                index[layer] = dataclasses.replace(
                    CompressedRoutingIndex.build(layout, keys, exact, idx.model_dtype,
                                                 idx.normalize, like), stats=idx.stats)
                like = like or index[layer].prepared
            else:
                routing_keys = idx.routing_keys
                if added is not None:
                    backing[layer], routing_keys = grown(
                        self.index_backing.get(layer, routing_keys), routing_keys.shape[0],
                        added, self.reserve_chunks)
                index[layer] = RoutingIndex.of_shard(routing_keys, doc_index, doc_ids,
                                                     offsets, shard, live, uploaded)
            if self.host_cache is None:
                host[layer] = self._grown_host(bank, layer, new_rows, device.type == "cuda")
        # (from here on nothing allocates: the worker switches at once)
        for layer in index:
            self._prepared.pop(layer, None)
        self.index.update(index)
        self.index_backing.update(backing)
        for layer, (parts, files) in host.items():
            self.host_backing[layer] = {part: whole for part, (whole, _) in parts.items()}
            self.host_keys[layer], self.host_values[layer] = (parts["keys"][1],
                                                              parts["values"][1])
            if f"keys{SCALE_SUFFIX}" in parts:
                self.host_scales[layer] = (parts[f"keys{SCALE_SUFFIX}"][1],
                                           parts[f"values{SCALE_SUFFIX}"][1])
            if files:  # (the old generation's files of this layer: released)
                self.shared_files = [f for f in self.shared_files
                                     if f"-L{layer}-" not in f] + files
        if self.host_cache is not None:
            self.host_cache.grow(bank)
        self.chunk_offsets = offsets.tolist()
        self.shard = shard

    def _added_routing_keys(self, bank: MemoryBank, rows: list[tuple[int, int]]
                            ) -> dict[int, torch.Tensor]:
        """Every router layer's routing keys of the stored chunks `rows`, on the index's
        device: read from the segment files into one host buffer and copied in one go (a
        copy a layer would wait for the GPU once per layer, with requests in flight)."""
        layers = list(self.index)
        first = self.index[layers[0]]
        device = (first.layout if isinstance(first, CompressedRoutingIndex)
                  else first).routing_keys.device
        stacked = torch.stack([bank.read_ranges(layer, "routing_keys", rows)
                               for layer in layers])
        on_device = upload_tensor(stacked, device)
        return dict(zip(layers, on_device.unbind(0), strict=True))

    def _grown_host(self, bank: MemoryBank, layer: int, rows: list[tuple[int, int]],
                    pin: bool) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
        """One layer's host tier (this rank's KV heads, as stored) with `rows` appended, per
        part (allocation, served view), and the shared files made: in the allocation's room
        where it has enough (no copy of the tier; a shared tier is written in place, the same
        bytes by every process that serves the bank), else in a new allocation with room
        again (in shared memory again where the old one was shared; page-locked where
        `pin`, as at load). The old one goes when the last step that read it is gone."""
        share = shared_name(bank) if self.shared_files else None
        files: list[str] = []
        room = self.host_backing.get(layer, {})
        current = {"keys": self.host_keys[layer], "values": self.host_values[layer]}
        if layer in self.host_scales:
            current[f"keys{SCALE_SUFFIX}"], current[f"values{SCALE_SUFFIX}"] = \
                self.host_scales[layer]
        out = {}
        for part, old in current.items():
            added = bank.read_ranges(layer, part, rows, self.kv_heads)
            n, m = old.shape[0], added.shape[0]
            whole = room.get(part)
            if whole is not None and whole.shape[0] >= n + m:
                out[part] = grown(whole, n, added, 0)
                continue

            def fill(target: torch.Tensor, old: torch.Tensor = old,
                     added: torch.Tensor = added) -> None:
                grown(target, 0, old, 0)
                grown(target, old.shape[0], added, 0)

            name = None if share is None else shared_part_name(
                share, layer, part, self.kv_heads, bank.model_info, self.reserve_chunks)
            whole = host_part((n + m + self.reserve_chunks, *old.shape[1:]), old.dtype, fill,
                              name, pin, files)
            out[part] = (whole, whole[:n + m])
        return out, files

    def scales(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The FP8 host tier's (K, V) scales of `layer`; None for a full-precision tier."""
        return self.host_scales.get(layer)

    def prepared_index(self, layer: int) -> Any:
        """The layer's routing index with what the batched routing kernel derives from it
        (document offsets, tie-break ranks), computed once; a compressed index as it is."""
        if isinstance(self.index[layer], CompressedRoutingIndex):
            return self.index[layer]
        prepared = self._prepared.get(layer)
        if prepared is None:
            from ..kernels.routing import prepare_index

            prepared = self._prepared[layer] = prepare_index(
                self.index[layer], next(iter(self._prepared.values()), None))
        return prepared

    @property
    def index_bytes(self) -> int:
        """Device bytes of this rank's routing keys (every router layer)."""
        return sum(idx.nbytes if isinstance(idx, CompressedRoutingIndex)
                   else index_bytes({layer: idx.routing_keys})
                   for layer, idx in self.index.items())

    @property
    def index_dtype(self) -> str:
        """The dtype the routing index is served in ("int8", "fp8_e4m3", or the bank's)."""
        first = next(iter(self.index.values()), None)
        if isinstance(first, CompressedRoutingIndex):
            return first.keys.dtype_name
        return str(self.bank.dtype).removeprefix("torch.")

    def rescore_stats(self) -> dict[str, Any] | None:
        """A compressed index's exact re-scoring so far, summed over its layers."""
        totals = RescoreStats()
        compressed = [idx for idx in self.index.values()
                      if isinstance(idx, CompressedRoutingIndex)]
        if not compressed:
            return None
        for idx in compressed:
            for f in dataclasses.fields(RescoreStats):
                setattr(totals, f.name, getattr(totals, f.name) + getattr(idx.stats, f.name))
        return totals.to_json()

    @property
    def host_bytes(self) -> int:
        """Host bytes of this rank's K̄/V̄ (its KV heads of every document; FP8 scales too;
        the room for live adds included)."""
        scales = [t for pair in self.host_scales.values() for t in pair]
        held = [*self.host_keys.values(), *self.host_values.values(), *scales]
        if self.host_backing:
            held = [t for parts in self.host_backing.values() for t in parts.values()]
        return sum(t.numel() * t.element_size() for t in held)

    @property
    def host_row_bytes(self) -> int:
        """Bytes one chunk of one router layer moves host -> device: its K̄ and V̄ rows of
        this rank's heads, as stored (an FP8 tier's scales included)."""
        layer = next(iter(self.host_keys), None)
        if layer is None:
            return 0
        parts = (self.host_keys[layer], self.host_values[layer], *self.host_scales.get(layer, ()))
        return sum(t[0].numel() * t.element_size() for t in parts)

    @property
    def template_len(self) -> int:
        return len(self.bank.template_ids)

    @property
    def num_documents(self) -> int:
        """Live documents: the most one request selects."""
        return len(self.doc_position)

    @functools.cached_property
    def max_document_chunks(self) -> int:
        """The largest document, in chunks."""
        return int(self._sizes_descending[0]) if self._sizes_descending.size else 0

    def worst_case_chunks(self, top_k: int) -> int:
        """Most chunks one request can stage in one layer: its top-k largest documents."""
        return int(self._sizes_descending[:top_k].sum())

    def chunk_indices(self, doc_ids: list[int]) -> torch.Tensor:
        """Bank-order chunk indices of the given documents, ascending doc id then chunk (the
        host-side list: a reference for the device staging paths, and benchmarks' input)."""
        offsets = self._offsets_array
        pos = np.fromiter((self.doc_position[d] for d in sorted(doc_ids)), dtype=np.int64,
                          count=len(doc_ids))
        return torch.from_numpy(ranges(list(zip(offsets[pos], offsets[pos + 1], strict=True))))

    def selected_chunks(self, doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(first chunk, number of chunks) of each selected document, in bank order: doc_ids
        [R, K] (-1: no document) -> two [R, K] int64, each row in ascending document id (the
        order `chunk_indices` stages in). Device ops only, so the host never waits for the
        routing that produced `doc_ids`."""
        _, starts, counts = self.locate(doc_ids)
        return starts, counts

    def locate(self, doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`selected_chunks` with the documents' stored positions (-1: none) first: what a
        selection needs to be staged again after a later generation removed or replaced
        its documents (`MemoryRequest.located`)."""
        sorted_ids, by_rank, offsets = self._device_tables(doc_ids.device)
        ids = doc_ids.sort(dim=1).values
        rank = torch.searchsorted(sorted_ids, ids).clamp_(max=sorted_ids.numel() - 1)
        position = by_rank[rank]
        starts = offsets[position]
        # (an id this generation does not hold live — none, removed — stages nothing)
        held = (ids >= 0) & (sorted_ids[rank] == ids)
        counts = torch.where(held, offsets[position + 1] - starts, 0)
        return torch.where(held, position, -1), starts, counts

    def _device_tables(self, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(document ids ascending, their positions in bank order, chunk offsets) on
        `device`, built once."""
        tables = self._tables.get(device)
        if tables is None:  # (live documents only: a replaced id's removed copy is not)
            n = len(self.doc_position)
            ids = np.fromiter(self.doc_position.keys(), dtype=np.int64, count=n)
            positions = np.fromiter(self.doc_position.values(), dtype=np.int64, count=n)
            order = np.argsort(ids, kind="stable")
            tables = self._tables[device] = (
                torch.from_numpy(ids[order]).to(device),
                torch.from_numpy(positions[order]).to(device),
                torch.from_numpy(self._offsets_array).to(device))
        return tables

    @functools.cached_property
    def _offsets_array(self) -> np.ndarray:
        return np.asarray(self.chunk_offsets, dtype=np.int64)

    @functools.cached_property
    def _sizes_descending(self) -> np.ndarray:
        """Live documents' sizes in chunks, largest first."""
        sizes = np.diff(self._offsets_array)
        live = np.fromiter(self.doc_position.values(), dtype=np.int64)
        return -np.sort(-sizes[live])
