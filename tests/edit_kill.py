"""Run one bank edit and SIGKILL this process group at a chosen point, as when the machine dies
there: nothing gets to clean up. Used by the edit tests as

    python edit_kill.py POINT OP ARGS...

POINT: "segment:N" (just after the edit's N-th new segment is durable and recorded),
"manifest" (half-way through writing the new manifest's temporary file, before the rename),
"committed" (just after the new manifest is in place, before any clean-up).
OP: "remove BANK ID,ID", "add BANK CKPT DOCS [replace]" (with the fake encoder),
"compact BANK", or "cli ARGV..." (`vllm-msa ARGV`, a real engine where it needs one).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def die() -> None:
    sys.stdout.flush()
    os.killpg(0, signal.SIGKILL)


def arm(point: str) -> None:
    from vllm_msa.bank import format as fmt
    from vllm_msa.bank import generations

    if point.startswith("segment:"):
        after, written = int(point.split(":")[1]), []
        add_segment = generations.PendingGeneration.add_segment

        def add_then_die(self, *args, **kwargs):
            add_segment(self, *args, **kwargs)
            written.append(1)
            if len(written) == after:
                die()

        generations.PendingGeneration.add_segment = add_then_die
        return
    write_json_atomic = generations.write_json_atomic

    def write(path: Path, obj) -> None:
        if path.name != fmt.MANIFEST:
            return write_json_atomic(path, obj)
        if point == "manifest":
            import json

            data = json.dumps(obj).encode()
            with open(path.with_name(path.name + ".tmp"), "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            die()
        write_json_atomic(path, obj)
        die()

    generations.write_json_atomic = write


def main(argv: list[str]) -> int:
    point, op, *args = argv
    arm(point)
    if op == "remove":
        from vllm_msa.bank import remove_documents

        remove_documents(args[0], [int(i) for i in args[1].split(",")])
    elif op == "add":
        from fake_encoder import FakeEncoder

        from vllm_msa.bank import add_documents

        add_documents(args[0], args[1], args[2], replace=args[3:] == ["replace"],
                      llm=FakeEncoder(args[1]), progress=False)
    elif op == "compact":
        from vllm_msa.bank import compact_bank

        compact_bank(args[0], progress=False)
    elif op == "cli":
        from vllm_msa.cli import main as cli

        return cli(args)
    else:
        raise SystemExit(f"unknown op {op}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
