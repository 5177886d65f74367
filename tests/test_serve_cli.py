"""`vllm-msa serve` (vllm_msa/serve_cli.py) builds vLLM's server command: banks and options as
flags merged into `--additional-config`, the plugin and its routes named in VLLM_PLUGINS
whatever it held. A real server started this way answers in tests/test_soak.py (its
restart)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vllm_msa.serve_cli import PLUGINS, plugins_env, server_command


def additional_config(command: list[str]) -> dict:
    return json.loads(command[command.index("--additional-config") + 1])


def test_flags_become_additional_config():
    command, _, print_only = server_command([
        "/ckpt", "--bank", "kb=/banks/kb", "--bank=notes=/banks/n", "--default-bank", "kb",
        "--msa", "index_dtype=int8", "--msa", "top_k=8", "--port", "8001",
        "--additional-config", '{"msa": {"score": "dot"}, "other": 1}'])
    assert command[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", "/ckpt"]
    assert "--port" in command and not print_only
    assert additional_config(command) == {
        "msa": {"score": "dot", "banks": {"kb": "/banks/kb", "notes": "/banks/n"},
                "default_bank": "kb", "index_dtype": "int8", "top_k": 8}, "other": 1}


def test_a_bank_given_twice_is_refused():
    with pytest.raises(SystemExit, match="given twice"):
        server_command(["/ckpt", "--bank", "kb=/a", "--additional-config",
                        '{"msa": {"banks": {"kb": "/b"}}}'])
    with pytest.raises(SystemExit):
        server_command(["/ckpt", "--bank", "no-path"])


def test_plugins_named_whatever_vllm_plugins_says():
    assert plugins_env("lora_filesystem_resolver") == "lora_filesystem_resolver,msa,msa_answer"
    assert plugins_env("msa_answer, msa") == "msa_answer,msa"
    unset = plugins_env(None).split(",")  # every installed general plugin, and the routes
    assert set(PLUGINS) <= set(unset) and len(unset) > len(PLUGINS)


def test_console_prints_the_command():
    run = subprocess.run([sys.executable, "-m", "vllm_msa.cli", "serve", "/ckpt", "--bank",
                          "kb=/b", "--print-command"], capture_output=True, text=True,
                         timeout=60, env={"VLLM_PLUGINS": "x", "PATH": ""})
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["VLLM_PLUGINS"] == "x,msa,msa_answer"
    assert additional_config(out["command"]) == {"msa": {"banks": {"kb": "/b"}}}
