"""A collective RPC that reaches every worker of every data-parallel engine.

What: `collective_rpc_all(engine_client, method, args)` runs `method` on every worker of every
engine core the API server manages, through the engine client's per-engine utility call
(`AsyncMPClient.call_utility_all_async("collective_rpc", ...)`), and flattens the results.
Why: `AsyncLLM.collective_rpc` reaches one engine core (the first, or, load-balanced, all of
them with only the first's answer), and a bank edit must switch every replica and report
each one's state. Versions: vLLM 0.32.x and 0.33.x; elsewhere (an in-process client) it
falls back to `collective_rpc`.
"""

from __future__ import annotations

from typing import Any

from . import require_vllm


async def collective_rpc_all(engine_client: Any, method: str, args: tuple = ()) -> list[Any]:
    require_vllm("the MSA bank-edit RPC")
    core = getattr(engine_client, "engine_core", None)
    call_all = getattr(core, "call_utility_all_async", None)
    if call_all is None:
        return list(await engine_client.collective_rpc(method, args=args))
    per_engine = await call_all("collective_rpc", method, None, args, None)
    return [result for engine in per_engine for result in engine]
