"""The hub client code against the oldest huggingface-hub pyproject.toml allows (.ci/engines/hf_oldest.sh):
the declared lower bound is tested, not assumed."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import tomllib

from tests.engines import engine_python

ROOT = Path(__file__).resolve().parent.parent


def test_push_pull_and_errors_work_with_the_oldest_allowed_huggingface_hub(tmp_path: Path) -> None:
    python = engine_python("hf-oldest")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = next(re.search(r">=\s*([\w.]+)", d).group(1) for d in deps if d.startswith("huggingface-hub"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [str(python), str(ROOT / "tests" / "hub_oldest_scenario.py"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["ok", floor] or done.stdout.split()[-1].startswith(floor), done.stdout
