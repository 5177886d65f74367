"""Virtual synthetic banks: a manifest only; the tiers are generated when the bank is opened.

Capacity and speed work at 100M tokens needs a bank of that shape, and such a bank is ~170 GB
on disk in bf16: more than many machines have (the lent GPU machine has 64 GiB). A virtual
bank (`vllm-msa bank synth --virtual`) writes `manifest.json` alone; reading a tensor
(`read_layer_into`, `layer`, `template_kv`) generates it, straight into the buffer serving
reads, on the GPU when there is one. It serves like any bank and is marked SYNTHETIC (and
virtual) wherever a bank is described: `bank info`, the start-up log, `msa_state()`.

Values are a pure function of (seed, tensor, element): a 32-bit integer hash of the element's
index gives four 16-bit uniforms whose sum, centred and scaled by 2^-15, is a bell-shaped
value of standard deviation ~1.15 (Irwin-Hall, bounded by 4). Integer ops and an exact
scaling make it bit-identical on every device and for every way of slicing it (a shard of
chunks, a rank's KV heads), so tensor-parallel ranks, the host and device tiers and the
tests' reference all see the same bank.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .format import MANIFEST, POOLED_ORDER, BankError, write_json_atomic
from .layout import PhysicalLayout
from .quant import SCALE_SUFFIX, dequantize, quantize
from .reader import BankLayer, MemoryBank

GENERATOR = "irwin-hall-4/hash32/1"  # bump when the generated values change
_M32 = 0xFFFFFFFF
_BLOCK_ELEMS = 1 << 24  # values generated at once (the temporaries are int64)


def _salt(*key: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=4).digest(), "little")


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (in place on an int64 tensor holding values < 2^32)."""
    x ^= x >> 16
    x.mul_(0x45D9F3B).bitwise_and_(_M32)
    x ^= x >> 16
    x.mul_(0x45D9F3B).bitwise_and_(_M32)
    x ^= x >> 16
    return x


def generate(seed: int, tensor: str, index: torch.Tensor) -> torch.Tensor:
    """float32 values of tensor `tensor` at the int64 element indices `index` (any shape)."""
    salt, mix = _salt(seed, tensor, 0), _salt(seed, tensor, 1)
    h1 = _hash32((index & _M32) ^ salt)
    h1 ^= index >> 32
    h1 = _hash32(h1)
    h2 = _hash32(h1 ^ mix)
    total = (h1 & 0xFFFF) + (h1 >> 16) + (h2 & 0xFFFF) + (h2 >> 16)
    return (total - 2 * 0xFFFF).to(torch.float32).mul_(2.0**-15)


def generate_rows(seed: int, tensor: str, rows: range | torch.Tensor, heads: range,
                  num_heads: int, head_dim: int, device: torch.device) -> torch.Tensor:
    """[rows, heads, head_dim] float32 of a [*, num_heads, head_dim] tensor (`rows`: a range,
    or int64 row numbers)."""
    r = (rows.to(device) if torch.is_tensor(rows)
         else torch.arange(rows.start, rows.stop, device=device))
    h = torch.arange(heads.start, heads.stop, device=device)
    d = torch.arange(head_dim, device=device)
    index = (r[:, None, None] * num_heads + h[None, :, None]) * head_dim + d[None, None, :]
    return generate(seed, tensor, index)


