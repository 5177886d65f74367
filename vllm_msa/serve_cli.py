"""`vllm-msa serve`: vLLM's own OpenAI server with the plugin's options given as flags.

    vllm-msa serve CKPT --bank NAME=PATH [--bank ...] [--default-bank NAME]
                        [--msa KEY=JSON ...] [any vLLM server option]

A thin front, no server of its own: it builds `--additional-config` from the flags (merged
with one given explicitly), makes sure vLLM loads the plugin and its routes
(`/v1/msa/answer`) whatever `VLLM_PLUGINS` says, and replaces itself with
`python -m vllm.entrypoints.openai.api_server` (what `vllm serve` runs, and what starts with
both the CUDA and the CPU builds of vLLM). Imports nothing heavy: `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

PLUGINS = ("msa", "msa_answer")  # the plugin (vllm.general_plugins) and its routes
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def _bank(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string: --msa index_dtype=int8


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vllm-msa serve", description=__doc__.split("\n\n")[0],
        epilog="Every other option goes to vLLM's server unchanged (`vllm serve --help` "
        "lists them). Engine options under additional_config[\"msa\"]: docs/serving.md.")
    p.add_argument("model", help="the MSA checkpoint")
    p.add_argument("--bank", action="append", type=_bank, default=[], metavar="NAME=PATH",
                   help="a memory bank to serve (repeatable)")
    p.add_argument("--default-bank", metavar="NAME",
                   help="the bank a request without msa_bank reads")
    p.add_argument("--msa", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help='any other additional_config["msa"] option, the value as JSON or a '
                   "bare string, e.g. --msa index_dtype=int8 --msa top_k=8 (repeatable)")
    p.add_argument("--print-command", action="store_true",
                   help="print the server command and VLLM_PLUGINS as JSON instead of running")
    return p


def _take_additional_config(rest: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The `--additional-config` among vLLM's options (parsed), and the options without it."""
    config: dict[str, Any] = {}
    kept: list[str] = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--additional-config" and i + 1 < len(rest):
            config, i = json.loads(rest[i + 1]), i + 2
            continue
        if arg.startswith("--additional-config="):
            config = json.loads(arg.split("=", 1)[1])
        else:
            kept.append(arg)
        i += 1
    if not isinstance(config, dict):
        raise SystemExit("vllm-msa serve: --additional-config must be a JSON object")
    return config, kept


def plugins_env(current: str | None) -> str:
    """VLLM_PLUGINS naming the plugin and its routes. vLLM loads every general plugin when
    the variable is unset but endpoint plugins only when named, so an unset one becomes
    every installed general plugin plus the routes; a set one gains what it lacks."""
    if current is None:
        names = sorted({ep.name for ep in metadata.entry_points(group="vllm.general_plugins")})
    else:
        names = [n.strip() for n in current.split(",") if n.strip()]
    return ",".join([*names, *(p for p in PLUGINS if p not in names)])


def server_command(argv: Sequence[str]) -> tuple[list[str], str, bool]:
    """(the server's argv, its VLLM_PLUGINS, whether only to print them) for `vllm-msa
    serve` arguments `argv`."""
    args, rest = parser().parse_known_args(list(argv))
    config, rest = _take_additional_config(rest)
    msa = config.setdefault("msa", {})
    banks = msa.setdefault("banks", {})
    for name, path in args.bank:
        if name in banks and banks[name] != path:
            raise SystemExit(f"vllm-msa serve: bank {name!r} is given twice, as "
                             f"{banks[name]!r} and {path!r}")
        banks[name] = path
    if args.default_bank is not None:
        msa["default_bank"] = args.default_bank
    for key, value in args.msa:
        msa[key] = value
    command = [sys.executable, "-m", SERVER_MODULE, "--model", args.model, *rest,
               "--additional-config", json.dumps(config)]
    return command, plugins_env(os.environ.get("VLLM_PLUGINS")), args.print_command


def main(argv: Sequence[str]) -> int:
    command, plugins, print_only = server_command(argv)
    if print_only:
        print(json.dumps({"command": command, "VLLM_PLUGINS": plugins}))
        return 0
    os.execvpe(command[0], command, {**os.environ, "VLLM_PLUGINS": plugins})
    return 0  # (not reached: the server replaces this process)
