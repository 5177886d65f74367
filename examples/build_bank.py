"""Build a memory bank from Python and read it back (the API the serving path uses).

    python examples/build_bank.py --model out/tiny-msa --docs examples/sample_docs.jsonl \
        --out out/api-bank --dtype float32
"""

import argparse

from vllm_msa.bank import MemoryBank, build_bank

if __name__ == "__main__":  # vLLM spawns its engine processes: keep the guard
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--docs", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    build_bank(args.model, args.docs, args.out, dtype=args.dtype, max_model_len=1024,
               gpu_memory_utilization=0.3)

    bank = MemoryBank.open(args.out, args.model, dtype=None if args.dtype == "auto" else args.dtype)
    first = bank.router_layers[0]
    print(f"{bank.num_documents} documents, {bank.num_chunks} chunks, router layers "
          f"{bank.router_layers}")
    print(f"layer {first}: routing keys {tuple(bank.layer(first).routing_keys.shape)}, "
          f"chunk 0 belongs to document {int(bank.chunk_doc_ids[0])}: "
          f"{bank.text(int(bank.chunk_doc_ids[0]))[:60]!r}")
    k, v = bank.template_kv(0)
    print(f"template head {bank.template_ids}: K {tuple(k.shape)}, V {tuple(v.shape)}")