class VirtualBank(MemoryBank):
    """A bank whose tensors are generated on read (module docstring)."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        super().__init__(path, manifest)
        # An FP8 tier's scales, kept from generating its values until they are read.
        self._scales: dict[tuple, torch.Tensor] = {}

    def _check_files(self) -> None:
        v = self.manifest.get("virtual")
        if not isinstance(v, dict) or v.get("generator") != GENERATOR:
            raise BankError(f"bank {self.path}: virtual bank of generator "
                            f"{(v or {}).get('generator')!r}; this vllm-msa generates "
                            f"{GENERATOR!r}: synthesise it again")

    # ----------------------------------------------------------------- layout
    @property
    def _virtual(self) -> dict[str, Any]:
        return self.manifest["virtual"]

    def _doc_tokens(self) -> torch.Tensor:
        n, per = self.num_documents, self._virtual["doc_tokens"]
        tokens = torch.full((n,), per, dtype=torch.int64)
        tokens[-1] = self.num_tokens - (n - 1) * per
        return tokens

    def _concat(self, key: str) -> torch.Tensor:
        if key == "doc_ids":
            return torch.arange(self.num_documents, dtype=torch.int64)
        if key == "doc_num_tokens":
            return self._doc_tokens()
        if key == "doc_num_chunks":
            pooling = self.model_info.pooling_kernel_size
            return -(-self._doc_tokens() // pooling)
        if key == "chunk_doc_ids":
            return torch.repeat_interleave(torch.arange(self.num_documents),
                                           self._concat("doc_num_chunks"))
        raise KeyError(key)

    @cached_property
    def physical(self) -> PhysicalLayout:
        """Its documents as one run, none removed (a virtual bank is never edited)."""
        n = self.num_documents
        return PhysicalLayout(self._concat("doc_ids"), self._concat("doc_num_chunks"),
                              self._concat("doc_num_tokens"), self._concat("chunk_doc_ids"),
                              torch.ones(n, dtype=torch.bool), (n,))

    @property
    def template_ids(self) -> list[int]:
        return list(self.manifest["template_ids"])

    def text(self, doc_id: int) -> str:
        from .synth import document_text

        if not 0 <= doc_id < self.num_documents:
            raise KeyError(f"document {doc_id} is not in bank {self.path}")
        return document_text(doc_id)

    def verify(self, workers: int | None = None) -> list[str]:
        return []  # nothing is stored: nothing can be damaged

    def read_segment(self, index: int):
        raise BankError(f"bank {self.path} is virtual: it has no files to read or convert; "
                        "synthesise it with the --bank-dtype you want")

    # ----------------------------------------------------------------- tensors
    def _full(self, layer: int, name: str, rows: range | torch.Tensor, heads: range,
              device: torch.device) -> torch.Tensor:
        """The full-precision values of pooled tensor `name` (model dtype)."""
        info = self.model_info
        source = "keys" if name == "routing_keys" and not info.decouple_router else name
        values = generate_rows(self._virtual["seed"], f"layer.{layer}.{source}", rows, heads,
                               info.num_kv_heads, info.head_dim, device)
        if name == "routing_keys" and info.normalized_routing_keys:
            values = torch.nn.functional.normalize(values.double(), dim=-1).float()
        return values.to(self.dtype)

    def _stored(self, layer: int, name: str, rows: range, heads: range,
                device: torch.device) -> torch.Tensor:
        """Tensor `name` (or `<name>.scale`) as a stored bank would hold it."""
        base = name.removesuffix(SCALE_SUFFIX)
        key = (layer, base, rows.start, rows.stop, heads.start, heads.stop)
        if name.endswith(SCALE_SUFFIX) and key in self._scales:
            return self._scales.pop(key).to(device)  # made with the values: not generated twice
        values = self._full(layer, base, rows, heads, device)
        if not self.dtypes.scaled(base):
            return values
        q, scale = quantize(values)
        if name.endswith(SCALE_SUFFIX):
            return scale
        if any(k[0] != layer for k in self._scales):
            self._scales.clear()  # scales are read layer by layer: keep one layer's at most
        self._scales[key] = scale.cpu()  # (read next: the host tier reads values, then scales)
        return q

    def read_layer_into(self, layer: int, name: str, out: torch.Tensor,
                        kv_heads: slice = slice(None),
                        on_segment: Callable[[str, torch.Tensor], Any] | None = None,
                        chunks: slice | None = None) -> torch.Tensor:
        """As `MemoryBank.read_layer_into`, generating the values block by block (on the
        GPU when there is one; a host `out` receives each block)."""
        if layer not in self.model_info.router_layers:
            raise KeyError(f"layer {layer} is not a router layer of this bank "
                           f"(router layers: {self.router_layers})")
        info = self.model_info
        first = 0 if chunks is None or chunks.start is None else chunks.start
        stop = self.num_chunks if chunks is None or chunks.stop is None else chunks.stop
        heads = range(info.num_kv_heads)[kv_heads]
        if out.shape[0] != stop - first:
            raise BankError(f"bank {self.path}: {name} has {stop - first} chunks here, "
                            f"expected {out.shape[0]}")
        device = out.device if out.is_cuda or not torch.cuda.is_available() else \
            torch.device("cuda")
        block = max(1, _BLOCK_ELEMS // (info.num_kv_heads * info.head_dim))
        for lo in range(first, stop, block):
            hi = min(stop, lo + block)
            target = out[lo - first:hi - first]
            target.copy_(self._stored(layer, name, range(lo, hi), heads, device))
            if on_segment is not None:
                on_segment(f"virtual:layer.{layer}.{name}[{lo}:{hi}]", target)
        return out

    def read_ranges(self, layer: int, name: str, ranges: list[tuple[int, int]],
                    kv_heads: slice = slice(None), device: Any = None) -> torch.Tensor:
        """As `MemoryBank.read_ranges`, generated on `device` (the host by default); a
        full-precision tensor in one pass over all the ranges' rows."""
        heads = range(self.model_info.num_kv_heads)[kv_heads]
        device = torch.device(device or "cpu")
        if name.endswith(SCALE_SUFFIX) or self.dtypes.scaled(name):
            return torch.cat([self._stored(layer, name, range(lo, hi), heads, device)
                              for lo, hi in ranges])
        starts = torch.tensor([lo for lo, _ in ranges], dtype=torch.int64)
        counts = torch.tensor([hi - lo for lo, hi in ranges], dtype=torch.int64)
        first = torch.cumsum(counts, 0) - counts  # each range's first output row
        rows = torch.arange(int(counts.sum())) + torch.repeat_interleave(starts - first, counts)
        return self._full(layer, name, rows, heads, device)

    def _pooled(self, layer: int, name: str) -> torch.Tensor:
        rows, heads = range(self.num_chunks), range(self.model_info.num_kv_heads)
        if not self.dtypes.scaled(name):
            return self._full(layer, name, rows, heads, torch.device("cpu"))
        device = torch.device("cpu")
        return dequantize(self._stored(layer, name, rows, heads, device),
                          self._stored(layer, name + SCALE_SUFFIX, rows, heads, device),
                          self.dtype)

    def layer(self, layer: int, cache: bool = True) -> BankLayer:
        if layer not in self.model_info.router_layers:
            raise KeyError(f"layer {layer} is not a router layer of this bank "
                           f"(router layers: {self.router_layers})")
        return BankLayer(**{name: self._pooled(layer, name) for name in POOLED_ORDER})

    def template_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        info = self.model_info
        if not 0 <= layer < info.num_layers:
            raise KeyError(f"layer {layer} out of range [0, {info.num_layers})")
        rows, heads = range(len(self.template_ids)), range(info.num_kv_heads)
        return tuple(generate_rows(self._virtual["seed"], f"template.{layer}.{name}", rows,
                                   heads, info.num_kv_heads, info.head_dim,
                                   torch.device("cpu")).to(self.dtype)
                     for name in ("keys", "values"))


