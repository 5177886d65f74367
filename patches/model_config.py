"""Engine set-up for MSA checkpoints with banks: check the banks, pick the MSA scheduler and
the selection connector, select the V1 model runner, make the memory-attention op a graph
split point, admit requests in the front end.

What: registers a `VerifyAndUpdateConfig` for the `MSAForCausalLM` architecture in vLLM's
`MODELS_CONFIG_MAP`, which `VllmConfig.__post_init__` runs (in the process that builds the
engine's config: the `LLM` process or the API server) before the engine starts.
Why: vLLM reads that map for its in-tree models only; there is no registration API. It is the
one place that sees the whole config early enough to refuse a bad bank before any worker
starts, and to set the scheduler, connector and compilation choices vLLM resolves later.
`CompilationConfig._attention_ops` (a class-level list) gains the memory-attention op.
Versions: vLLM 0.32.x and 0.33.x (`vllm.model_executor.models.config.MODELS_CONFIG_MAP`,
`VerifyAndUpdateConfig.verify_and_update_config(vllm_config)`,
`CompilationConfig._attention_ops`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from . import require_vllm

logger = logging.getLogger(__name__)

ARCHITECTURE = "MSAForCausalLM"
SCHEDULER = "vllm_msa.patches.scheduler.MSASchedulerSelector"
CONNECTOR = "MSAConnector"
CONNECTOR_MODULE = "vllm_msa.serving.connector"
MULTI_CONNECTOR = "MSAMultiConnector"
MULTI_CONNECTOR_MODULE = "vllm_msa.patches.multi_connector"


def verify_and_update_config(vllm_config: Any) -> None:
    from vllm_msa.bank.model_info import ModelInfo
    from vllm_msa.bank.reader import MemoryBank
    from vllm_msa.bank.sizing import layout_bytes
    from vllm_msa.options import ServingConfig
    from vllm_msa.serving.admission import Admission

    from .input_processor import install_admission

    serving = ServingConfig.from_additional_config(vllm_config.additional_config)
    if not serving.banks:
        return
    model_config = vllm_config.model_config
    info = ModelInfo.from_checkpoint(model_config.model, str(model_config.dtype))
    banks = {}
    for name, path in serving.banks.items():
        bank = MemoryBank.open(path, info)  # missing, corrupt or mismatched: refused here
        banks[name] = bank
        layout = layout_bytes(bank, vllm_config.parallel_config.tensor_parallel_size,
                              index_parallel=serving.index_parallel,
                              index_dtype=serving.index_dtype_of(name))
        logger.info("MSA bank %r at %s: %d documents, %d tokens; device index %.1f MiB per "
                    "worker (%s), host K/V %.1f MiB per worker", name, path,
                    bank.num_documents, bank.num_tokens, layout.gpu_index_per_rank / 2**20,
                    layout.index_dtype if layout.index_dtype != "auto" else bank.dtypes.index,
                    layout.host_per_rank / 2**20)
    scheduler = vllm_config.scheduler_config
    if scheduler.scheduler_cls not in (None, SCHEDULER):
        raise ValueError(
            f"MSA serving needs its scheduler ({SCHEDULER}, which keeps routing spans in one "
            f"step), but scheduler_cls={scheduler.scheduler_cls!r} was given")
    scheduler.scheduler_cls = SCHEDULER
    use_selection_connector(vllm_config, full_decode_graphs(vllm_config, serving))
    use_v1_model_runner()
    split_graphs_at_memory_attention(vllm_config)
    install_admission(vllm_config, Admission(vllm_config, banks))


def full_decode_graphs(vllm_config: Any, serving: Any) -> bool:
    """Whether decode steps may replay full CUDA graphs with memory attention inside
    (`vllm_msa/attention/decode_graphs.py`): it needs vLLM's flash-attention backend (its LSE
    output and metadata) on a card where that is the default, fp16/bf16, no speculative
    decoding, and the user not asking for piecewise graphs."""
    import torch
    from vllm.platforms import current_platform

    if serving.decode_graphs != "auto" or not current_platform.is_cuda():
        return False
    if vllm_config.model_config.dtype not in (torch.float16, torch.bfloat16):
        return False
    if getattr(vllm_config, "speculative_config", None) is not None:
        return False
    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    if backend is not None and getattr(backend, "name", str(backend)) != "FLASH_ATTN":
        return False
    capability = current_platform.get_device_capability()
    return capability is not None and capability.major in (8, 9)


def use_selection_connector(vllm_config: Any, full_graphs: bool = False) -> None:
    """Attach `MSAConnector` (the channel that returns selections; `full_graphs` tells it
    whether decode may run as full CUDA graphs). A connector the user configured keeps
    running beside it: both go under `MSAMultiConnector` (vLLM's `MultiConnector`, with
    memory requests kept from the user's connectors: patches/multi_connector.py)."""
    from vllm.config import KVTransferConfig

    current = vllm_config.kv_transfer_config
    if current is not None and current.kv_connector == MULTI_CONNECTOR:
        return  # already composed (a config set up twice)
    ours = {"kv_connector": CONNECTOR, "kv_connector_module_path": CONNECTOR_MODULE}
    if current is None or current.kv_connector in (None, CONNECTOR):
        vllm_config.kv_transfer_config = KVTransferConfig(
            **ours, kv_role="kv_both",
            kv_connector_extra_config={"full_decode_graphs": full_graphs})
        return
    theirs = user_connectors(current)
    full_graphs = full_graphs and not any(needs_piecewise(c) for c in theirs)
    if not all(supports_hma(c) for c in theirs):  # as vLLM decides for a MultiConnector
        vllm_config.scheduler_config.disable_hybrid_kv_cache_manager = True
    role = current.kv_role or "kv_both"
    vllm_config.kv_transfer_config = KVTransferConfig(
        kv_connector=MULTI_CONNECTOR, kv_connector_module_path=MULTI_CONNECTOR_MODULE,
        kv_role=role, engine_id=current.engine_id,
        kv_connector_extra_config={
            "full_decode_graphs": full_graphs,
            "connectors": [{**ours, "kv_role": role,
                            "kv_connector_extra_config": {"full_decode_graphs": full_graphs}},
                           *theirs]})
    logger.info("MSA: the selection connector runs beside %s (memory requests never load "
                "or store KV through them)", ", ".join(c["kv_connector"] for c in theirs))


def user_connectors(config: Any) -> list[dict[str, Any]]:
    """The connectors of the user's `KVTransferConfig`, as `MultiConnector` entries: its
    own list if it is a `MultiConnector`, else itself (the fields it sets)."""
    import dataclasses

    if config.kv_connector == "MultiConnector":
        return [dict(c) for c in config.kv_connector_extra_config.get("connectors", [])]
    entry = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else f.default)
        if f.name != "engine_id" and value != default:
            entry[f.name] = value
    return [entry]


