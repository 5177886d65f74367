"""`MemoryBank`: open, inspect and verify a bank directory.

Opening is cheap and strict: the manifest must exist (a bank whose build never committed has
none), every listed file must be present with its recorded size and its safetensors header
must hold the expected tensors with the expected shapes and dtypes. Full checksums are
`verify()`'s job (they read every byte). Tensors are read lazily, through safetensors only.

A bank object is one generation of the bank (`generations.py`): the manifest it opened. It
holds every file of that generation open from the start, and reads through those
descriptors where the system offers them (/proc/self/fd), so a compaction that deletes the
files of older generations never pulls them from under a reader that still uses one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from .dtypes import SAFETENSORS_DTYPES, SCALE_DTYPE, BankDtypes
from .format import (
    BUILD_STATE,
    COMPRESSED_VERSION,
    DOCUMENTS_FILE,
    FORMAT_NAME,
    LIVE_VERSION,
    MANIFEST,
    POOLED_ORDER,
    READABLE_VERSIONS,
    TEMPLATE_FILE,
    BankError,
    file_problem,
    layer_key,
    read_json,
)
from .layout import PhysicalLayout, physical_layout
from .model_info import ModelInfo
from .quant import FP8, SCALE_SUFFIX, dequantize, fp8_finite


class DocumentRemovedError(BankError, KeyError):
    """A document id the bank held and an edit removed (a KeyError too: callers that drop
    unknown ids drop it the same way)."""

    __str__ = BankError.__str__


@dataclass(frozen=True)
class BankLayer:
    """One router layer's bank tensors, each [num_chunks, num_kv_heads, head_dim], bank order."""

    routing_keys: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor


