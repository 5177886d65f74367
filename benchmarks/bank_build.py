"""Stage-1 throughput: building a bank vs plain vLLM prefill of the same checkpoint, one run.

Encoding a bank is a prefill of every document plus capture, chunk pooling and writing. Its
natural baseline is vLLM prefilling the same token ids with the same model (`max_tokens=1`),
eager as the encoder runs and with vLLM's default compile + CUDA graphs. Prints a table and
writes the numbers (card, versions, command) as JSON.

    python benchmarks/bank_build.py --shape msa-4b --docs 2000 --doc-tokens 500
    python benchmarks/bank_build.py --shape tiny --docs 64 --doc-tokens 200   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

from report import card_name

SHAPES = {
    # MSA-4B: Qwen3-4B with 18 router layers (msa-spec §1).
    "msa-4b": dict(layers=36, router_layers=",".join(map(str, range(18, 36))), hidden=2560,
                   heads=32, kv_heads=8, head_dim=128, intermediate=9728, pooling=64, top_k=16,
                   dtype="bfloat16", rope_theta=5e6),
    "tiny": dict(dtype="float32"),
}
VOCABULARY = (
    "memory sparse attention routes each question over a bank of documents the quick brown "
    "fox jumps over the lazy dog paris berlin capital france germany garden harvest"
)
WORDS = VOCABULARY.split()


def make_docs(path: Path, n: int, approx_tokens: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = [rng.choice(WORDS) for _ in range(approx_tokens)]
            f.write(json.dumps({"id": i, "text": " ".join(words)}) + "\n")


def common_arguments(description: str) -> argparse.ArgumentParser:
    """The options every benchmark here shares (checkpoint, documents, output)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--model", help="an existing MSA checkpoint (default: a random one)")
    parser.add_argument("--docs", type=int, default=64)
    parser.add_argument("--doc-tokens", type=int, default=200)
    parser.add_argument("--work", default="/tmp/vllm-msa-bench")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--bank-dtype", choices=("auto", "fp8_e4m3"), default="auto",
                        help="the synthetic banks' K/V tier dtype (`bank synth --bank-dtype`)")
    parser.add_argument("--virtual", action="store_true",
                        help="virtual synthetic banks: a manifest only, tensors generated as "
                        "the engine opens them (`bank synth --virtual`; no disk needed)")
    parser.add_argument("--index-dtype", choices=("auto", "int8", "fp8_e4m3"), default="auto",
                        help='the routing index on the GPU (additional_config["msa"]'
                        '["index_dtype"]): 8 bits, exact selections by re-scoring')
    parser.add_argument("--json", help="write results here (default benchmarks/results/...)")
    return parser


def synthetic_bank(args: argparse.Namespace, ckpt: Path, tokens: int, dtype: str | None,
                   work: Path):
    """The synthetic bank of `tokens` these arguments ask for (written, or virtual)."""
    from vllm_msa.bank.synth import plan_synth, synth_bank
    from vllm_msa.bank.virtual import write_virtual

    plan = plan_synth(ckpt, tokens, args.doc_tokens, dtype=dtype, bank_dtype=args.bank_dtype)
    name = f"synth-{args.shape}-{tokens}" + ("-fp8" if args.bank_dtype != "auto" else "")
    if args.virtual:
        return write_virtual(plan, work / (name + "-virtual"))
    return synth_bank(plan, work / name, progress=False)


def prepare(args: argparse.Namespace) -> tuple[Path, Path, dict]:
    """(work dir, checkpoint, engine settings); writes a random checkpoint of `--shape` when
    no `--model` is given. Engine processes are spawned: this process has run torch work by
    then, and forking it can deadlock."""
    import torch

    from vllm_msa.tiny import TinySpec, make_tiny_checkpoint

    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.model) if args.model else work / f"ckpt-{args.shape}"
    if not args.model and not (ckpt / "model.safetensors").exists():
        t = time.perf_counter()
        make_tiny_checkpoint(ckpt, TinySpec(**SHAPES[args.shape]))
        print(f"random {args.shape} checkpoint written in {time.perf_counter() - t:.0f} s")
    engine = {"max_model_len": 4096, "gpu_memory_utilization": args.gpu_memory_utilization,
              "seed": 0}
    if not torch.cuda.is_available():
        engine["dtype"] = "float32"
    return work, ckpt, engine


