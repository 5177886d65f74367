"""A stand-in for the stage-1 engine, for bank tests that need encodings but not the model.

It answers what `vllm_msa.bank.build` asks of a `vllm.LLM` (the tokenizer, the model config's
dtype and max_model_len, `encode` in document and template mode) with seeded random tensors
of the right shapes, a pure function of each prompt's token ids: batch-invariant by
construction, and the same in every process. `build_bank(..., llm=FakeEncoder(ckpt))` and
`add_documents(..., llm=...)` run their real paths (tokenising, segmenting, writing) on it
without an engine start. Tests of the real engine's encodings live in test_stage1.py and
test_bank_edit_engine.py.
"""

from __future__ import annotations

import zlib
from types import SimpleNamespace

import torch

from vllm_msa.bank import ModelInfo


class FakeEncoder:
    def __init__(self, ckpt, max_model_len: int = 1024) -> None:
        from transformers import AutoTokenizer

        self.info = ModelInfo.from_checkpoint(ckpt, "float32")
        self.tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(
            dtype=torch.float32, max_model_len=max_model_len))
        self.documents_encoded = 0

    def get_tokenizer(self):
        return self.tokenizer

    def encode(self, prompts, pooling_params, pooling_task, use_tqdm):
        from vllm_msa.encoder import DOCUMENT_MODE, ENCODE_MODE_KEY

        info = self.info
        kv = (info.num_kv_heads, info.head_dim)
        document = pooling_params.extra_kwargs[ENCODE_MODE_KEY] == DOCUMENT_MODE
        outputs = []
        for prompt in prompts:
            ids = prompt["prompt_token_ids"]
            gen = torch.Generator().manual_seed(zlib.crc32(repr(ids).encode()))
            shape = ((-(-len(ids) // info.pooling_kernel_size), len(info.router_layers), 3, *kv)
                     if document else (len(ids), info.num_layers, 2, *kv))
            outputs.append(SimpleNamespace(outputs=SimpleNamespace(
                data=torch.randn(shape, generator=gen))))
        self.documents_encoded += len(prompts) if document else 0
        return outputs
