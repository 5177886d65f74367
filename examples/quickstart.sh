#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv (vLLM + vllm-msa), make a tiny random MSA
# checkpoint, encode the bundled sample documents into a memory bank, then answer a question
# over that bank offline (vLLM's LLM class) and through `vllm serve` (the OpenAI server with
# vllm-msa's /v1/msa/answer route). Outputs go to ./out (override with OUT=...).
# CPU-friendly engine settings; on a GPU, drop --dtype/--gpu-memory-utilization.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_MSA_VENV:-.venv}"
OUT="${OUT:-out}"
PORT="${PORT:-8765}"
QUESTION="${QUESTION:-Which river flooded the old mill?}"
LOGS="$OUT/logs"
SUMMARY="$OUT/summary.txt"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" VLLM_NO_USAGE_STATS=1
mkdir -p "$LOGS"
: > "$SUMMARY"
START=$SECONDS

# Each step's own output (vLLM's engine logs included) goes to a file under $LOGS; what you
# see is a line per step, then the summary. A failing step shows its log's last lines.
step() {  # step NAME LOG COMMAND...
    local name=$1 log=$2
    shift 2
    printf '%-58s' "$name"
    local t=$SECONDS
    if "$@" > "$log" 2>&1; then
        echo " done ($((SECONDS - t)) s)"
    else
        echo " FAILED, the end of $log:"
        tail -40 "$log"
        exit 1
    fi
}

if [ -z "${SKIP_INSTALL:-}" ]; then
    step "setting up $VENV (vLLM for CPU, vllm-msa)" "$LOGS/install.log" bash .ci/install.sh
fi
step "making a tiny random MSA checkpoint" "$LOGS/checkpoint.log" \
    "$VENV/bin/vllm-msa" make-tiny-checkpoint "$OUT/tiny-msa"
step "encoding examples/sample_docs.jsonl into a bank" "$LOGS/build.log" \
    "$VENV/bin/vllm-msa" bank build --model "$OUT/tiny-msa" --docs examples/sample_docs.jsonl \
    --out "$OUT/sample-bank" --dtype float32 --max-model-len 1024 \
    --gpu-memory-utilization 0.3 --no-progress
step "verifying the bank against the checkpoint" "$LOGS/verify.log" \
    "$VENV/bin/vllm-msa" bank verify "$OUT/sample-bank" --model "$OUT/tiny-msa" --dtype float32
step "answering offline (vLLM's LLM class)" "$LOGS/offline.log" \
    "$VENV/bin/python" examples/answer.py --model "$OUT/tiny-msa" --bank "$OUT/sample-bank" \
    --question "$QUESTION" --dtype float32 --max-model-len 1024 --gpu-memory-utilization 0.3 \
    --summary "$SUMMARY"

# The server: vllm-msa serve (vLLM's own OpenAI server with the plugin's routes).
printf '%-58s' "starting the server (vllm-msa serve)"
t=$SECONDS
"$VENV/bin/vllm-msa" serve "$OUT/tiny-msa" --bank "samples=$OUT/sample-bank" --default-bank samples \
    --dtype float32 --max-model-len 1024 --gpu-memory-utilization 0.3 --port "$PORT" \
    > "$LOGS/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do
    if "$VENV/bin/python" -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$PORT/health').status_code != 200)" 2>/dev/null; then
        break
    fi
    kill -0 $SERVER 2>/dev/null || { echo " FAILED, the end of $LOGS/server.log:"; tail -40 "$LOGS/server.log"; exit 1; }
    sleep 1
done
echo " done ($((SECONDS - t)) s)"
step "asking it over HTTP (POST /v1/msa/answer)" "$LOGS/ask.log" \
    "$VENV/bin/python" examples/ask_server.py --url "http://127.0.0.1:$PORT" \
    --question "$QUESTION" --summary "$SUMMARY"

echo
echo "== the bank ($OUT/sample-bank)"
"$VENV/bin/vllm-msa" bank info "$OUT/sample-bank" > "$LOGS/bank-info.txt"
head -8 "$LOGS/bank-info.txt"
echo
echo "== the answers (random weights: the text is gibberish, the routing is real)"
cat "$SUMMARY"
echo
echo "done in $((SECONDS - START)) s. Logs: $LOGS/ (the JSON results: offline.log, ask.log)"
