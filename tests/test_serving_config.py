"""Engine start-up with banks attached: a missing, unfinished, corrupt or mismatched bank, or a
bad `additional_config["msa"]`, stops `LLM(...)` before any engine process starts, with the
reason."""

from __future__ import annotations

import shutil

import pytest
from conftest import ENGINE_DEFAULTS

pytestmark = pytest.mark.slow


def start(ckpt, msa: dict):
    from vllm import LLM

    return LLM(model=str(ckpt), enforce_eager=True, additional_config={"msa": msa},
               **ENGINE_DEFAULTS)


@pytest.fixture
def bank_copy(default_banks, tmp_path):
    path = tmp_path / "copy"
    shutil.copytree(default_banks["docs"].path, path)
    return path


def test_missing_bank(checkpoints, tmp_path):
    with pytest.raises(Exception, match="no bank at"):
        start(checkpoints(), {"banks": {"docs": str(tmp_path / "nowhere")}})


def test_unfinished_bank(checkpoints, bank_copy):
    (bank_copy / "manifest.json").unlink()
    (bank_copy / "build-state.json").write_text("{}")
    with pytest.raises(Exception, match="unfinished bank build"):
        start(checkpoints(), {"banks": {"docs": str(bank_copy)}})


def test_corrupt_bank(checkpoints, bank_copy):
    segment = next((bank_copy / "segments").iterdir())
    segment.write_bytes(segment.read_bytes()[:-100])
    with pytest.raises(Exception, match="truncated or replaced"):
        start(checkpoints(), {"banks": {"docs": str(bank_copy)}})


def test_bank_of_another_model(checkpoints, default_banks):
    other = checkpoints(kv_heads=1)
    with pytest.raises(Exception, match="num_kv_heads: bank has 2, model has 1"):
        start(other, {"banks": {"docs": str(default_banks["docs"].path)}})


@pytest.mark.parametrize(("msa", "message"), [
    ({"banks": {"docs": "x"}, "default_bank": "other"}, "default_bank 'other'"),
    ({"banks": {"../up": "x"}}, "bank name"),
    ({"banks": {"docs": "x"}, "score": "l2"}, "score must be one of"),
    ({"banks": {"docs": "x"}, "top_k": 0}, "top_k must be a positive integer"),
    ({"bankz": {}}, "unknown keys"),
    ({"banks": {"docs": "x"}, "decode_graphs": "full"}, "decode_graphs must be one of"),
    ({"banks": {"docs": "x"}, "index_parallel": "split"}, "index_parallel must be one of"),
    ({"banks": {"docs": "x"}, "share_host": "yes"}, "share_host must be true or false"),
    ({"banks": {"docs": "x"}, "host_cache_gib": 0}, "host_cache_gib must be a positive"),
    ({"banks": {"docs": {"path": "x", "host_cache_gib": "1"}}}, "host_cache_gib must be a"),
    ({"banks": {"docs": {"path": "x", "cache": 1}}}, "an entry is a path or"),
    ({"banks": {"docs": "x"}, "index_dtype": "int4"}, "index_dtype must be one of"),
    ({"banks": {"docs": {"path": "x", "index_dtype": "fp16"}}}, "'docs' index_dtype must be"),
])
def test_bad_serving_config(checkpoints, msa, message):
    with pytest.raises(Exception, match=message):
        start(checkpoints(), msa)


def test_too_small_a_disk_tier_cache_is_refused_at_start(checkpoints, default_banks, capfd):
    bank = str(default_banks["docs"].path)
    with pytest.raises(Exception, match="initialization failed"):
        start(checkpoints(), {"banks": {"docs": {"path": bank, "host_cache_gib": 1e-6}}})
    log = "".join(capfd.readouterr())
    assert "chunks per router layer; a full batch" in log and "raise host_cache_gib" in log


def test_flipped_bit_is_refused_when_the_bank_loads(checkpoints, bank_copy, capfd):
    """Same size, one bit changed inside tensor data: only the checksum sees it. The worker
    verifies while it loads the tiers and stops the start, naming the file (in the log;
    vLLM reports a worker's start-up failure as "see root cause above")."""
    segment = next((bank_copy / "segments").iterdir())
    data = bytearray(segment.read_bytes())
    data[-4000] ^= 0x04
    segment.write_bytes(bytes(data))
    with pytest.raises(Exception, match="initialization failed"):
        start(checkpoints(), {"banks": {"docs": str(bank_copy)}})
    log = "".join(capfd.readouterr())
    assert f"is corrupt: segments/{segment.name}: blake3" in log


def test_reserve_tokens_engine_wide_and_per_bank():
    from vllm_msa.options import MSAServingConfigError, ServingConfig

    config = ServingConfig.from_additional_config({"msa": {
        "banks": {"a": "x", "b": {"path": "y", "reserve_tokens": 0}}, "reserve_tokens": 640}})
    assert (config.reserve_of("a"), config.reserve_of("b")) == (640, 0)
    for bad in ({"reserve_tokens": -1}, {"reserve_tokens": 1.5}, {"reserve_tokens": True}):
        with pytest.raises(MSAServingConfigError, match="reserve_tokens must be an integer"):
            ServingConfig.from_additional_config({"msa": {"banks": {"a": "x"}, **bad}})
    with pytest.raises(MSAServingConfigError, match="'a' reserve_tokens must be"):
        ServingConfig.from_additional_config(
            {"msa": {"banks": {"a": {"path": "x", "reserve_tokens": "9"}}}})
