"""GPU and pinned host memory of a served bank, per bank size, vs what `bank info` predicts.

For each size a synthetic bank (`vllm-msa bank synth`: the real format, random contents) of
the `--shape` checkpoint is written to a temporary folder, opened afresh and loaded as a worker
serves it (`ServedBank.load`, all KV heads = tensor parallel 1), then freed and deleted before
the next size. Predicted = `MemoryBank.tier_bytes()`, the numbers `vllm-msa bank info` prints.
Measured:

* GPU index: `torch.cuda.memory_allocated()` delta around the load, then around preparing every
  router layer's index for the batched routing kernel (`ServedBank.prepared_index`, done at the
  first routed request: real serving memory too); the goal compares load + prepared. The bytes
  of the index tensors themselves (deduplicated by storage) are listed on every device; on CPU
  they (+ the prepared tensors) stand in for the allocator, which has no counter there.
* host K/V: the bytes of the `host_keys` / `host_values` tensors (equal to the prediction by
  construction), torch's pinned host allocator's count (`torch.cuda.host_memory_stats`; ~0:
  the served bank page-locks exact-size copies with cudaHostRegister instead, since that
  allocator rounds blocks up to powers of two) and the process RSS delta around the load:
  everything the load kept in host RAM. With a GPU the goal compares the RSS delta (it shows
  any copy kept besides the page-locked one); without one, where the index lives in host RAM
  too, the tensors' bytes (the RSS delta is then a cross-check).
* template K/V: predicted only; `ServedBank` does not load it.

Finally the largest bank that would fit this machine, from free GPU memory
(`torch.cuda.mem_get_info`) and host RAM (`MemAvailable`) at start, per token as predicted and
as measured on the largest bank — the bank alone: weights, KV cache and the staging pool share
the same card. Sizes whose bank would not fit the disk or RAM are skipped with a note (a 50M-token
MSA-4B bank is ~88 GB on disk). Prints a table, saves a plot (if matplotlib is there) and writes
JSON (card, versions, command).

    python3 benchmarks/memory.py --shape msa-4b --bank-tokens 1M,10M       # GPU
    python3 benchmarks/memory.py --shape tiny --bank-tokens 20K,50K --json /tmp/mem.json  # CPU
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import importlib.metadata
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bank_build import common_arguments, prepare
from report import card_name, card_slug, pyplot

from vllm_msa.cli import parse_count

GOAL = 0.05


# ----------------------------------------------------------------------------- probes
def rss_bytes() -> int:
    """Resident set size of this process (psutil, else /proc/self/status)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return _proc_kib("/proc/self/status", "VmRSS") * 1024


def mem_available() -> int:
    """Host RAM the kernel could give us without swapping (`MemAvailable`)."""
    return _proc_kib("/proc/meminfo", "MemAvailable") * 1024


def _proc_kib(path: str, key: str) -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in {path}")


def gpu_allocated() -> int | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def pinned_bytes() -> int | None:
    """Bytes of pinned blocks the CUDA host allocator owns (None without CUDA or the stat)."""
    if not torch.cuda.is_available() or not hasattr(torch.cuda, "host_memory_stats"):
        return None
    stats = torch.cuda.host_memory_stats()
    return stats.get("allocated_bytes.current", stats.get("allocated_bytes.all.current"))


