"""Answer questions over a memory bank offline, with vLLM's `LLM` class.

    python examples/answer.py --model out/tiny-msa --bank out/sample-bank --dtype float32 \
        --question "Which river flooded the old mill?" --question "Who painted the barn?"

By default each question runs Memory Interleave (`vllm_msa.interleave.answer`: the model names
documents, their texts are appended, it may re-route, then answers); all questions share the
engine. `--single` sends one routed request per question instead.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    import summary  # examples/summary.py
    from vllm import LLM, SamplingParams

    from vllm_msa.interleave import answer
    from vllm_msa.prompt import build_prompt

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an MSA checkpoint")
    parser.add_argument("--bank", required=True, help="a bank directory (vllm-msa bank build)")
    parser.add_argument("--question", required=True, action="append",
                        help="repeat for several questions (answered together)")
    parser.add_argument("--max-tokens", type=int, default=64,
                        help="tokens per question (all Memory Interleave steps together)")
    parser.add_argument("--max-rounds", type=int, default=8, help="routings per question")
    parser.add_argument("--top-k", type=int, default=None, help="documents to attend to")
    parser.add_argument("--single", action="store_true",
                        help="one routed request per question, no Memory Interleave")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--summary", default=None,
                        help="also append a short readable account of each answer to this file")
    args = parser.parse_args()

    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
              gpu_memory_utilization=args.gpu_memory_utilization,
              additional_config={"msa": {"banks": {"bank": args.bank}}})
    if not args.single:
        results = answer(llm, args.question, bank="bank", top_k=args.top_k,
                         max_tokens=args.max_tokens, max_rounds=args.max_rounds)
        for result in results:
            print(json.dumps(result.to_json(), indent=2))
            summary.write(args.summary, summary.summarize(result.to_json(), "offline (LLM class)"))
        return
    extra = {"msa_bank": "bank", "msa_return_selection": True}
    if args.top_k is not None:
        extra["msa_top_k"] = args.top_k
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, extra_args=extra)
    tokenizer = llm.get_tokenizer()
    outputs = llm.generate([build_prompt(tokenizer, q) for q in args.question], params)
    for question, output in zip(args.question, outputs, strict=True):
        result = {"question": question, "text": output.outputs[0].text,
                  "selection": output.kv_transfer_params["msa_selection"]}
        print(json.dumps(result, indent=2))
        summary.write(args.summary, summary.summarize(result, "offline (LLM class), one request"))


if __name__ == "__main__":
    main()
