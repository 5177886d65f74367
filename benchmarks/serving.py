"""Answering over a bank vs plain vLLM on the same prompts, one run, same checkpoint.

The baseline is the same engine configuration without a bank: what memory costs on top of
vLLM (routing at prefill, host->device staging, memory attention merged into every router
layer's attention). Prints a table and writes the numbers (card, versions, command) as JSON.

    python benchmarks/serving.py --shape msa-4b --docs 2000 --doc-tokens 500 --questions 256
    python benchmarks/serving.py --shape tiny --docs 64 --questions 16 --max-tokens 16  # CPU
"""

from __future__ import annotations

import random
import time

from bank_build import WORDS, card_name, common_arguments, make_docs, prepare, write_result


def questions(n: int, words: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) + "?" for _ in range(n)]


def main() -> None:
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--bank", help="an existing bank of --model (default: build one)")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--question-words", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--eager-only", action="store_true")
    args = parser.parse_args()
    work, ckpt, engine = prepare(args)

    import torch
    from vllm import LLM, SamplingParams

    from vllm_msa.bank import MemoryBank
    from vllm_msa.bank.build import build_bank
    from vllm_msa.prompt import build_prompt

    if args.bank:
        bank = MemoryBank.open(args.bank, ckpt)
    else:
        docs = work / "serving-docs.jsonl"
        make_docs(docs, args.docs, args.doc_tokens)
        bank = build_bank(ckpt, docs, work / f"serving-bank-{args.shape}-{args.docs}",
                          progress=False, **engine)

    rows = []
    modes = [("eager", True)] + ([] if args.eager_only or not torch.cuda.is_available()
                                 else [("compiled + graphs", False)])
    for mode, eager in modes:
        for with_bank in (False, True):
            extra = {"additional_config": {"msa": {"banks": {"b": str(bank.path)}}}} \
                if with_bank else {}
            llm = LLM(model=str(ckpt), enforce_eager=eager, **engine, **extra)
            tokenizer = llm.get_tokenizer()
            prompts = [build_prompt(tokenizer, q)
                       for q in questions(args.questions, args.question_words)]
            params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True,
                                    extra_args={"msa_bank": "b"} if with_bank else None)
            llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up (JIT, allocator)
            t = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - t
            llm.llm_engine.engine_core.shutdown()
            rows.append({
                "mode": f"{'MSA over the bank' if with_bank else 'plain vLLM'}, {mode}",
                "requests": len(prompts),
                "prompt_tokens": sum(len(p["prompt_token_ids"]) for p in prompts),
                "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
                "seconds": seconds,
            })

    card = card_name()
    print(f"\nanswering {args.questions} questions on {card}, {args.shape} shape, bank of "
          f"{bank.num_documents} documents ({bank.num_tokens:,} tokens, {bank.num_chunks:,} "
          f"chunks), {args.max_tokens} output tokens each\n")
    print(f"{'mode':<36} {'seconds':>8} {'output tok/s':>13} {'vs plain':>9}")
    for i, r in enumerate(rows):
        plain = rows[i - i % 2]["seconds"]
        r["output_tokens_per_s"] = r["output_tokens"] / r["seconds"]
        r["relative_to_plain"] = plain / r["seconds"]
        print(f"{r['mode']:<36} {r['seconds']:>8.2f} {r['output_tokens_per_s']:>13,.0f} "
              f"{r['relative_to_plain']:>8.2f}x")

    result = {
        "benchmark": "serving",
        "card": card,
        "shape": args.shape,
        "bank": {"documents": bank.num_documents, "tokens": bank.num_tokens,
                 "chunks": bank.num_chunks, "bytes": bank.tier_bytes()},
        "rows": rows,
    }
    write_result(result, args)

if __name__ == "__main__":
    main()
