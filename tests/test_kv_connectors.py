"""A deployment's own KV connector beside MSA's selection channel (patches/multi_connector.py).

vLLM's shared-storage `ExampleConnector` keys stored KV by prompt tokens alone, so it is the
hard case: a request with memory must never load the KV it stored for a plain request with
the same tokens (nor store its own). Plain requests keep using it. Prefix caching is off, so
a second plain run can only get its KV back through the connector.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import running_llm
from msa_reference import reference_answer
from reference import ReferenceMSA
from test_serving import (
    MAX_TOKENS,
    assert_staging_released,
    bank_docs,
    check_against_reference,
    expected_prompt,
    sampling,
)

pytestmark = pytest.mark.slow
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

QUESTION = "Which river flooded the old mill?"


def stored(storage: Path) -> set[str]:
    return {p.name for p in storage.iterdir()}


@pytest.fixture(scope="module")
def engine(checkpoints, default_banks, tmp_path_factory):
    from vllm.config import KVTransferConfig

    storage = tmp_path_factory.mktemp("kv-store")
    theirs = KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both",
                              kv_connector_extra_config={"shared_storage_path": str(storage)})
    with running_llm(model=str(checkpoints()), enforce_eager=True, block_size=32,
                     enable_prefix_caching=False, kv_transfer_config=theirs,
                     additional_config={"msa": {"banks": {
                         "docs": str(default_banks["docs"].path)}}}) as llm:
        yield llm, storage


def test_both_connectors_are_configured(engine):
    llm, _ = engine
    config = llm.llm_engine.vllm_config.kv_transfer_config
    assert config.kv_connector == "MSAMultiConnector"
    names = [c["kv_connector"] for c in config.kv_connector_extra_config["connectors"]]
    assert names == ["MSAConnector", "ExampleConnector"]


def test_plain_requests_use_it_and_memory_requests_never_do(engine, checkpoints,
                                                            default_banks):
    llm, storage = engine
    tokenizer = llm.get_tokenizer()
    ids, span = expected_prompt(tokenizer, QUESTION)
    prompt = {"prompt_token_ids": ids}
    ref = ReferenceMSA(checkpoints())

    (first,) = llm.generate([prompt], [sampling()], use_tqdm=False)
    saved = stored(storage)
    assert saved, "the user's connector stored nothing for a plain request"
    (again,) = llm.generate([prompt], [sampling()], use_tqdm=False)
    assert again.num_cached_tokens > 0, "the plain request did not load through the connector"
    plain = reference_answer(ref, ids, span, None, top_k=4, rope_offset_k=4,
                             template_len=span[0], max_tokens=MAX_TOKENS)
    check_against_reference(first, plain, ref.router_layers)
    check_against_reference(again, plain, ref.router_layers)

    # The same tokens with memory: the connector holds KV for them, computed without memory.
    # Loading it would answer as the plain model does.
    (memory,) = llm.generate([prompt], [sampling(msa_bank="docs", msa_return_selection=True)],
                             use_tqdm=False)
    assert memory.num_cached_tokens == 0
    expected = reference_answer(ref, ids, span, bank_docs(tokenizer, default_banks["docs"]),
                                top_k=4, rope_offset_k=4, template_len=span[0],
                                max_tokens=MAX_TOKENS)
    check_against_reference(memory, expected, ref.router_layers)
    assert expected.tokens != plain.tokens or any(  # (or the test could not fail)
        (a - b).abs().max() > 1e-3 for a, b in zip(expected.logprobs, plain.logprobs,
                                                   strict=True))
    # ... and it stored nothing of its own (a later plain request could have loaded it).
    longer, _ = expected_prompt(tokenizer, QUESTION + " Name it.")
    llm.generate([{"prompt_token_ids": longer}],
                 [sampling(msa_bank="docs")], use_tqdm=False)
    assert stored(storage) == saved
    assert_staging_released(llm)
