"""Where the tests find the engines that live in their own virtual environments (see .ci/engines/README.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ENGINE_VARIABLES = {
    "vllm": "LORAFORMAT_VLLM_PYTHON",
    "llama.cpp": "LORAFORMAT_LLAMACPP_PYTHON",
    "mergekit": "LORAFORMAT_MERGEKIT_PYTHON",
}


def engine_python(engine: str) -> Path:
    """The interpreter of ``engine``'s venv: skipped on a developer machine without it, a failure in CI."""
    variable = ENGINE_VARIABLES[engine]
    value = os.environ.get(variable)
    if value and Path(value).exists():
        return Path(value)
    message = f'{engine} engine not set up: run `eval "$(bash .ci/engines/<name>.sh)"` ({variable} unset)'
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
