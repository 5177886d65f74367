#!/usr/bin/env bash
# Run on the lent GPU machine after `bash .gpu/unpack.sh` (see ../shared/gpu/README.md):
#   bash benchmarks/gpu.sh tests   # the whole test suite on the GPU (GPU-marked tests included)
#   bash benchmarks/gpu.sh bench   # the stage-1 benchmark, MSA-4B shape
#   bash benchmarks/gpu.sh serving # answering over a bank vs plain vLLM, MSA-4B shape
#   bash benchmarks/gpu.sh serve   # TTFT / decode over synthetic 1M and 10M-token banks vs plain
#   bash benchmarks/gpu.sh attention  # one router layer's memory attention: Triton vs FA
#   bash benchmarks/gpu.sh ttft    # a prefill step's GPU time by phase vs routing's floors
#   bash benchmarks/gpu.sh routing # the routing kernel vs the HBM copy rate (no vLLM needed);
#                                  # e.g. `routing --sizes 1e7,2.5e7 --questions 1 --sweep-each-size`
#   bash benchmarks/gpu.sh fetch   # host->GPU fetch of realistic selections vs a pinned copy
#   bash benchmarks/gpu.sh memory  # GPU / pinned host memory of 1M, 10M, 25M-token banks vs
#                                  # `bank info` (25M: ~44 GB on disk, ~1-2 min to synthesize; a
#                                  # 50M-token bank, ~88 GB, exceeds the machine's 64 GiB disk)
# Logs and result files go to $OUT (the device tool brings them back).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation --no-index . || exit 1
export PYTHONPATH=/tmp/site PYTORCH_SKIP_CUDNN_COMPATIBILITY_CHECK=1 VLLM_NO_USAGE_STATS=1 \
       HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 VLLM_WORKER_MULTIPROC_METHOD=spawn
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
case "${1:-tests}" in
    tests)
        shift || true
        python3 -m pytest -q -p no:cacheprovider -rs "${@:-tests}" 2>&1 | tee "$OUT/gpu-tests.log"
        ;;
    bench)
        shift || true
        python3 benchmarks/bank_build.py --shape msa-4b --docs 2000 --doc-tokens 500 \
            --json "$OUT/bank_build-msa-4b.json" "$@" 2>&1 | tee "$OUT/bench.log"
        ;;
    serving)
        shift || true
        python3 benchmarks/serving.py --shape msa-4b --docs 2000 --doc-tokens 500 \
            --questions 256 --json "$OUT/serving-msa-4b.json" "$@" 2>&1 | tee "$OUT/serving.log"
        ;;
    serve)
        shift || true
        python3 benchmarks/serve.py --shape msa-4b --bank-tokens 1M,10M --batches 1,8,64 \
            --json "$OUT/serve-msa-4b.json" "$@" 2>&1 | tee "$OUT/serve.log"
        ;;
    attention)
        shift || true
        python3 benchmarks/memory_attention.py --json "$OUT/memory_attention.json" "$@" 2>&1 \
            | tee "$OUT/memory_attention.log"
        ;;
    ttft)
        shift || true
        python3 benchmarks/ttft.py --shape msa-4b --bank-tokens 10M --batches 1,8,64 \
            --json "$OUT/ttft-msa-4b.json" "$@" 2>&1 | tee "$OUT/ttft.log"
        ;;
    routing)
        shift || true
        python3 benchmarks/routing.py --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/routing.log"
        ;;
    fetch)
        shift || true
        python3 benchmarks/fetch.py --json "$OUT/fetch.json" "$@" 2>&1 | tee "$OUT/fetch.log"
        ;;
    memory)
        shift || true
        python3 benchmarks/memory.py --shape msa-4b --bank-tokens 1M,10M,25M \
            --json "$OUT/memory-msa-4b.json" "$@" 2>&1 | tee "$OUT/memory.log"
        ;;
esac
