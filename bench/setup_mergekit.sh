#!/usr/bin/env bash
# The mergekit-extract-lora that bench/extract_bench.py compares against, in its own virtual environment (its
# pins clash with the test extra), cached under $LORAFORMAT_CI_CACHE/mergekit; idempotent. Bench only: the tests
# do not need mergekit. Prints the export line for the interpreter, as .ci/engines/*.sh do.
set -euo pipefail
CACHE="${LORAFORMAT_CI_CACHE:-$HOME/.cache/loraformat-ci}"
VENV="$CACHE/mergekit"
STAMP="$VENV/.installed-mergekit-0.1.5"
if [ ! -e "$STAMP" ]; then
  python3 -m venv "$VENV" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q torch==2.13.0 >&2  # the CPU build first: an unpinned torch pulls CUDA
  "$VENV/bin/python" -m pip install -q mergekit==0.1.5 torch==2.13.0 >&2
  touch "$STAMP"
fi
echo "export LORAFORMAT_MERGEKIT_PYTHON=$VENV/bin/python"