def free_everything() -> None:
    """Return freed device blocks, cached pinned blocks and freed heap (glibc keeps it
    otherwise, and the next bank would reuse it unseen by RSS), so each bank starts clean."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        empty_host = getattr(torch.accelerator, "empty_host_cache", None) or getattr(
            torch._C, "_host_emptyCache", None)
        if empty_host is not None:
            empty_host()


def tensor_bytes(tensors: list[torch.Tensor], seen: set[int]) -> int:
    """Bytes of the storages behind `tensors` not yet in `seen` (views and aliases once)."""
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def tensors_of(obj: Any) -> list[torch.Tensor]:
    """The tensor fields of a (routing index) dataclass."""
    return [v for v in vars(obj).values() if isinstance(v, torch.Tensor)]


# ----------------------------------------------------------------------------- one bank
def measure(path: Path, device: torch.device) -> dict[str, Any]:
    """Load the bank at `path` as a worker does and count what it occupies."""
    from vllm_msa.attention.tiers import ServedBank
    from vllm_msa.bank.reader import MemoryBank

    bank = MemoryBank.open(path)  # fresh: nothing read yet
    predicted = bank.tier_bytes()
    free_everything()
    rss0, gpu0, pin0 = rss_bytes(), gpu_allocated(), pinned_bytes()
    t = time.perf_counter()
    served = ServedBank.load("b", bank, device, slice(0, bank.model_info.num_kv_heads))
    gpu1 = gpu_allocated()
    load_s = time.perf_counter() - t
    rss1, pin1 = rss_bytes(), pinned_bytes()
    for layer in bank.router_layers:
        served.prepared_index(layer)
    gpu2 = gpu_allocated()

    seen: set[int] = set()
    index = sum(tensor_bytes(tensors_of(i), seen) for i in served.index.values())
    prepared = sum(tensor_bytes(tensors_of(p), seen) for p in served._prepared.values())
    host = [*served.host_keys.values(), *served.host_values.values()]
    row = {
        "bank_tokens": bank.num_tokens, "documents": bank.num_documents,
        "chunks": bank.num_chunks, "dtype": bank.model_info.dtype,
        "predicted": predicted, "load_s": load_s,
        "gpu_allocated_load": None if gpu0 is None else gpu1 - gpu0,
        "gpu_allocated_prepared": None if gpu0 is None else gpu2 - gpu1,
        "index_tensor_bytes": index, "prepared_tensor_bytes": prepared,
        "host_kv_tensor_bytes": tensor_bytes(host, set()),
        "host_kv_pinned": device.type == "cuda" and all(t.is_pinned() for t in host),
        "pinned_allocator_bytes": None if pin0 is None else pin1 - pin0,
        "rss_delta": rss1 - rss0,
        # What bank info says lands in host RAM: K/V, plus the index where there is no GPU.
        "rss_predicted": predicted["host_kv"] + (0 if gpu0 is not None else predicted["gpu_index"]),
    }
    del served, bank, host
    free_everything()
    return row


def goal_pairs(row: dict[str, Any]) -> dict[str, tuple[int, int, str]]:
    """Per tier: (predicted, measured, how) as the goal compares them."""
    p = row["predicted"]
    if row["gpu_allocated_load"] is not None:
        gpu = (row["gpu_allocated_load"] + row["gpu_allocated_prepared"],
               "cuda allocated, load + prepared")
    else:
        gpu = (row["index_tensor_bytes"] + row["prepared_tensor_bytes"],
               "index + prepared tensor bytes (no GPU)")
    if row["host_kv_pinned"]:
        host = (row["rss_delta"], "process RSS delta (page-locked K/V)")
    else:
        host = (row["host_kv_tensor_bytes"], "host K/V tensor bytes (not pinned)")
    return {"gpu_index": (p["gpu_index"], *gpu), "host_kv": (p["host_kv"], *host)}


def table_lines(row: dict[str, Any]) -> list[tuple[str, int | None, int | None, str]]:
    """(tier, predicted, measured, how) lines of one bank, every measurement."""
    p, goal = row["predicted"], goal_pairs(row)
    pinned = " (pinned)" if row["host_kv_pinned"] else " (not pinned)"
    return [
        ("GPU index", p["gpu_index"], row["gpu_allocated_load"], "cuda allocated, load"),
        ("", None, row["gpu_allocated_prepared"], "cuda allocated, prepared index"),
        ("", p["gpu_index"], row["index_tensor_bytes"], "index tensor bytes"),
        ("", None, row["prepared_tensor_bytes"], "prepared index tensor bytes"),
        ("", p["gpu_index"], goal["gpu_index"][1], "GOAL: " + goal["gpu_index"][2]),
        ("host K/V", p["host_kv"], row["host_kv_tensor_bytes"], "tensor bytes" + pinned),
        ("", p["host_kv"], row["pinned_allocator_bytes"], "pinned host allocator"),
        ("", p["host_kv"], goal["host_kv"][1], "GOAL: " + goal["host_kv"][2]),
        ("host RAM", row["rss_predicted"], row["rss_delta"],
         "process RSS delta (cross-check" + (")" if row["host_kv_pinned"] else
                                             ": K/V + index, all in host RAM)")),
        ("template", p["template"], None, "not loaded by ServedBank"),
    ]


# ----------------------------------------------------------------------------- sizes
def plan_or_skip(ckpt: Path, tokens: int, args: Any, dtype: str | None, scratch: Path,
                 cuda: bool) -> tuple[Any, dict[str, int], str | None]:
    """The synth plan, its predicted tiers and on-disk bytes, and why it cannot run (or None).
    Loading reads the whole bank into host RAM (the reader keeps what it read) and pinning
    copies K/V into blocks rounded up to a power of two (up to 2x): refuse what cannot fit
    rather than be killed mid-run with every result lost."""
    from vllm_msa.bank.reader import MemoryBank
    from vllm_msa.bank.synth import plan_synth

    plan = plan_synth(ckpt, tokens, args.doc_tokens, dtype=dtype)
    manifest = plan.predicted_manifest()
    tiers = MemoryBank(scratch, manifest).tier_bytes()
    disk = sum(f["bytes"] for f in manifest["files"].values())
    tiers = {**tiers, "on_disk": disk}
    if disk > shutil.disk_usage(scratch).free:
        return plan, tiers, (f"needs {gib(disk)} on disk, "
                             f"{gib(shutil.disk_usage(scratch).free)} free")
    host_need = disk + (2 * tiers["host_kv"] if cuda else 0)
    if host_need > mem_available():
        return plan, tiers, f"needs ~{gib(host_need)} host RAM, {gib(mem_available())} available"
    if cuda and tiers["gpu_index"] > torch.cuda.mem_get_info()[0]:
        return plan, tiers, f"GPU index {gib(tiers['gpu_index'])} exceeds free GPU memory"
    return plan, tiers, None


def run_size(ckpt: Path, tokens: int, args: Any, dtype: str | None, scratch: Path,
             device: torch.device) -> dict[str, Any]:
    """Synthesize, measure and delete one bank; a skipped size gets a row saying why."""
    from vllm_msa.bank.format import BankError
    from vllm_msa.bank.synth import synth_bank

    plan, tiers, skip = plan_or_skip(ckpt, tokens, args, dtype, scratch,
                                     device.type == "cuda")
    if skip:
        print(f"{tokens:,} tokens: skipped ({skip})", flush=True)
        return {"bank_tokens": tokens, "skipped": skip, "predicted": tiers}
    out = scratch / f"bank-{tokens}"
    try:
        t = time.perf_counter()
        synth_bank(plan, out, progress=False)
        synth_s = time.perf_counter() - t
        row = measure(out, device)
    except BankError as e:
        print(f"{tokens:,} tokens: skipped ({e})", flush=True)
        return {"bank_tokens": tokens, "skipped": str(e), "predicted": tiers}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    row["predicted"]["on_disk"] = tiers["on_disk"]
    row["synth_s"] = synth_s
    pairs = goal_pairs(row)
    row["goal_ratios"] = {tier: m / p for tier, (p, m, _) in pairs.items()}
    row["rss_ratio"] = row["rss_delta"] / row["rss_predicted"]
    print(f"{tokens:,} tokens: synthesized in {synth_s:.0f} s, loaded in {row['load_s']:.1f} s",
          flush=True)
    return row


def warm_up(ckpt: Path, args: Any, dtype: str | None, scratch: Path, device: torch.device
            ) -> None:
    """Load a one-document bank once: first-use costs (lazy imports, allocator and CUDA
    host-allocator set-up, safetensors) would otherwise land in the first size's deltas."""
    from vllm_msa.bank.synth import plan_synth, synth_bank

    out = scratch / "warm-up"
    try:
        synth_bank(plan_synth(ckpt, args.doc_tokens, args.doc_tokens, dtype=dtype), out,
                   progress=False)
        measure(out, device)
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ----------------------------------------------------------------------------- capacity
def capacity(rows: list[dict[str, Any]], free_gpu: int | None, host_free: int
             ) -> dict[str, Any] | None:
    """The largest bank this machine could hold, per token as predicted and as measured on
    the largest measured bank. Without a GPU the index sits in host RAM too."""
    done = [r for r in rows if "skipped" not in r]
    if not done:
        return None
    r = max(done, key=lambda r: r["bank_tokens"])
    tokens, p = r["bank_tokens"], r["predicted"]
    gpu_m, host_m = (v / tokens for v in (goal_pairs(r)["gpu_index"][1], r["rss_delta"]))
    host_p = r["rss_predicted"] / tokens
    gpu_tokens: dict[str, int | None] = {"predicted": None, "measured": None}
    if free_gpu is not None:
        gpu_tokens = {"predicted": int(free_gpu / (p["gpu_index"] / tokens)),
                      "measured": int(free_gpu / gpu_m)}
    host_tokens = {"predicted": int(host_free / host_p), "measured": int(host_free / host_m)}
    fits = {k: min(v for v in (gpu_tokens[k], host_tokens[k]) if v is not None)
            for k in ("predicted", "measured")}
    return {"from_bank_tokens": tokens, "free_gpu_bytes": free_gpu,
            "mem_available_bytes": host_free,
            "gpu_bytes_per_token": {"predicted": p["gpu_index"] / tokens, "measured": gpu_m},
            "host_bytes_per_token": {"predicted": host_p, "measured_rss": host_m},
            "gpu_bound_tokens": gpu_tokens, "host_bound_tokens": host_tokens,
            "max_bank_tokens": fits}


