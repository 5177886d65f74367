"""msa_config parsing, plugin registration and tiny checkpoints (no engine)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from vllm_msa.config import MSAConfig, MSAConfigError, MSAParams

MSA4B = {
    "router_layer_idx": ",".join(str(i) for i in range(18, 36)),
    "top_k_docs": 16,
    "pooling_kernel_size": 64,
    "decouple_router": True,
    "head_reduce_method": "mean",
    "query_reduce_method": "max",
    "chunk_reduce_method": "max",
    "aux_loss_method": "INFONCE_DECOUPLE",
    # training-only keys
    "aux_loss": True, "lmloss_weigth": 1.0, "auxloss_weight": 0.1, "infonce_loss_temp": 0.05,
    "rewrite_position": True, "decouple_pooling_mode": "mean", "some_future_key": 3,
}


def test_msa_4b_config_parses():
    p = MSAParams.from_dict(MSA4B, num_layers=36)
    assert p.router_layers == tuple(range(18, 36))
    assert p.top_k == 16 and p.pooling_kernel_size == 64 and p.decouple_router
    assert (p.head_reduce, p.query_reduce, p.chunk_reduce) == ("mean", "max", "max")
    assert not p.normalize_routing
    assert p.routing_scale(128) == pytest.approx(128**-0.5)
    assert p.is_router_layer(18) and not p.is_router_layer(17)


def test_top_k_precedence():
    assert MSAParams.from_dict({**MSA4B, "doc_top_k": 8}, num_layers=36).top_k == 8
    no_doc = {k: v for k, v in MSA4B.items() if k != "doc_top_k"}
    assert MSAParams.from_dict(no_doc, num_layers=36).top_k == 16
    neither = {k: v for k, v in MSA4B.items() if k not in ("doc_top_k", "top_k_docs")}
    assert MSAParams.from_dict({**neither, "top_k_docs": None}, num_layers=36).top_k == 16
    assert MSAParams.from_dict({"top_k_docs": 5}, num_layers=4).top_k == 5


def test_routing_similarity():
    infonce = MSAParams.from_dict({**MSA4B, "aux_loss_method": "INFONCE"}, num_layers=36)
    assert infonce.normalize_routing and infonce.routing_scale(128) == 1.0
    coupled = MSAParams.from_dict(
        {**MSA4B, "aux_loss_method": "INFONCE", "decouple_router": False}, num_layers=36)
    assert coupled.normalize_routing and coupled.routing_scale(64) == pytest.approx(0.125)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("all", (0, 1, 2, 3)), ("3,1", (1, 3)), ([0, 2], (0, 2)), (2, (2,)), ("ALL", (0, 1, 2, 3))],
)
def test_router_layer_forms(value, expected):
    assert MSAParams.from_dict({"router_layer_idx": value}, num_layers=4).router_layers == expected


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("head_reduce_method", "sum",
         "head_reduce_method: invalid value 'sum'; allowed values: mean, max"),
        ("query_reduce_method", "first", "allowed values: max, mean, last"),
        ("chunk_reduce_method", "min", "allowed values: max, mean"),
        ("pooling_kernel_size", 0,
         "pooling_kernel_size: invalid value 0; expected an integer >= 1"),
        ("pooling_kernel_size", "64", "pooling_kernel_size"),
        ("doc_top_k", -1, "doc_top_k: invalid value -1"),
        ("decouple_router", "yes", "decouple_router: invalid value 'yes'; expected true or false"),
        ("router_layer_idx", "4,5", "layers [4, 5] out of range"),
        ("router_layer_idx", "1,1", "duplicate layers"),
        ("router_layer_idx", "a,b", "router_layer_idx: invalid value"),
        ("router_layer_idx", "", "router_layer_idx is empty"),
        ("aux_loss_method", 3, "aux_loss_method: invalid value 3"),
    ],
)
def test_invalid_values_name_key_and_allowed_values(key, value, message):
    with pytest.raises(MSAConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        MSAParams.from_dict({key: value}, num_layers=4)


def test_not_an_msa_config():
    with pytest.raises(MSAConfigError, match="no `msa_config`"):
        MSAParams.from_hf_config(MSAConfig(num_hidden_layers=2))


def test_register_is_idempotent_and_registers_everything():
    code = (
        "import vllm_msa, transformers\n"
        "from vllm import ModelRegistry\n"
        "vllm_msa.register(); vllm_msa.register()\n"
        "archs = ModelRegistry.get_supported_archs()\n"
        "assert 'MSAForCausalLM' in archs and 'MSABankEncoder' in archs\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "assert CONFIG_MAPPING['msa'] is vllm_msa.config.MSAConfig\n"
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"  # the installed entry point runs the same register()
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_plugin_log_lines_go_where_vllms_go():
    """Records of `vllm_msa.*` loggers come out through vLLM's handler and format, at vLLM's
    level, once: before, INFO lines (bank load, staging pool, warm-up) never showed."""
    code = (
        "import logging\n"
        "logging.basicConfig(format='root: %(message)s')\n"  # a root handler, on stderr
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"  # the installed entry point, as every vLLM process runs it
        # then, as an engine (core, worker) does on start, possibly after the plugins loaded:
        "from vllm.config.logging import LoggingConfig\n"
        "from vllm.logger import configure_logging\n"
        "configure_logging(LoggingConfig())\n"
        "log = logging.getLogger('vllm_msa.attention.staging')\n"
        "log.info('msa-info-line %d', 7); log.debug('msa-debug-line')\n"
        "logging.getLogger('vllm_msa.attention.warmup').warning('msa-warning-line')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "VLLM_LOGGING_LEVEL": "INFO",
                                              "VLLM_LOGGING_STREAM": "ext://sys.stdout",
                                              "VLLM_CONFIGURE_LOGGING": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if "msa-" in line]
    assert len(lines) == 2, result.stdout[-2000:] + result.stderr[-2000:]
    info, warning = lines
    # vLLM's format: level, date, [file:line], message.
    assert re.search(r"INFO .*\[<string>:\d+\] msa-info-line 7$", info), info
    assert "WARNING" in warning and warning.endswith("msa-warning-line"), warning
    assert "msa-" not in result.stderr  # not a second copy through the root logger


def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    eps = entry_points(group="vllm.general_plugins")
    assert any(ep.value == "vllm_msa:register" for ep in eps)


def test_unsupported_vllm_version_is_reported(monkeypatch):
    import vllm

    import vllm_msa

    monkeypatch.setattr(vllm, "__version__", "0.31.2")
    problem = vllm_msa.vllm_version_problem()
    assert problem and "supports vLLM >=0.32,<0.34" in problem and "0.31.2" in problem
    monkeypatch.setattr(vllm, "__version__", "0.33.1+cu130")
    assert vllm_msa.vllm_version_problem() is None


def test_tiny_checkpoint_is_deterministic_and_complete(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    import vllm_msa
    from vllm_msa.cli import main

    args = ["--seed", "5", "--layers", "3", "--router-layers", "all", "--kv-heads", "1",
            "--pooling", "7", "--head-reduce", "max", "--query-reduce", "last",
            "--chunk-reduce", "mean", "--aux-loss-method", "BCE", "--no-decouple-router"]
    assert main(["make-tiny-checkpoint", str(tmp_path / "a"), *args]) == 0
    assert main(["make-tiny-checkpoint", str(tmp_path / "b"), *args]) == 0
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert main(["make-tiny-checkpoint", str(tmp_path / "c"), *args[2:], "--seed", "6"]) == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (
        tmp_path / "c" / "model.safetensors").read_bytes()

    vllm_msa.register()
    cfg = AutoConfig.from_pretrained(tmp_path / "a")
    assert type(cfg).__name__ == "MSAConfig" and cfg.architectures == ["MSAForCausalLM"]
    p = MSAParams.from_hf_config(cfg)
    assert (p.router_layers, p.pooling_kernel_size, p.decouple_router) == ((0, 1, 2), 7, False)
    assert (p.head_reduce, p.query_reduce, p.chunk_reduce) == ("max", "last", "mean")
    raw = json.loads((tmp_path / "a" / "config.json").read_text())
    assert raw["model_type"] == "msa" and raw["msa_config"]["aux_loss_method"] == "BCE"

    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    for special in ("<|im_start|>", "<|im_end|>", "<|object_ref_end|>", "<|endoftext|>",
                    "<End-of-Retrieve>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1, special
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    text = "Paris is the capital of France."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
