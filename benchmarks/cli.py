"""How long the `vllm-msa` command line takes to answer, per command (the installed console
script, as a user runs it): every `--help`, and `bank info` / `bank verify` on a small
synthetic bank. Each command runs `--repeats` times; the table shows the median and the
spread. Goal: every `--help` under 1 s. Writes JSON (card, versions, command, goal).

    python3 benchmarks/cli.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import card_name

GOAL = 1.0  # seconds, the slowest --help


def timed(argv: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "cli.json"))
    args = parser.parse_args()
    exe = shutil.which("vllm-msa") or str(Path(sys.executable).with_name("vllm-msa"))
    work = Path(tempfile.mkdtemp(prefix="vllm-msa-cli-"))
    try:
        ckpt, bank = work / "ckpt", work / "bank"
        subprocess.run([exe, "make-tiny-checkpoint", str(ckpt)], check=True,
                       capture_output=True)
        subprocess.run([exe, "bank", "synth", "--model", str(ckpt), "--tokens", "20k",
                        "--doc-tokens", "200", "--out", str(bank), "--no-progress"],
                       check=True, capture_output=True)
        commands = {
            "--help": ["--help"], "bank --help": ["bank", "--help"],
            "bank build --help": ["bank", "build", "--help"],
            "bank synth --help": ["bank", "synth", "--help"],
            "bank info --help": ["bank", "info", "--help"],
            "bank verify --help": ["bank", "verify", "--help"],
            "make-tiny-checkpoint --help": ["make-tiny-checkpoint", "--help"],
            "bank info BANK": ["bank", "info", str(bank)],
            "bank verify BANK --model CKPT": ["bank", "verify", str(bank), "--model",
                                              str(ckpt)],
        }
        rows = {name: timed([exe, *argv], args.repeats) for name, argv in commands.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'command':<32}{'median s':>10}{'min s':>8}{'max s':>8}")
    for name, times in rows.items():
        print(f"{name:<32}{statistics.median(times):>10.2f}{min(times):>8.2f}"
              f"{max(times):>8.2f}")
    slowest = max(statistics.median(t) for n, t in rows.items() if n.endswith("--help"))
    print(f"\nslowest --help (median): {slowest:.2f} s (goal < {GOAL} s)")
    import vllm_msa

    result = {"benchmark": "cli", "card": card_name(), "repeats": args.repeats,
              "versions": {"vllm_msa": vllm_msa.__version__, "python": sys.version.split()[0]},
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "seconds": rows, "goal_metric": "slowest --help, median seconds",
              "goal": GOAL, "achieved": slowest}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
