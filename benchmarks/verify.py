"""What verifying a bank at start-up costs: a served bank's load with and without checks.

A synthetic bank of `--shape` (`vllm-msa bank synth`: the real format, random contents) is
written, then, repeated `--repeats` times each:

* `MemoryBank.verify()`: every file's BLAKE3 (what start-up checks), several files at once;
* the same files' sha256, one after the other (what verification cost before BLAKE3);
* `ServedBank.load(verify=False)`: the tiers read with no check (the baseline);
* `ServedBank.load(verify=True)`: the tiers read while the checksums run on a background
  thread, plus the finite-value check of every tensor (what a server's start does).

The bank was just written, so its files are in the page cache, as they are for a server that
starts on a bank it built or used recently; a cold disk adds its read time to both loads.
Goal: the verified load within 1.25x of the unverified one. Prints a table (median and the
spread of the runs) and writes JSON (card, versions, command, goal).

    python3 benchmarks/verify.py --shape msa-4b --bank-tokens 10M          # GPU machine
    python3 benchmarks/verify.py --shape tiny --bank-tokens 200K --repeats 2  # CPU
"""

from __future__ import annotations

import hashlib
import shutil
import statistics
import time

import torch
from bank_build import common_arguments, prepare, write_result
from memory import free_everything
from report import card_name

from vllm_msa.cli import parse_count

GOAL = 1.25


def sha256_all(bank) -> None:
    for name in bank.manifest["files"]:
        h = hashlib.sha256()
        with open(bank.path / name, "rb") as f:
            while data := f.read(1 << 22):
                h.update(data)
        assert h.hexdigest() == bank.manifest["files"][name]["sha256"], name


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        free_everything()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--bank-tokens", default="10M")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-sha256", action="store_true",
                        help="leave out the sequential sha256 row (the slow one)")
    args = parser.parse_args()
    work, ckpt, _ = prepare(args)

    from vllm_msa.attention.tiers import ServedBank
    from vllm_msa.bank.reader import MemoryBank
    from vllm_msa.bank.synth import plan_synth, synth_bank

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    tokens = parse_count(args.bank_tokens)
    out = work / f"verify-bank-{tokens}"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    synth_bank(plan_synth(ckpt, tokens, args.doc_tokens, dtype=dtype), out, progress=False)
    print(f"{tokens:,}-token bank synthesized in {time.perf_counter() - t:.0f} s")
    bank = MemoryBank.open(out)
    heads = slice(0, bank.model_info.num_kv_heads)
    data_bytes = sum(meta["bytes"] for meta in bank.manifest["files"].values())

    def load(verify: bool) -> None:
        served = ServedBank.load("b", MemoryBank.open(out), device, heads, verify=verify)
        del served

    runs = {
        "blake3 (parallel)": timed(lambda: bank.verify(), args.repeats),
        **({} if args.skip_sha256 else {
            "sha256 (sequential)": timed(lambda: sha256_all(bank), args.repeats)}),
        "load, no checks": timed(lambda: load(False), args.repeats),
        "load, verified": timed(lambda: load(True), args.repeats),
    }
    shutil.rmtree(out, ignore_errors=True)

    print(f"\n{bank.num_tokens:,} tokens, {data_bytes / 2**30:.2f} GiB of bank files, "
          f"{args.repeats} runs each\n")
    print(f"{'step':<22}{'median s':>10}{'min s':>9}{'max s':>9}{'GB/s':>8}")
    rows = {}
    for name, times in runs.items():
        median = statistics.median(times)
        rows[name] = {"seconds": times, "median_s": median,
                      "gb_per_s": data_bytes / median / 1e9}
        print(f"{name:<22}{median:>10.2f}{min(times):>9.2f}{max(times):>9.2f}"
              f"{data_bytes / median / 1e9:>8.1f}")
    ratio = rows["load, verified"]["median_s"] / rows["load, no checks"]["median_s"]
    print(f"\nverified / unverified load (median): {ratio:.2f}x (goal <= {GOAL})")
    write_result({
        "benchmark": "verify", "card": card_name(), "bank_tokens": bank.num_tokens,
        "bank_dtype": dtype, "bank_bytes": data_bytes, "repeats": args.repeats,
        "page_cache": "warm (bank just written)", "runs": rows,
        "goal_metric": "bank load with checksums + finite check / load without (median)",
        "goal": GOAL, "achieved": ratio,
    }, args)


if __name__ == "__main__":
    main()
