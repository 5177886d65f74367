"""The `vllm-msa` command line: tiny checkpoints and memory banks (build, edit, synth, info,
verify)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .bank.format import BANK_DTYPES, DEFAULT_SEGMENT_MB, INDEX_DTYPES
from .reduce_methods import CHUNK_REDUCE_METHODS, HEAD_REDUCE_METHODS, QUERY_REDUCE_METHODS


def _add_tiny_parser(sub) -> None:
    from .tiny_spec import TinySpec

    d = TinySpec()
    p = sub.add_parser("make-tiny-checkpoint", help="write a random tiny MSA checkpoint")
    p.add_argument("dir", help="output directory")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--router-layers", default=d.router_layers,
                   help='"all" or comma-separated layer indices (default %(default)s)')
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--kv-heads", type=int, default=d.kv_heads)
    p.add_argument("--head-dim", type=int, default=d.head_dim)
    p.add_argument("--intermediate", type=int, default=d.intermediate)
    p.add_argument("--pooling", type=int, default=d.pooling, help="pooling_kernel_size")
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--head-reduce", choices=HEAD_REDUCE_METHODS, default=d.head_reduce)
    p.add_argument("--query-reduce", choices=QUERY_REDUCE_METHODS, default=d.query_reduce)
    p.add_argument("--chunk-reduce", choices=CHUNK_REDUCE_METHODS, default=d.chunk_reduce)
    p.add_argument("--aux-loss-method", default=d.aux_loss_method)
    p.add_argument("--no-decouple-router", dest="decouple_router", action="store_false")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=d.dtype)


def _add_bank_parsers(sub, with_engine_args: bool) -> None:
    bank = sub.add_parser("bank", help="build, inspect and verify memory banks")
    bsub = bank.add_subparsers(dest="bank_cmd", required=True)

    build = bsub.add_parser(
        "build",
        help="encode documents into a bank (stage 1) with vLLM",
        description="Encode DOCS.jsonl into a bank with vLLM. Every vLLM engine option "
        "(--tensor-parallel-size, --dtype, --max-num-seqs, ...: see `vllm serve --help`) "
        "is accepted.",
    )
    build.add_argument("--docs", required=True, help='JSONL file of {"id": int, "text": str}')
    build.add_argument("--out", required=True, help="bank directory to create (or resume)")
    build.add_argument("--bank-dtype", choices=BANK_DTYPES, default="auto",
                       help="K/V tier dtype: the model's (auto) or FP8 e4m3 with a scale per "
                       "chunk and KV head (half the host RAM)")
    build.add_argument("--segment-mb", type=float, default=DEFAULT_SEGMENT_MB,
                       help="bank data per resumable segment, MiB (default %(default)s)")
    build.add_argument("--no-progress", action="store_true")
    if with_engine_args:
        from vllm.engine.arg_utils import EngineArgs

        EngineArgs.add_cli_args(build)
    else:
        build.add_argument("--model", required=True, help="the MSA checkpoint")

    add = bsub.add_parser(
        "add",
        help="encode documents and append them to a bank (a new generation)",
        description="Encode DOCS.jsonl with the bank's model (the same stage 1 as `bank build`, "
        "every vLLM engine option accepted) and append it to BANK in one new generation. An "
        "id the bank holds is refused unless --replace. Atomic and resumable: an interrupted "
        "run leaves the previous generation, and re-running it continues.",
    )
    add.add_argument("bank", help="the bank to edit")
    add.add_argument("--docs", required=True, help='JSONL file of {"id": int, "text": str}')
    add.add_argument("--replace", action="store_true",
                     help="replace documents whose id the bank holds (old copy removed, new "
                     "one appended)")
    add.add_argument("--segment-mb", type=_positive_float,
                     help="bank data per new segment, MiB (default: the bank's)")
    add.add_argument("--no-progress", action="store_true")
    if with_engine_args:
        from vllm.engine.arg_utils import EngineArgs

        EngineArgs.add_cli_args(add)
    else:
        add.add_argument("--model", required=True,
                         help="the MSA checkpoint the bank was built with")

    remove = bsub.add_parser(
        "remove", help="remove documents from a bank (a new generation)",
        description="Remove documents from BANK in one new generation. Their data stays in "
        "the files until `bank compact`. An id that is not in the bank, or removed already, "
        "is an error and nothing is written.")
    remove.add_argument("bank", help="the bank to edit")
    remove.add_argument("--ids", required=True, type=_id_list,
                        help="comma-separated document ids, e.g. 3,17")

    compact = bsub.add_parser(
        "compact", help="rewrite a bank without its removed documents",
        description="Rewrite BANK without the documents removed from it, in the segments "
        "`bank build` would write for its live documents, then delete the files no longer "
        "used. Atomic and resumable: an interrupted run leaves the previous generation, and "
        "re-running it continues.")
    compact.add_argument("bank", help="the bank to compact")
    compact.add_argument("--segment-mb", type=_positive_float,
                         help="bank data per segment, MiB (default: the bank's)")
    compact.add_argument("--no-progress", action="store_true")

    synth = bsub.add_parser(
        "synth",
        help="write a bank of random tensors shaped for a model (capacity planning, speed work)",
        description="Write a synthetic bank: the real format (loads and serves with --model's "
        "checkpoint) filled with random K/V/routing keys and placeholder texts, without "
        "encoding. Prints the predicted size first. Interrupted runs resume when re-run.",
    )
    synth.add_argument("--model", required=True, help="checkpoint the bank is shaped for")
    synth.add_argument("--tokens", required=True, type=parse_count,
                       help="total memory tokens, e.g. 1000000, 100M, 1.5G")
    synth.add_argument("--doc-tokens", required=True, type=parse_count,
                       help="tokens per document (the last one gets the remainder)")
    synth.add_argument("--out", required=True, help="bank directory to create (or resume)")
    synth.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                       help="dtype the model will be served in (default: its config)")
    synth.add_argument("--bank-dtype", choices=BANK_DTYPES, default="auto",
                       help="K/V tier dtype: the model's (auto) or FP8 e4m3 with a scale per "
                       "chunk and KV head (half the host RAM)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--segment-mb", type=_positive_float, default=DEFAULT_SEGMENT_MB,
                       help="bank data per resumable segment, MiB (default %(default)s)")
    synth.add_argument("--dry-run", action="store_true",
                       help="print the predicted bank and write nothing")
    synth.add_argument("--virtual", action="store_true",
                       help="write the manifest only: the tensors are generated when the bank "
                       "is opened (a bank larger than the disk, for capacity and speed work)")
    synth.add_argument("--no-progress", action="store_true")

    convert = bsub.add_parser(
        "convert", help="write a copy of a bank with other tier dtypes (e.g. FP8 K/V)",
        description="Write a copy of bank SRC into --out with its K/V tier in --bank-dtype. "
        "SRC is only read. Atomic and resumable like build: an interrupted run resumes when "
        "re-run.")
    convert.add_argument("src", help="the bank to convert")
    convert.add_argument("--out", required=True, help="bank directory to create (or resume)")
    convert.add_argument("--bank-dtype", choices=BANK_DTYPES, required=True)
    convert.add_argument("--no-progress", action="store_true")

    info = bsub.add_parser("info", help="what a bank holds and where it will sit")
    info.add_argument("bank")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                      help="predict GPU bytes per rank for this many tensor-parallel ranks")
    info.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                      help="... and host bytes per node for this many replicas")
    info.add_argument("--index-parallel", choices=("shard", "replicate"), default="shard",
                      help='the engine option additional_config["msa"]["index_parallel"]')
    info.add_argument("--no-share-host", action="store_true",
                      help='as with additional_config["msa"]["share_host"]: false')
    info.add_argument("--index-dtype", choices=INDEX_DTYPES, default="auto",
                      help='the engine option additional_config["msa"]["index_dtype"]')

    cap = bsub.add_parser(
        "capacity", help="the largest bank a machine holds, for a model and a layout",
        description="The most memory tokens whose routing index fits --gpu-gib on every GPU "
        "and whose host tier fits --host-gib per node, by the sizes `bank info` predicts. "
        "Give the memory left for the bank: the GPU's minus the model, the KV cache and "
        "activations; the node's RAM minus the processes'.")
    cap.add_argument("--model", required=True, help="the MSA checkpoint")
    cap.add_argument("--gpu-gib", type=_positive_float, required=True,
                     help="GPU memory per GPU for the routing index, GiB")
    cap.add_argument("--host-gib", type=_positive_float, required=True,
                     help="host RAM per node for the K/V tier, GiB")
    cap.add_argument("--doc-tokens", type=parse_count, default=512,
                     help="tokens per document (default %(default)s)")
    cap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                     help="dtype the model will be served in (default: its config)")
    cap.add_argument("--bank-dtype", choices=BANK_DTYPES, default="auto")
    cap.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    cap.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    cap.add_argument("--index-parallel", choices=("shard", "replicate"), default="shard")
    cap.add_argument("--no-share-host", action="store_true")
    cap.add_argument("--index-dtype", choices=INDEX_DTYPES, default="auto",
                     help='the routing index served in 8 bits (engine option "index_dtype")')
    cap.add_argument("--json", action="store_true", help="machine-readable output")

    shm = bsub.add_parser("shm", help="the host tiers engines share on this node (/dev/shm)")
    shm.add_argument("--clean", action="store_true",
                     help="remove those no running engine maps (left by killed engines)")

    verify = bsub.add_parser("verify", help="check a bank's checksums (and a model's fit)")
    verify.add_argument("bank")
    verify.add_argument("--model", help="checkpoint the bank must match")
    verify.add_argument("--dtype", help="dtype the model will be served in (default: its config)")


_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_count(text: str) -> int:
    """A positive integer, optionally with a decimal suffix: 4096, 100M, 1.5G."""
    scale = _SUFFIXES.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count such as 4096 or 100M, got {text!r}"
        ) from None
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(value)


def _id_list(text: str) -> list[int]:
    """Comma-separated document ids (integers >= 0)."""
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integer ids such as 3,17, got {text!r}") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"expected ids >= 0, got {text!r}")
    return ids


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-msa", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve", add_help=False,  # (`main` hands `serve` to serve_cli.py)
                   help="vLLM's OpenAI server with banks given as flags "
                   "(`vllm-msa serve --help`)")
    _add_tiny_parser(sub)
    # vLLM's engine options (an `import vllm` of seconds) only for a build that runs: its
    # --help stays instant and names them instead.
    runs_build = (list(argv[:1]) == ["bank"] and argv[1:2] in (["build"], ["add"])
                  and not {"-h", "--help"} & set(argv))
    _add_bank_parsers(sub, with_engine_args=runs_build)
    return parser


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The vLLM engine options given on the command line that differ from vLLM's defaults."""
    from vllm.engine.arg_utils import EngineArgs

    given = EngineArgs.from_cli_args(args)
    defaults = EngineArgs(model=given.model)
    return {
        f.name: getattr(given, f.name)
        for f in dataclasses.fields(EngineArgs)
        if f.name != "model" and getattr(given, f.name) != getattr(defaults, f.name)
    }


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def bank_summary(bank) -> dict[str, Any]:
    from .bank.format import EDIT_STATE
    from .bank.reader import removed_bytes

    info = bank.model_info
    tiers = bank.tier_bytes()
    removed = bank.removed_counts
    return {
        "path": str(bank.path),
        "format_version": bank.manifest["format_version"],
        "created_by": bank.manifest["created_by"],
        "generation": bank.generation,
        "documents": bank.num_documents,
        "removed": {**removed, "bytes": removed_bytes(bank) if removed["documents"] else 0},
        "edit_pending": (bank.path / EDIT_STATE).exists(),
        "tokens": bank.num_tokens,
        "chunks": bank.num_chunks,
        "template_tokens": bank.manifest["counts"]["template_tokens"],
        "router_layers": list(info.router_layers),
        "num_kv_heads": info.num_kv_heads,
        "head_dim": info.head_dim,
        "pooling_kernel_size": info.pooling_kernel_size,
        "dtype": info.dtype,
        "tiers": bank.dtypes.to_json(),
        "bytes": {
            "gpu_index": tiers["gpu_index"],
            "host_kv": tiers["host_kv"],
            "template": tiers["template"],
            "on_disk": sum(f["bytes"] for f in bank.manifest["files"].values()),
        },
        "model_fingerprint": info.fingerprint,
        "synthetic": "synthetic" in (bank.manifest.get("source") or {}),
        "virtual": "virtual" in bank.manifest,
    }