def write_result(result: dict, args: argparse.Namespace) -> Path:
    """Stamp `result` with versions and the command; write it (default benchmarks/results/)."""
    import torch
    import vllm

    import vllm_msa

    result["versions"] = {"vllm": vllm.__version__, "torch": torch.__version__,
                          "vllm_msa": vllm_msa.__version__}
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    card = result["card"]
    path = Path(args.json) if args.json else (
        Path(__file__).parent / "results"
        / f"{result['benchmark']}-{args.shape}-{card.split()[-1].lower().replace('(', '')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path


def main() -> None:
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--skip-compiled", action="store_true")
    args = parser.parse_args()
    work, ckpt, engine = prepare(args)

    import torch
    from vllm import LLM, SamplingParams

    from vllm_msa.bank.build import build_bank, encoder_llm
    from vllm_msa.prompt import document_text

    docs = work / "docs.jsonl"
    make_docs(docs, args.docs, args.doc_tokens)
    rows = []

    def shutdown(llm) -> None:
        llm.llm_engine.engine_core.shutdown()

    # 1. Bank build (encoder engine, eager): time from first document to committed manifest,
    # after a warm-up build of a few documents (Triton JIT, allocator), as for the baselines.
    llm = encoder_llm(ckpt, **engine)
    tokenizer = llm.get_tokenizer()
    warm_docs = work / "warm-docs.jsonl"
    warm_docs.write_text("".join(docs.read_text().splitlines(keepends=True)[:8]))
    for path in (work / "warm-bank", work / "bank"):
        shutil.rmtree(path, ignore_errors=True)
    build_bank(ckpt, warm_docs, work / "warm-bank", llm=llm, progress=False)
    out = work / "bank"
    t = time.perf_counter()
    bank = build_bank(ckpt, docs, out, llm=llm, progress=False)
    seconds = time.perf_counter() - t
    shutdown(llm)
    tokens = bank.num_tokens
    rows.append({"mode": "bank build (encode + pool + write)", "tokens": tokens,
                 "seconds": seconds})

    # 2./3. Plain prefill of the same token ids with the same model.
    texts = [json.loads(line) for line in docs.read_text().splitlines()]
    prompts = [{"prompt_token_ids": tokenizer(document_text(d["id"], d["text"]),
                                              add_special_tokens=False)["input_ids"]}
               for d in texts]
    assert sum(len(p["prompt_token_ids"]) for p in prompts) == tokens
    params = SamplingParams(max_tokens=1, temperature=0.0)
    modes = [("plain vLLM prefill, eager", True)]
    if not args.skip_compiled and torch.cuda.is_available():
        modes.append(("plain vLLM prefill, compiled + CUDA graphs", False))
    for name, eager in modes:
        llm = LLM(model=str(ckpt), enforce_eager=eager, enable_prefix_caching=False, **engine)
        llm.generate(prompts[:8], params, use_tqdm=False)  # warm-up
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        rows.append({"mode": name, "tokens": tokens, "seconds": time.perf_counter() - t})
        shutdown(llm)

    base = rows[1]["seconds"]
    print(f"\nstage-1 throughput on {card_name()}, {args.shape} shape, {args.docs} documents "
          f"of ~{tokens // args.docs} tokens ({tokens:,} tokens)\n")
    print(f"{'mode':<45} {'seconds':>9} {'tokens/s':>12} {'vs plain eager':>15}")
    for r in rows:
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["relative_to_plain_eager"] = base / r["seconds"]
        print(f"{r['mode']:<45} {r['seconds']:>9.2f} {r['tokens_per_s']:>12,.0f} "
              f"{r['relative_to_plain_eager']:>14.2f}x")

    result = {
        "benchmark": "bank_build",
        "card": card_name(),
        "shape": args.shape,
        "documents": args.docs,
        "tokens": tokens,
        "bank_bytes": bank.tier_bytes(),
        "rows": rows,
        "goal_metric": "bank build tokens/s relative to plain vLLM eager prefill",
        "goal": 0.8,
        "achieved": rows[0]["relative_to_plain_eager"],
    }
    write_result(result, args)


if __name__ == "__main__":
    main()