# ----------------------------------------------------------------------------- output
def gib(n: float | None) -> str:
    if n is None:
        return "n/a"
    if abs(n) >= 2**28:
        return f"{n / 2**30:.3f} GiB"
    return f"{n / 2**20:.2f} MiB" if abs(n) >= 2**20 else f"{n / 2**10:.1f} KiB"


def tokens_text(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:,.1f}M"


def print_table(rows: list[dict[str, Any]], cap: dict[str, Any] | None, card: str,
                shape: str) -> None:
    print(f"\nbank memory on {card}, {shape} shape: predicted = `vllm-msa bank info`\n")
    print(f"{'bank tokens':>12} {'tier':<10} {'predicted':>13} {'measured':>13} {'ratio':>7}  how")
    for r in rows:
        if "skipped" in r:
            print(f"{r['bank_tokens']:>12,} skipped: {r['skipped']}")
            continue
        first = True
        for tier, pred, meas, how in table_lines(r):
            ratio = f"{meas / pred:.3f}" if pred and meas is not None else "-"
            label = f"{r['bank_tokens']:,}" if first else ""
            print(f"{label:>12} {tier:<10} {gib(pred) if pred else '':>13} {gib(meas):>13} "
                  f"{ratio:>7}  {how}")
            first = False
    if cap:
        print("\n" + capacity_line(cap))


