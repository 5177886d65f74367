#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv (vLLM + vllm-msa), make a tiny random MSA
# checkpoint, encode the bundled sample documents into a memory bank with vLLM, print its info.
# Outputs go to ./out (override with OUT=...). CPU-friendly engine settings; on a GPU, drop them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install.sh
VENV="${VLLM_MSA_VENV:-.venv}"
OUT="${OUT:-out}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" VLLM_NO_USAGE_STATS=1

"$VENV/bin/vllm-msa" make-tiny-checkpoint "$OUT/tiny-msa"
"$VENV/bin/vllm-msa" bank build --model "$OUT/tiny-msa" --docs examples/sample_docs.jsonl \
    --out "$OUT/sample-bank" --dtype float32 --max-model-len 1024 \
    --gpu-memory-utilization 0.3
"$VENV/bin/vllm-msa" bank verify "$OUT/sample-bank" --model "$OUT/tiny-msa" --dtype float32
"$VENV/bin/vllm-msa" bank info "$OUT/sample-bank"
