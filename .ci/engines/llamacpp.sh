#!/usr/bin/env bash
# llama.cpp through llama-cpp-python, built from its source package ONCE (about 11 minutes on 2 cores) and cached:
# the wheel, and the unpacked sdist whose vendor/llama.cpp holds convert_hf_to_gguf.py, convert_lora_to_gguf.py
# and gguf-py. The venv gets torch 2.13.0 CPU (from the local wheel), the converters' Python deps and the wheel.
# Idempotent: stamps record a finished build and a finished venv. Stdout: export lines only.
set -euo pipefail
LLAMA_VERSION=0.3.36
CACHE="${LORAFORMAT_CI_CACHE:-$HOME/.cache/loraformat-ci}"
ROOT="$CACHE/llamacpp-$LLAMA_VERSION"
SRC="$ROOT/src/llama_cpp_python-$LLAMA_VERSION"
VENV="$ROOT/venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
mkdir -p "$ROOT"
if [ ! -e "$ROOT/.ready-wheel" ]; then
  echo "llamacpp.sh: building llama-cpp-python $LLAMA_VERSION from source (about 11 minutes on 2 cores)" >&2
  rm -rf "$ROOT/sdist" "$ROOT/src" "$ROOT/wheels"
  python3 -m pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_VERSION" -d "$ROOT/sdist" >&2
  mkdir -p "$ROOT/src"
  tar -xzf "$ROOT"/sdist/llama_cpp_python-*.tar.gz -C "$ROOT/src"
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    python3 -m pip wheel -q --no-deps "$SRC" -w "$ROOT/wheels" >&2
  touch "$ROOT/.ready-wheel"
fi
VENV_STAMP="$VENV/.ready-1"
if [ ! -e "$VENV_STAMP" ]; then
  echo "llamacpp.sh: creating $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0 >&2
  "$VENV/bin/pip" install -q "$ROOT"/wheels/llama_cpp_python-*.whl "$SRC/vendor/llama.cpp/gguf-py" \
    numpy safetensors sentencepiece "transformers==5.25.0" "peft==0.21.2" >&2
  "$VENV/bin/python" -c "import llama_cpp, gguf, transformers" >&2
  touch "$VENV_STAMP"
fi
echo "export LORAFORMAT_LLAMACPP_PYTHON=$VENV/bin/python"
echo "export LORAFORMAT_LLAMACPP_SRC=$SRC/vendor/llama.cpp"