def capacity_line(cap: dict[str, Any]) -> str:
    gpu, host, fits = cap["gpu_bound_tokens"], cap["host_bound_tokens"], cap["max_bank_tokens"]
    text = f"capacity (the bank alone, per token of the {cap['from_bank_tokens']:,}-token bank): "
    if cap["free_gpu_bytes"] is not None:
        text += (f"free GPU {gib(cap['free_gpu_bytes'])} -> {tokens_text(gpu['predicted'])} "
                 f"tokens by bank info, {tokens_text(gpu['measured'])} measured; ")
    return text + (f"host MemAvailable {gib(cap['mem_available_bytes'])} -> "
                   f"{tokens_text(host['predicted'])} by bank info, "
                   f"{tokens_text(host['measured'])} by RSS; largest bank that fits: "
                   f"{tokens_text(fits['predicted'])} tokens predicted, "
                   f"{tokens_text(fits['measured'])} measured")


def plot(rows: list[dict[str, Any]], path: Path, card: str, shape: str) -> None:
    plt = pyplot()
    if plt is None:
        print("matplotlib not available: no plot")
        return
    done = sorted((r for r in rows if "skipped" not in r), key=lambda r: r["bank_tokens"])
    x = [r["bank_tokens"] for r in done]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    series = {
        "GPU index (goal)": [r["goal_ratios"]["gpu_index"] for r in done],
        "host K/V (goal)": [r["goal_ratios"]["host_kv"] for r in done],
        "host RSS delta / predicted host RAM": [r["rss_ratio"] for r in done],
    }
    for label, ys in series.items():
        ax1.plot(x, ys, "o-", label=label)
    for edge in (1 - GOAL, 1 + GOAL):
        ax1.axhline(edge, color="gray", ls="--", lw=1)
    ax1.set(xscale="log", xlabel="bank tokens", ylabel="measured / predicted",
            title="measured vs bank info")
    ax1.legend(fontsize=7)
    for i, (key, label) in enumerate((("gpu_index", "GPU index"), ("host_kv", "host K/V"))):
        ax2.plot(x, [r["predicted"][key] / 2**30 for r in done], "--", color=f"C{i}",
                 label=f"{label}, predicted")
        ax2.plot(x, [goal_pairs(r)[key][1] / 2**30 for r in done], "o", color=f"C{i}",
                 label=f"{label}, measured")
    ax2.plot(x, [r["rss_predicted"] / 2**30 for r in done], ":", color="C2",
             label="host RAM, predicted")
    ax2.plot(x, [r["rss_delta"] / 2**30 for r in done], "x", color="C2", label="host RSS delta")
    ax2.set(xscale="log", yscale="log", xlabel="bank tokens", ylabel="GiB", title="bytes")
    ax2.legend(fontsize=7)
    fig.suptitle(f"MSA bank memory, {shape} shape, {card}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def versions() -> dict[str, str | None]:
    """torch, triton, vllm (when importable) and vllm_msa."""
    out: dict[str, str | None] = {}
    for name in ("torch", "triton", "vllm", "vllm_msa"):
        try:
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            try:
                out[name] = importlib.import_module(name).__version__
            except ImportError:
                out[name] = None
    return out


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = common_arguments(__doc__.splitlines()[0])
    parser.set_defaults(doc_tokens=500)
    parser.add_argument("--bank-tokens", default="1M,10M",
                        help="comma-separated bank sizes in tokens (suffixes k, M, G)")
    args = parser.parse_args()
    sizes = [parse_count(s) for s in args.bank_tokens.split(",")]
    work, ckpt, engine = prepare(args)

    import vllm_msa.kernels.routing  # noqa: F401  (imported before any RSS reading)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.init()
        torch.zeros(1, device=device)
    free_gpu = torch.cuda.mem_get_info()[0] if cuda else None
    host_free = mem_available()
    rows = []
    with tempfile.TemporaryDirectory(prefix="memory-bench-", dir=work) as scratch:
        warm_up(ckpt, args, engine.get("dtype"), Path(scratch), device)
        for size in sizes:
            rows.append(run_size(ckpt, size, args, engine.get("dtype"), Path(scratch), device))
    cap = capacity(rows, free_gpu, host_free)
    card = card_name()
    print_table(rows, cap, card, args.shape)

    ratios = [v for r in rows if "goal_ratios" in r for v in r["goal_ratios"].values()]
    achieved = max((abs(v - 1) for v in ratios), default=None)
    rss = max((abs(r["rss_ratio"] - 1) for r in rows if "rss_ratio" in r), default=None)
    print(f"\ngoal: max |measured/predicted - 1| over banks and tiers <= {GOAL}; achieved "
          + (f"{achieved:.4f}" if achieved is not None else "n/a")
          + ("" if rss is None else
             f" (host RSS delta vs predicted host RAM, not in the goal: {rss:.3f})"))
    result = {
        "benchmark": "memory",
        "card": card,
        "versions": versions(),
        "command": " ".join(["python3", *sys.argv]),
        "shape": args.shape,
        "doc_tokens": args.doc_tokens,
        "device": str(device),
        "rows": rows,
        "capacity": cap,
        "notes": [
            "predicted = MemoryBank.tier_bytes() (what `vllm-msa bank info` prints)",
            "goal compares gpu_index with cuda allocated (load + prepared index; on CPU the "
            "index and prepared tensors' bytes) and host_kv with the process RSS delta over "
            "the load when the K/V are page-locked (on CPU the host K/V tensors' bytes)",
            "rss_delta: process RSS growth over the load (everything it keeps in host RAM)",
            "template K/V is not loaded by ServedBank: predicted only",
        ],
        "goal_metric": "max |measured/predicted - 1| over banks and tiers",
        "goal": GOAL,
        "achieved": achieved,
        "rss_max_abs_deviation": rss,
    }
    path = Path(args.json) if args.json else (
        Path(__file__).parent / "results" / f"memory-{card_slug(card)}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    plot(rows, path.with_suffix(".png"), card, args.shape)


if __name__ == "__main__":
    main()