def _tier(s: dict[str, Any], tier: str) -> str:
    dtype = s["tiers"][tier]
    return f"{dtype}, a scale per chunk and KV head" if dtype.startswith("float8") else dtype


def _print_info(s: dict[str, Any]) -> None:
    b = s["bytes"]
    layers = s["router_layers"]
    rows = [
        ("bank", s["path"]),
        ("format", f"version {s['format_version']} ({s['created_by']})"),
        ("generation", f"{s['generation']}" + (
            "  (an interrupted edit is pending: re-run it to finish it; the next edit "
            "discards it otherwise)" if s.get("edit_pending") else "")),
        ("documents", f"{s['documents']:,}" + (
            f" live, {s['removed']['documents']:,} removed" if s["removed"]["documents"]
            else "")),
        ("tokens", f"{s['tokens']:,}"),
        ("chunks", f"{s['chunks']:,} (pooling {s['pooling_kernel_size']} tokens)"),
        ("router layers", f"{len(layers)}: {','.join(map(str, layers))}"),
        ("kv heads x head_dim", f"{s['num_kv_heads']} x {s['head_dim']}, model {s['dtype']}"),
        ("GPU memory (index)", f"{_human(b['gpu_index'])}  routing keys ({_tier(s, 'index')}) "
                               "+ chunk->document map"),
        ("host RAM (K/V tier)", f"{_human(b['host_kv'])}  pooled keys and values "
                                f"({_tier(s, 'kv')})"),
        ("template K/V", f"{_human(b['template'])}  ({s['template_tokens']} tokens, all layers)"),
        ("on disk", _human(b["on_disk"]) + (
            f"  ({_human(s['removed']['bytes'])} of it held by removed documents until "
            "`bank compact`)" if s["removed"]["documents"] else "")),
        ("model fingerprint", s["model_fingerprint"]),
    ]
    layout = s.get("layout")
    if layout and layout["gpus"] > 1:
        tp, dp = layout["tensor_parallel_size"], layout["data_parallel_size"]
        rows[-2:-2] = [
            (f"TP={tp} x DP={dp} ({layout['index_parallel']})",
             f"{layout['gpus']} GPUs on one node"),
            ("  GPU index per rank", f"{_human(layout['gpu_index_per_rank'])}  (largest share)"),
            ("  host RAM per rank", _human(layout["host_per_rank"])),
            ("  host RAM per node", f"{_human(layout['host_per_node'])}  (" + (
                "one shared copy for every replica" if layout["share_host"]
                else "every replica loads its own") + ")"),
        ]
    if layout and layout.get("index_dtype", "auto") != "auto":
        rows[1:1] = [("GPU index as served", f"{_human(layout['gpu_index_per_rank'])}  "
                      f"in {layout['index_dtype']} (engine option index_dtype; exact "
                      "re-scores read the bank files)")]
    if s.get("virtual"):
        rows.insert(2, ("content", "SYNTHETIC, virtual: a manifest only; its random tensors "
                                   "are generated when it is opened (bank synth --virtual)"))
    elif s.get("synthetic"):
        rows.insert(2, ("content", "SYNTHETIC: random tensors, placeholder texts (bank synth)"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "make-tiny-checkpoint":
        from .tiny import TinySpec, make_tiny_checkpoint

        fields = {f.name for f in dataclasses.fields(TinySpec)}
        spec = TinySpec(**{k: v for k, v in vars(args).items() if k in fields})
        print(make_tiny_checkpoint(args.dir, spec))
        return 0

    from .bank import MemoryBank

    if args.bank_cmd == "build":
        from .bank.build import build_bank

        bank = build_bank(args.model, args.docs, args.out, segment_mb=args.segment_mb,
                          progress=not args.no_progress, bank_dtype=args.bank_dtype,
                          **_engine_kwargs(args))
        _print_info(bank_summary(bank))
        return 0
    if args.bank_cmd == "add":
        from .bank.edit import add_documents

        bank = add_documents(args.bank, args.model, args.docs, replace=args.replace,
                             segment_mb=args.segment_mb, progress=not args.no_progress,
                             **_engine_kwargs(args))
        _print_info(bank_summary(bank))
        return 0
    if args.bank_cmd == "remove":
        from .bank.edit import remove_documents

        bank = remove_documents(args.bank, args.ids)
        print(f"removed {len(set(args.ids))} document(s): {bank.path} is generation "
              f"{bank.generation}, {bank.num_documents:,} live documents")
        return 0
    if args.bank_cmd == "compact":
        from .bank.compact import compact_bank

        before = MemoryBank.open(args.bank).generation
        bank = compact_bank(args.bank, segment_mb=args.segment_mb,
                            progress=not args.no_progress)
        if bank.generation == before:
            print(f"{bank.path} is compact already (generation {bank.generation})")
        _print_info(bank_summary(bank))
        return 0
    if args.bank_cmd == "synth":
        return _synth(args)
    if args.bank_cmd == "convert":
        from .bank.convert import convert_bank

        _print_info(bank_summary(convert_bank(args.src, args.out, args.bank_dtype,
                                              progress=not args.no_progress)))
        return 0
    if args.bank_cmd == "info":
        from .bank.sizing import layout_bytes

        bank = MemoryBank.open(args.bank)
        summary = bank_summary(bank)
        if args.tensor_parallel_size < 1 or args.data_parallel_size < 1:
            print("error: --tensor-parallel-size and --data-parallel-size must be >= 1",
                  file=sys.stderr)
            return 2
        summary["layout"] = layout_bytes(bank, args.tensor_parallel_size,
                                         args.data_parallel_size, args.index_parallel,
                                         not args.no_share_host, args.index_dtype).to_json()
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            _print_info(summary)
        return 0
    if args.bank_cmd == "verify":
        bank = MemoryBank.open(args.bank, args.model, dtype=args.dtype)
        problems = bank.verify()
        for p in problems:
            print(f"FAIL {p}", file=sys.stderr)
        if problems:
            return 1
        fit = f"; matches model {args.model}" if args.model else ""
        print(f"OK {bank.path}: {len(bank.manifest['files'])} files intact{fit}")
        return 0
    if args.bank_cmd == "capacity":
        return _capacity(args)
    if args.bank_cmd == "shm":
        from .attention import host_share

        files = {path: path.stat().st_size
                 for path in host_share.SHM_DIR.glob(host_share.PREFIX + "*")}
        unused = {path for path, _ in host_share.clean(dry_run=not args.clean)}
        for path, size in sorted(files.items()):
            state = "in use" if path not in unused else "removed" if args.clean else "unused"
            print(f"{_human(size):>12}  {state:<7}  {path}")
        print(f"{len(files)} shared host tier file(s) in {host_share.SHM_DIR}")
        return 0
    raise AssertionError(args)


def _capacity(args: argparse.Namespace) -> int:
    from .bank.dtypes import BankDtypes
    from .bank.model_info import ModelInfo, resolve_checkpoint
    from .bank.sizing import largest_bank

    if args.tensor_parallel_size < 1 or args.data_parallel_size < 1:
        print("error: --tensor-parallel-size and --data-parallel-size must be >= 1",
              file=sys.stderr)
        return 2
    info = ModelInfo.from_checkpoint(resolve_checkpoint(args.model), args.dtype)
    dtypes = BankDtypes.of_model(info.dtype, args.bank_dtype)
    tokens, layout = largest_bank(info, dtypes, args.doc_tokens, args.gpu_gib * 2**30,
                                  args.host_gib * 2**30, args.tensor_parallel_size,
                                  args.data_parallel_size, args.index_parallel,
                                  not args.no_share_host, args.index_dtype)
    index = dtypes.index if args.index_dtype == "auto" else args.index_dtype
    result = {"tokens": tokens, "doc_tokens": args.doc_tokens,
              "tiers": {**dtypes.to_json(), "index": index},
              "gpu_gib": args.gpu_gib, "host_gib": args.host_gib,
              "layout": layout.to_json() if layout else None}
    if layout is not None:
        gpu_share = layout.gpu_index_per_rank / (args.gpu_gib * 2**30)
        host_share = layout.host_per_node / (args.host_gib * 2**30)
        result["bound_by"] = "GPU index" if gpu_share >= host_share else "host RAM"
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if layout is None:
        print("not even one document fits")
        return 1
    print(f"largest bank: {tokens:,} tokens ({tokens // args.doc_tokens:,} documents of "
          f"{args.doc_tokens:,}), K/V tier {dtypes.kv}, index {index}; bound by "
          f"{result['bound_by']}")
    print(f"  GPU index per rank  {_human(layout.gpu_index_per_rank)} of "
          f"{_human(args.gpu_gib * 2**30)}  (TP={layout.tensor_parallel_size}, "
          f"{layout.index_parallel})")
    print(f"  host RAM per node   {_human(layout.host_per_node)} of "
          f"{_human(args.host_gib * 2**30)}  (DP={layout.data_parallel_size}, "
          + ("shared" if layout.share_host else "a copy per replica") + ")")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from .bank import MemoryBank
    from .bank.synth import plan_synth, synth_bank

    plan = plan_synth(args.model, args.tokens, args.doc_tokens, dtype=args.dtype,
                      seed=args.seed, segment_mb=args.segment_mb, bank_dtype=args.bank_dtype)
    last = plan.doc_num_tokens(plan.num_documents - 1)
    shorter = f", the last one {last:,}" if last != plan.doc_tokens else ""
    print(f"predicted bank: {plan.num_documents:,} synthetic documents of "
          f"{plan.doc_tokens:,} tokens{shorter}")
    _print_info(bank_summary(MemoryBank(Path(args.out), plan.predicted_manifest())))
    if args.dry_run:
        return 0
    sys.stdout.flush()
    if args.virtual:
        from .bank.virtual import write_virtual

        bank = write_virtual(plan, args.out)
    else:
        bank = synth_bank(plan, args.out, progress=not args.no_progress)
    print()
    _print_info(bank_summary(bank))
    return 0


def main(argv: Sequence[str] | None = None, *, exit_process: bool = False) -> int:
    """Run one command; its exit status. `exit_process`: a successful `bank build` ends the
    process itself (`_exit_after_engine`), as the console script does."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # its unknown options are vLLM's: parsed on its own
        from .serve_cli import main as serve

        return serve(argv[1:])
    args = build_parser(argv).parse_args(argv)
    from .bank import BankError
    from .bank.documents import DocumentsError
    from .config import MSAConfigError

    try:
        rc = _run(args)
    except (BankError, DocumentsError, MSAConfigError, FileNotFoundError) as e:
        print(f"vllm-msa: error: {e}", file=sys.stderr)
        return 1
    if rc == 0 and exit_process and getattr(args, "bank_cmd", None) in ("build", "add"):
        _exit_after_engine(rc)
    return rc


def console() -> None:
    """The `vllm-msa` console script (and `python -m vllm_msa.cli`)."""
    try:
        rc = main(exit_process=True)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`vllm-msa bank info | head`): no trace
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        rc = 1
    sys.exit(rc)


def _exit_after_engine(rc: int) -> None:
    """End a process that ran a vLLM engine without the interpreter's teardown.

    The bank is committed (every file fsynced, the manifest written atomically) and the
    engine stopped by then. What is left is the teardown of native libraries loaded with the
    engine (torch, the CPU backend's extensions, OpenBLAS, tokenizers), where a thread still
    joinable at static destruction makes libstdc++ abort ("terminate called without an
    active exception", exit status -6) after the work succeeded: seen now and then on CPU.
    A finished build must exit 0, so it leaves at once, its output flushed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    console()
