#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv (vLLM + vllm-msa), make a tiny random MSA
# checkpoint, encode the bundled sample documents into a memory bank, then answer a question
# over that bank offline (vLLM's LLM class) and through `vllm serve` (the OpenAI server with
# vllm-msa's /v1/msa/answer route). Outputs go to ./out (override with OUT=...).
# CPU-friendly engine settings; on a GPU, drop --dtype/--gpu-memory-utilization.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install.sh
VENV="${VLLM_MSA_VENV:-.venv}"
OUT="${OUT:-out}"
PORT="${PORT:-8765}"
QUESTION="${QUESTION:-Which river flooded the old mill?}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" VLLM_NO_USAGE_STATS=1

"$VENV/bin/vllm-msa" make-tiny-checkpoint "$OUT/tiny-msa"
"$VENV/bin/vllm-msa" bank build --model "$OUT/tiny-msa" --docs examples/sample_docs.jsonl \
    --out "$OUT/sample-bank" --dtype float32 --max-model-len 1024 \
    --gpu-memory-utilization 0.3
"$VENV/bin/vllm-msa" bank verify "$OUT/sample-bank" --model "$OUT/tiny-msa" --dtype float32
"$VENV/bin/vllm-msa" bank info "$OUT/sample-bank"

echo "== offline (LLM class)"
"$VENV/bin/python" examples/answer.py --model "$OUT/tiny-msa" --bank "$OUT/sample-bank" \
    --question "$QUESTION" --dtype float32 --max-model-len 1024 --gpu-memory-utilization 0.3

echo "== vllm serve (python -m vllm.entrypoints.openai.api_server: the vllm-cpu console" \
     "script is broken)"
VLLM_PLUGINS=msa,msa_answer "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$OUT/tiny-msa" --dtype float32 --max-model-len 1024 \
    --gpu-memory-utilization 0.3 --port "$PORT" \
    --additional-config "{\"msa\": {\"banks\": {\"samples\": \"$OUT/sample-bank\"}, \"default_bank\": \"samples\"}}" \
    > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 240); do
    if "$VENV/bin/python" -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$PORT/health').status_code != 200)" 2>/dev/null; then
        break
    fi
    kill -0 $SERVER 2>/dev/null || { tail -50 "$OUT/server.log"; exit 1; }
    sleep 1
done
"$VENV/bin/python" examples/ask_server.py --url "http://127.0.0.1:$PORT" --question "$QUESTION"
