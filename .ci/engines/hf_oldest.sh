#!/usr/bin/env bash
# The oldest huggingface-hub pyproject.toml allows (its lower bound), in a venv that sees the project's other
# packages (--system-site-packages) but shadows huggingface-hub: tests/test_hub_oldest.py runs the hub tests
# with it. Idempotent; prints only the export line on stdout.
set -euo pipefail
version=$(python3 - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(next(re.search(r">=\s*([\w.]+)", d).group(1) for d in deps if d.startswith("huggingface-hub")))
PY
)
root="${LORAFORMAT_CI_CACHE:-$HOME/.cache/loraformat-ci}/hf-$version"
if [ ! -e "$root/.done" ]; then
  rm -rf "$root"
  python3 -m venv --system-site-packages "$root" >&2
  "$root/bin/python" -m pip install -q --disable-pip-version-check "huggingface-hub==$version" >&2
  touch "$root/.done"
fi
echo "export LORAFORMAT_HF_OLDEST_PYTHON=$root/bin/python"