def needs_piecewise(entry: dict[str, Any]) -> bool:
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    cls = KVConnectorFactory.get_connector_class(KVTransferConfig(**entry))
    return bool(cls.requires_piecewise_for_cudagraph(entry.get("kv_connector_extra_config")
                                                     or {}))


def supports_hma(entry: dict[str, Any]) -> bool:
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    return KVConnectorFactory.supports_hma_config(KVTransferConfig(**entry))


def use_v1_model_runner() -> None:
    """The memory runtime gets each step's batch from the V1 model runner (see
    `patches/model_runner.py`); Model Runner V2's per-request hook is not wired yet, so MSA
    engines select V1 (process-wide, inherited by the engine processes)."""
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") not in ("0", "false", "False"):
        raise ValueError("MSA serving runs on vLLM's V1 model runner for now; unset "
                         "VLLM_USE_V2_MODEL_RUNNER")
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


def split_graphs_at_memory_attention(vllm_config: Any) -> None:
    """The router-attention op routes and stages in Python, so it must run on every step:
    it becomes a graph-splitting op like vLLM's attention ops (added to
    `CompilationConfig._attention_ops`, which vLLM turns into `splitting_ops` later in config
    set-up, or to an explicit `splitting_ops`). CUDA graphs are then piecewise only: a full
    graph would replay the op without its Python; `MSAConnector` asks vLLM for that
    (`requires_piecewise_for_cudagraph`) once the graph mode is resolved."""
    from vllm.config.compilation import CompilationConfig

    from vllm_msa.attention.ops import OP_QUALNAME

    if OP_QUALNAME not in CompilationConfig._attention_ops:
        CompilationConfig._attention_ops.append(OP_QUALNAME)
    compilation = vllm_config.compilation_config
    if compilation.splitting_ops is not None and OP_QUALNAME not in compilation.splitting_ops:
        compilation.splitting_ops.append(OP_QUALNAME)


def install_model_config_hook() -> None:
    require_vllm("the MSA engine set-up hook")
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    if ARCHITECTURE in MODELS_CONFIG_MAP:
        return

    class MSAForCausalLMConfig(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config: Any) -> None:
            verify_and_update_config(vllm_config)

    MODELS_CONFIG_MAP[ARCHITECTURE] = MSAForCausalLMConfig
