"""Answer a question over a memory bank offline, with vLLM's `LLM` class.

    python examples/answer.py --model out/tiny-msa --bank out/sample-bank \
        --question "Which river flooded the old mill?" --dtype float32
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    from vllm import LLM, SamplingParams

    from vllm_msa.prompt import build_prompt

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an MSA checkpoint")
    parser.add_argument("--bank", required=True, help="a bank directory (vllm-msa bank build)")
    parser.add_argument("--question", required=True)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=None, help="documents to attend to")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    args = parser.parse_args()

    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
              gpu_memory_utilization=args.gpu_memory_utilization,
              additional_config={"msa": {"banks": {"bank": args.bank}}})
    extra = {"msa_bank": "bank", "msa_return_selection": True}
    if args.top_k is not None:
        extra["msa_top_k"] = args.top_k
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, extra_args=extra)
    (output,) = llm.generate([build_prompt(llm.get_tokenizer(), args.question)], [params])
    print(json.dumps({"question": args.question, "text": output.outputs[0].text,
                      "selection": output.kv_transfer_params["msa_selection"]}, indent=2))


if __name__ == "__main__":
    main()