def write_virtual(plan: Any, out: str | Path) -> VirtualBank:
    """Write the manifest of `plan` (a `synth.SynthPlan`) as a virtual bank in `out`."""
    from .writer import build_manifest

    out = Path(out)
    manifest = build_manifest(plan.model, {"synthetic": {**plan.source["synthetic"],
                                                         "virtual": True}}, [], {},
                              len(plan.template_ids), plan.tiers)
    manifest["format_version"] = 2  # (format 1 readers know no virtual banks)
    manifest["tiers"] = plan.tiers.to_json()
    manifest["counts"].update(documents=plan.num_documents, tokens=plan.tokens,
                              chunks=plan.run_total(range(plan.num_documents),
                                                    plan.doc_num_chunks))
    manifest["virtual"] = {"generator": GENERATOR, "seed": plan.seed,
                           "doc_tokens": plan.doc_tokens}
    manifest["template_ids"] = list(plan.template_ids)
    if (out / MANIFEST).exists():
        existing = MemoryBank.open(out)
        if existing.manifest.get("virtual") == manifest["virtual"] and \
                existing.manifest["counts"] == manifest["counts"] and \
                existing.dtypes == plan.tiers and existing.model_info == plan.model:
            return existing
        raise BankError(f"{out} already holds a different bank; choose another --out or "
                        "delete it")
    if out.exists() and any(out.iterdir()):
        raise BankError(f"{out} exists and is not an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / MANIFEST, manifest)
    return MemoryBank.open(out)