class MemoryBank:
    """A memory bank, one generation of it (see `vllm_msa.bank.format` for the layout).

    Its documents, tensors and counts (`layer()`, `chunk_doc_ids`, `doc_ids`,
    `doc_num_chunks`, `doc_num_tokens`, `doc_chunk_offsets`, `text()`, `num_documents`,
    `num_chunks`, `num_tokens`, `tier_bytes()`) are the live ones, in bank order: removed
    documents are left out. The raw reads (`read_layer_into`, `read_ranges`,
    `read_segment`, `_mapped`) address the stored chunks, removed ones included; `physical`
    maps those (the two agree on a bank without removals).
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.model_info = ModelInfo.from_json(manifest["model"])
        self._layers: dict[int, BankLayer] = {}
        self._maps: dict[tuple[int, str], torch.Tensor] = {}  # memory-mapped tensors
        self._files_mapped: dict[str, MappedFile] = {}  # (keeps `_MAPPED_FILES` entries)
        self._fds: dict[str, int] = {}  # this generation's files, held open (module doc)

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(
        cls,
        path: str | Path,
        model: str | Path | ModelInfo | None = None,
        *,
        dtype: str | None = None,
    ) -> MemoryBank:
        """Open the bank at `path`; with `model` (a checkpoint or its `ModelInfo`), refuse a
        bank that does not match it (layers, heads, head_dim, pooling size, dtype, fingerprint).
        """
        path = Path(path)
        if not path.is_dir():
            raise BankError(f"no bank at {path}: not a directory")
        if not (path / MANIFEST).exists():
            if (path / BUILD_STATE).exists():
                raise BankError(unfinished_build_message(path))
            raise BankError(f"{path} is not a bank: {MANIFEST} is missing")
        manifest = read_json(path / MANIFEST, "bank manifest")
        _check_manifest(path, manifest)
        if "virtual" in manifest:  # tensors generated on read (`virtual.py`)
            from .virtual import VirtualBank

            cls = VirtualBank
        bank = cls(path, manifest)
        bank._check_files()
        if model is not None:
            if not isinstance(model, ModelInfo):
                model = ModelInfo.from_checkpoint(model, dtype)
            bank.model_info.check_compatible(model, path)
        return bank

    def _check_files(self) -> None:
        for name, meta in self.manifest["files"].items():
            try:
                fd = os.open(self.path / name, os.O_RDONLY)
            except FileNotFoundError:
                raise BankError(f"bank {self.path} is missing {name}") from None
            except OSError as e:  # out of descriptors: the rest are read by path
                if e.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                fd = None
            if fd is not None:
                self._fds[name] = fd
            size = os.fstat(fd).st_size if fd is not None else (self.path / name).stat().st_size
            if size != meta["bytes"]:
                raise BankError(
                    f"bank {self.path}: {name} has {size} bytes, the manifest "
                    f"says {meta['bytes']} (truncated or replaced)"
                )
        info = self.model_info
        kv_shape = (info.num_kv_heads, info.head_dim)
        model_dtype = getattr(torch, info.dtype)

        def segment_tensors(chunks: int, documents: int) -> dict[str, tuple]:
            expected = {key: (shape, dtype) for layer in info.router_layers
                        for key, dtype, shape in self.dtypes.layer_tensors(
                            layer, chunks, *kv_shape)}
            expected["chunk_doc_ids"] = ((chunks,), torch.int64)
            for name in ("doc_ids", "doc_num_chunks", "doc_num_tokens"):
                expected[name] = ((documents,), torch.int64)
            return expected

        for seg in self.manifest["segments"]:
            chunks, documents = int(seg["chunks"]), int(seg["documents"])
            self._check_header(seg["file"], ("segment", info, self.dtypes, chunks, documents),
                               lambda c=chunks, d=documents: segment_tensors(c, d))
        t = self.manifest["counts"]["template_tokens"]

        def template_tensors() -> dict[str, tuple]:
            expected = {"template_ids": ((t,), torch.int64)}
            for layer in range(info.num_layers):
                expected[layer_key(layer, "keys")] = ((t, *kv_shape), model_dtype)
                expected[layer_key(layer, "values")] = ((t, *kv_shape), model_dtype)
            return expected

        self._check_header(TEMPLATE_FILE, ("template", info, t), template_tensors)

    def _check_header(self, name: str, shapes: tuple,
                      expected: Callable[[], dict[str, tuple[tuple[int, ...], torch.dtype]]]
                      ) -> None:
        """Check file `name`'s header against `expected()`, once per file identity and
        `shapes` (what `expected` depends on): an edit's next generation re-checks only
        its new files."""
        identity = self._identity(name)
        signature = (identity, shapes)
        if identity is not None and signature in _CHECKED_HEADERS:
            return
        self._check_header_of(name, expected())
        if identity is not None:
            _CHECKED_HEADERS.add(signature)

    def _identity(self, name: str) -> tuple[int, int, int, int] | None:
        """What makes a bank file the same file: bank files are written once and replaced
        only by a new file (`format.write_atomic`), so device, inode, size and mtime name its
        content for the process-wide caches of what open re-reads (`_TABLES`)."""
        fd = self._fds.get(name)
        try:
            st = os.fstat(fd) if fd is not None else (self.path / name).stat()
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    def _check_header_of(self, name: str,
                         expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        try:
            with safe_open(self._file(name), framework="pt") as f:
                keys = set(f.keys())
                if keys != set(expected):
                    raise BankError(
                        f"bank {self.path}: {name} holds tensors {sorted(keys)}, "
                        f"expected {sorted(expected)}"
                    )
                for key, (shape, dtype) in expected.items():
                    sl = f.get_slice(key)
                    got = tuple(sl.get_shape())
                    if got != shape:
                        raise BankError(
                            f"bank {self.path}: {name}:{key} has shape {got}, expected {shape}"
                        )
                    want_dtype = _ST_NAMES[dtype]
                    if sl.get_dtype() != want_dtype:
                        raise BankError(
                            f"bank {self.path}: {name}:{key} has dtype {sl.get_dtype()}, "
                            f"expected {want_dtype}"
                        )
        except BankError:
            raise
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise BankError(
                f"bank {self.path}: {name} is not a valid safetensors file: {e}"
            ) from None

    def _file(self, name: str) -> Path:
        """Where to read bank file `name`: through the descriptor this generation holds
        (the file even after a compaction deleted its name), else by its path."""
        fd = self._fds.get(name)
        if fd is not None and _PROC_FD.is_dir():
            return _PROC_FD / str(fd)
        return self.path / name

    def release_mappings(self) -> None:
        """Drop the memory-mapped rows read so far (they are mapped again when read)."""
        self._maps.clear()
        self._files_mapped.clear()

    def close(self) -> None:
        """Release this generation's files (and the memory-mapped rows read from them)."""
        if hasattr(self, "_maps"):
            self.release_mappings()
        fds, self._fds = getattr(self, "_fds", {}), {}
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        try:  # noqa: SIM105 - at interpreter exit contextlib itself may be gone
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict[str, Any]:
        # Descriptors and mappings belong to this process: another one opens its own.
        return {**self.__dict__, "_fds": {}, "_maps": {}, "_files_mapped": {}}

    # ----------------------------------------------------------------- facts
    @property
    def router_layers(self) -> list[int]:
        return list(self.model_info.router_layers)

    @property
    def generation(self) -> int:
        """The generation this object opened: 0 for a bank never edited (`generations.py`)."""
        return int(self.manifest.get("generation", 0))

    @property
    def num_documents(self) -> int:
        """Live documents."""
        return self.manifest["counts"]["documents"]

    @property
    def num_chunks(self) -> int:
        """Chunks of live documents."""
        return self.manifest["counts"]["chunks"]

    @property
    def num_tokens(self) -> int:
        """Tokens of live documents."""
        return self.manifest["counts"]["tokens"]

    @property
    def removed_counts(self) -> dict[str, int]:
        """Documents, chunks and tokens that removals leave in the files until a
        compaction."""
        removed = self.manifest["counts"].get("removed") or {}
        return {k: int(removed.get(k, 0)) for k in ("documents", "chunks", "tokens")}

    @property
    def has_removals(self) -> bool:
        return self.removed_counts["documents"] > 0

    @property
    def physical_chunks(self) -> int:
        """Stored chunks, removed ones included: what the raw reads address."""
        return self.num_chunks + self.removed_counts["chunks"]

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype: what `layer()` returns and a full-precision tier holds."""
        return getattr(torch, self.model_info.dtype)

    @cached_property
    def dtypes(self) -> BankDtypes:
        """The stored dtype of each tier (`dtypes.py`)."""
        return BankDtypes.from_manifest(self.manifest, self.path)

    def stored_dtype(self, name: str) -> torch.dtype:
        """The dtype `read_layer_into` reads pooled tensor `name` in (its scales, for
        `name + ".scale"`, are float32)."""
        if name.endswith(SCALE_SUFFIX):
            return SCALE_DTYPE
        return getattr(torch, self.dtypes.of(name))

    # ----------------------------------------------------------------- tensors
    def _read(self, name: str, key: str) -> torch.Tensor:
        with safe_open(self._file(name), framework="pt") as f:
            return f.get_tensor(key)

    def _concat(self, key: str) -> torch.Tensor:
        """Tensor `key` of every segment, concatenated: stored rows, removed ones included."""
        files = [seg["file"] for seg in self.manifest["segments"]]
        if key not in TABLE_KEYS:
            return torch.cat([self._read(name, key) for name in files])
        identities = tuple(self._identity(name) for name in files)
        whole = _TABLES.get((identities, key)) if None not in identities else None
        if whole is None:  # (a removal keeps the segments: the same tables again)
            whole = torch.cat([self._read_table(name, key) for name in files])
            if None not in identities:
                _TABLES[(identities, key)] = whole
        return whole

    def _read_table(self, name: str, key: str) -> torch.Tensor:
        """A segment's document/chunk table, read once per process for each file (an edit
        reopens the bank several times, and every worker once per generation: re-reading
        every segment's tables made a removal from a 10M-token bank cost tens of ms)."""
        identity = self._identity(name)
        cached = _TABLES.get((identity, key)) if identity is not None else None
        if cached is None:
            cached = self._read(name, key)
            if identity is not None:
                _TABLES[(identity, key)] = cached
                while len(_TABLES) > _MAX_TABLES:
                    _TABLES.pop(next(iter(_TABLES)))
        return cached

    def _pooled(self, layer: int, name: str) -> torch.Tensor:
        """A pooled tensor of every live chunk in the model's dtype (FP8 tiers
        dequantised)."""
        key = layer_key(layer, name)
        if not self.dtypes.scaled(name):
            return self._live_chunks(self._concat(key))
        return dequantize(self._live_chunks(self._concat(key)),
                          self._live_chunks(self._concat(key + SCALE_SUFFIX)), self.dtype)

    def _live_chunks(self, stored: torch.Tensor) -> torch.Tensor:
        return stored[self.physical.live_chunks] if self.has_removals else stored

    def _live_docs(self, stored: torch.Tensor) -> torch.Tensor:
        return stored[self.physical.live] if self.has_removals else stored

    def read_layer_into(self, layer: int, name: str, out: torch.Tensor,
                        kv_heads: slice = slice(None),
                        on_segment: Callable[[str, torch.Tensor], Any] | None = None,
                        chunks: slice | None = None) -> torch.Tensor:
        """Router layer `layer`'s `name` tensor ("routing_keys", "keys" or "values"), KV heads
        `kv_heads`, chunks `chunks` (all by default; a shard of the routing index reads its
        own; stored chunks, removed ones included: `physical`), written into `out`
        ([chunks, heads, head_dim], any device) one segment
        at a time: the only temporary is one segment's slice, where `layer()` builds the
        whole tensor (and a copy of it to concatenate) before the caller copies it again;
        segments outside `chunks` are not read. `on_segment(where, part)`: called with each
        segment's part of `out` once written, e.g. to refuse NaN or infinite values
        (`check_finite_part`: a checksum proves the bytes are what was written, not that
        they are numbers)."""
        if layer not in self.model_info.router_layers:
            raise KeyError(f"layer {layer} is not a router layer of this bank "
                           f"(router layers: {self.router_layers})")
        total = self.physical_chunks
        first, stop = ((0, total) if chunks is None
                       else (chunks.start or 0, total if chunks.stop is None else chunks.stop))
        key, start, written = layer_key(layer, name), 0, 0
        for seg in self.manifest["segments"]:
            seg_start, seg_stop = start, start + int(seg["chunks"])
            start = seg_stop
            lo, hi = max(first, seg_start), min(stop, seg_stop)
            if lo >= hi:
                continue
            with safe_open(self._file(seg["file"]), framework="pt") as f:
                part = f.get_tensor(key)  # (safetensors' own slicing is slower)
            if part.shape[0] != seg_stop - seg_start:
                raise BankError(f"bank {self.path}: {seg['file']}:{key} has {part.shape[0]} "
                                f"chunks, the manifest says {seg_stop - seg_start}")
            part = part[lo - seg_start:hi - seg_start, kv_heads]
            target = out[written:written + part.shape[0]]
            target.copy_(part)
            if on_segment is not None:
                on_segment(f"{seg['file']}:{key}", target)
            written += part.shape[0]
        if written != out.shape[0] or stop - first != written:
            raise BankError(f"bank {self.path}: {key} has {written} chunks, expected "
                            f"{out.shape[0]}")
        return out

    def read_ranges(self, layer: int, name: str, ranges: list[tuple[int, int]],
                    kv_heads: slice = slice(None), device: Any = None) -> torch.Tensor:
        """Stored chunks lo:hi (`physical` numbering) of each range (any run of chunks: one
        crossing segments is read from each in turn) of router layer `layer`'s tensor `name`
        (a pooled tensor or its `.scale`), in its stored dtype, KV heads `kv_heads`,
        concatenated: read from the memory-mapped segment files, so only those rows leave
        the page cache or the disk (the disk tier, `attention/host_cache.py`), into host
        memory. (`device`: where a virtual bank generates them; a bank of files reads to
        the host whatever it says.)"""
        key = layer_key(layer, name)
        starts = self._segment_starts
        parts = []
        for lo, hi in ranges:
            if not 0 <= lo <= hi <= starts[-1]:
                raise BankError(f"bank {self.path}: chunks {lo}:{hi} are outside its "
                                f"{starts[-1]} stored chunks")
            seg = int(np.searchsorted(starts, lo, side="right")) - 1
            while lo < hi:  # (the candidates' runs of neighbouring documents span segments)
                stop = min(hi, int(starts[seg + 1]))
                parts.append(self._mapped(seg, key)[lo - starts[seg]:stop - starts[seg],
                                                    kv_heads])
                lo, seg = stop, seg + 1
        if not parts:
            return torch.empty((0,), dtype=self.stored_dtype(name))
        return torch.cat(parts)

    @cached_property
    def _segment_starts(self) -> np.ndarray:
        chunks = [int(seg["chunks"]) for seg in self.manifest["segments"]]
        return np.concatenate([[0], np.cumsum(chunks)]).astype(np.int64)

    def _mapped(self, seg: int, key: str) -> torch.Tensor:
        """Tensor `key` of segment `seg`, memory-mapped (copy-on-write: never written)."""
        cache = self._maps
        if (seg, key) not in cache:
            mapped = self._mapped_file(self.manifest["segments"][seg]["file"])
            meta = mapped.header[key]
            lo, hi = meta["data_offsets"]
            raw = mapped.raw[mapped.data_start + lo:mapped.data_start + hi]
            dtype = _TORCH_DTYPES[meta["dtype"]]
            cache[(seg, key)] = torch.from_numpy(raw).view(dtype).view(meta["shape"])
        return cache[(seg, key)]

    def _mapped_file(self, name: str) -> MappedFile:
        """Bank file `name` mapped once, with its parsed header: shared by every generation
        of this process that holds the same file (a live edit's next generation reads the
        new segment's rows without re-mapping the stored ones: `_identity`)."""
        identity = self._identity(name)
        mapped = _MAPPED_FILES.get(identity) if identity is not None else None
        if mapped is None:
            path = self._file(name)
            with open(path, "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(size))
            mapped = MappedFile(np.memmap(path, dtype=np.uint8, mode="c"), header, 8 + size)
            if identity is not None:
                _MAPPED_FILES[identity] = mapped
        self._files_mapped[name] = mapped
        return mapped

    def read_segment(self, index: int) -> tuple[dict[str, list[int]],
                                                 dict[int, dict[str, torch.Tensor]]]:
        """Segment `index` as a writer takes it: its document tables ("doc_ids",
        "doc_num_tokens", "doc_num_chunks") and every router layer's pooled tensors in the
        model's dtype (FP8 tiers dequantised); every stored document, removed ones
        included (`physical.live` says which)."""
        seg = self.manifest["segments"][index]
        with safe_open(self._file(seg["file"]), framework="pt") as f:
            tables = {name: f.get_tensor(name).tolist()
                      for name in ("doc_ids", "doc_num_tokens", "doc_num_chunks")}
            layers = {}
            for layer in self.router_layers:
                layers[layer] = {}
                for name in POOLED_ORDER:
                    t = f.get_tensor(layer_key(layer, name))
                    if self.dtypes.scaled(name):
                        t = dequantize(t, f.get_tensor(layer_key(layer, name) + SCALE_SUFFIX),
                                       self.dtype)
                    layers[layer][name] = t
        return tables, layers

    def check_finite_part(self, where: str, part: torch.Tensor) -> None:
        """Refuse `part` (the tensor `where` of this bank, or a piece of it) if it holds NaN
        or infinite values."""
        if not all_finite(part):
            raise BankError(f"bank {self.path}: {where} holds non-finite values (NaN or inf); "
                            "the bank cannot be served: rebuild it")

    def layer(self, layer: int, cache: bool = True) -> BankLayer:
        """Routing keys K̄r, keys K̄ and values V̄ of router layer `layer`, in the model's
        dtype (an FP8 tier dequantised: exactly what serving stages); loaded on first use,
        `cache=False` reads without keeping them, for callers that copy them elsewhere."""
        if layer not in self.model_info.router_layers:
            raise KeyError(f"layer {layer} is not a router layer of this bank "
                           f"(router layers: {self.router_layers})")
        if layer in self._layers:
            return self._layers[layer]
        tensors = BankLayer(**{name: self._pooled(layer, name) for name in POOLED_ORDER})
        if cache:
            self._layers[layer] = tensors
        return tensors

    @cached_property
    def physical(self) -> PhysicalLayout:
        """The stored documents and chunks, removed ones included, with a live flag per
        document (`layout.py`): what the raw reads (`read_layer_into`, `read_ranges`,
        `read_segment`, the memory-mapped rows) address. Serving a bank with removals from
        those reads masks the chunks whose `live_chunks` flag is False; on a bank without
        removals every flag is True and the layout equals the live view."""
        return physical_layout(self.path, self.manifest["segments"], self._concat("doc_ids"),
                               self._concat("doc_num_chunks"), self._concat("doc_num_tokens"),
                               self._concat("chunk_doc_ids"))

    @cached_property
    def chunk_doc_ids(self) -> torch.Tensor:
        """[num_chunks] int64: the document id of each live chunk."""
        return self._live_chunks(self.physical.chunk_doc_ids)

    @cached_property
    def doc_num_chunks(self) -> torch.Tensor:
        return self._live_docs(self.physical.doc_num_chunks)

    @cached_property
    def doc_num_tokens(self) -> torch.Tensor:
        return self._live_docs(self.physical.doc_num_tokens)

    @cached_property
    def doc_chunk_offsets(self) -> torch.Tensor:
        """[num_documents + 1] int64: live document i owns chunks offsets[i]:offsets[i + 1]
        of the live view (`layer()`, `chunk_doc_ids`)."""
        offsets = torch.zeros(self.num_documents + 1, dtype=torch.int64)
        torch.cumsum(self.doc_num_chunks, 0, out=offsets[1:])
        return offsets

    @cached_property
    def doc_ids(self) -> list[int]:
        """Live document ids in bank order."""
        return self._live_docs(self.physical.doc_ids).tolist()

    @cached_property
    def _texts(self) -> dict[int, str]:
        """Texts of the live documents, read from the documents file of each segment's
        generation (a build's `documents.jsonl`, an edit's file per segment)."""
        segments = self.manifest["segments"]
        if not self.has_removals and not any("texts" in seg for seg in segments):
            return _read_texts(self._file(DOCUMENTS_FILE))
        wanted: dict[str, set[int]] = {}
        ids, live, start = self.physical.doc_ids.tolist(), self.physical.live.tolist(), 0
        for seg in segments:
            n = int(seg["documents"])
            wanted.setdefault(seg.get("texts", DOCUMENTS_FILE), set()).update(
                i for i, alive in zip(ids[start:start + n], live[start:start + n],
                                      strict=True) if alive)
            start += n
        texts: dict[int, str] = {}
        for name, keep in wanted.items():
            if keep:
                texts.update((i, t) for i, t in _read_texts(self._file(name)).items()
                             if i in keep)
        return texts

    def text(self, doc_id: int) -> str:
        """The original text of live document `doc_id` (Memory Interleave appends it); a
        removed one raises `DocumentRemovedError` naming it."""
        try:
            return self._texts[doc_id]
        except KeyError:
            pass
        if self.has_removals and doc_id in self.physical.doc_ids.tolist():
            raise DocumentRemovedError(f"document {doc_id} was removed from bank {self.path} "
                                       f"(generation {self.generation})") from None
        raise KeyError(f"document {doc_id} is not in bank {self.path}") from None

    @cached_property
    def template_ids(self) -> list[int]:
        return self._read(TEMPLATE_FILE, "template_ids").tolist()

    def template_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Template-head K and V of `layer` (any layer), each [T, num_kv_heads, head_dim]."""
        if not 0 <= layer < self.model_info.num_layers:
            raise KeyError(f"layer {layer} out of range [0, {self.model_info.num_layers})")
        return (self._read(TEMPLATE_FILE, layer_key(layer, "keys")),
                self._read(TEMPLATE_FILE, layer_key(layer, "values")))

    # ----------------------------------------------------------------- checks and sizes
    def verify(self, workers: int | None = None) -> list[str]:
        """Re-hash every data file, several at once (the hashes release the GIL), by BLAKE3
        where the manifest has it, else sha256; returns the problems found, one line per
        file (empty when the bank is intact)."""
        files = sorted(self.manifest["files"].items())
        workers = workers or min(8, os.cpu_count() or 1, max(len(files), 1))
        with ThreadPoolExecutor(workers, thread_name_prefix="bank-verify") as pool:
            found = pool.map(lambda item: file_problem(self._file(item[0]), item[1]), files)
            problems = [f"{name}: {problem}" for (name, _), problem in zip(files, found,
                                                                           strict=True)
                        if problem]
        if not problems and self.has_removals:
            try:  # tombstones name documents their segments hold
                self.physical  # noqa: B018
            except BankError as e:
                problems.append(str(e))
        return problems

    def tier_bytes(self, chunks: int | None = None) -> dict[str, int]:
        """Bytes per tier: the GPU index (routing keys + chunk→document map) and the host tier
        (K̄/V̄ fetched on demand) of the live chunks (or of `chunks` chunks), plus the
        template K/V."""
        info = self.model_info
        chunks = self.num_chunks if chunks is None else chunks
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        values = chunks * info.num_kv_heads * info.head_dim * len(info.router_layers)
        template = 2 * info.num_layers * self.manifest["counts"]["template_tokens"] * (
            info.num_kv_heads * info.head_dim * itemsize
        )
        per_value = {name: self.dtypes.element_bytes(name, info.head_dim)
                     for name in POOLED_ORDER}
        return {
            "gpu_index": round(values * per_value["routing_keys"]) + chunks * 8,
            "host_kv": round(values * (per_value["keys"] + per_value["values"])),
            "template": template,
        }


# A float is NaN or infinite exactly when its exponent bits are all ones.
_EXPONENT_BITS = {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00)}


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of `t` (contiguous) is finite, at memory speed: on a GPU by
    `isfinite`; on the host, where `isfinite` makes a bool tensor at ~1 GB/s a core, by the
    exponent bits of 16-bit floats (one masked max), and for fp32 by the sum (NaN and inf
    survive a sum; a sum that overflows from finite values is re-checked exactly)."""
    if t.numel() == 0:
        return True
    if t.dtype == FP8:
        return fp8_finite(t)
    if t.is_cuda or t.dtype not in (*_EXPONENT_BITS, torch.float32):
        return bool(torch.isfinite(t).all())
    if t.dtype == torch.float32:
        return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
    int_dtype, mask = _EXPONENT_BITS[t.dtype]
    return int(torch.bitwise_and(t.view(int_dtype), mask).amax()) != mask


def removed_bytes(bank: MemoryBank) -> int:
    """Bytes of segment data that removed documents still hold (their routing keys, K̄/V̄
    and chunk map; texts aside) until a compaction."""
    tiers = bank.tier_bytes(bank.removed_counts["chunks"])
    return tiers["gpu_index"] + tiers["host_kv"]


def _read_texts(path: Path) -> dict[int, str]:
    texts = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            texts[obj["id"]] = obj["text"]
    return texts


_PROC_FD = Path("/proc/self/fd")
# Process-wide caches keyed by a file's identity (`MemoryBank._identity`): segment tables
# (`_read_table`, small: 8 bytes a chunk or document) and headers that checked out.
TABLE_KEYS = frozenset({"doc_ids", "doc_num_chunks", "doc_num_tokens", "chunk_doc_ids"})
_TABLES: dict[tuple, torch.Tensor] = {}
_MAX_TABLES = 4096
_CHECKED_HEADERS: set[tuple] = set()


@dataclass(eq=False)
class MappedFile:
    """A bank file memory-mapped whole (copy-on-write), with its safetensors header."""

    raw: np.ndarray  # uint8 memmap of the file
    header: dict[str, Any]
    data_start: int  # where the tensors' data_offsets count from


# Mapped files by identity, alive while some open generation holds them (`_mapped_file`).
_MAPPED_FILES: weakref.WeakValueDictionary[tuple, MappedFile] = weakref.WeakValueDictionary()


def unfinished_build_message(path: Path) -> str:
    """What to do with a directory that holds an unfinished build: re-run the same command
    to resume it, unless the build recorded why it stopped (then the fix comes first)."""
    try:
        stopped = read_json(path / BUILD_STATE, "build state").get("stopped")
    except BankError:
        stopped = None
    if isinstance(stopped, dict) and stopped.get("reason"):
        return (f"{path} is an unfinished bank build (no {MANIFEST}); it stopped because "
                f"{stopped['reason']}: {stopped.get('advice', 'fix that, then re-run')}")
    return (f"{path} is an unfinished bank build (no {MANIFEST}); re-run the same "
            "`vllm-msa bank build` (or `bank synth`) command to finish it")


_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_ST_NAMES = {getattr(torch, name): st for name, st in SAFETENSORS_DTYPES.items()}
_ST_NAMES[torch.int64] = "I64"
_TORCH_DTYPES = {st: dtype for dtype, st in _ST_NAMES.items()}


def _check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    if manifest.get("format") != FORMAT_NAME:
        raise BankError(f"{path}/{MANIFEST} is not a vllm-msa bank manifest")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise BankError(
            f"bank {path} has format version {version}; this vllm-msa reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}: rebuild the bank or use a matching "
            "vllm-msa"
        )
    for key in ("model", "counts", "segments", "files"):
        if key not in manifest:
            raise BankError(f"bank {path}: manifest lacks {key!r}")
    for name in manifest["files"]:
        # File names come from the manifest: never let one point outside the bank.
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BankError(f"bank {path}: manifest names a file outside the bank: {name!r}")
    generation = manifest.get("generation", 0)
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
        raise BankError(f"bank {path}: malformed generation {generation!r} in its manifest")
    if generation and version < LIVE_VERSION:
        raise BankError(f"bank {path}: format version {version} cannot hold generations")
    for seg in manifest["segments"]:
        for key in ("file", "texts"):
            if key in seg and seg[key] not in manifest["files"]:
                raise BankError(f"bank {path}: segment {key} {seg[key]!r} has no checksum "
                                "entry")
        if "file" not in seg:
            raise BankError(f"bank {path}: a segment without a file in its manifest")
        removed = seg.get("removed", [])
        if not isinstance(removed, list) or len(set(removed)) != len(removed) or any(
                isinstance(i, bool) or not isinstance(i, int) for i in removed):
            raise BankError(f"bank {path}: segment {seg['file']} has a malformed removed "
                            "list")
    total = sum(seg["documents"] - len(seg.get("removed", [])) for seg in manifest["segments"])
    if total != manifest["counts"].get("documents") and "virtual" not in manifest:
        raise BankError(f"bank {path}: segments hold {total} live documents, counts say "
                        f"{manifest['counts'].get('documents')}")
    try:
        ModelInfo.from_json(manifest["model"])
    except (TypeError, KeyError) as e:
        raise BankError(f"bank {path}: malformed model section in manifest ({e})") from None
    if manifest["model"].get("dtype") not in _SAFETENSORS_DTYPES:
        raise BankError(f"bank {path}: unsupported dtype {manifest['model'].get('dtype')!r}")
    dtypes = BankDtypes.from_manifest(manifest, path)
    if dtypes.compressed and version < COMPRESSED_VERSION:
        raise BankError(f"bank {path}: format version {version} cannot hold FP8 tiers")
