"""Where the tests find the engines that live in their own virtual environments (see .ci/engines/README.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ENGINE_VARIABLES = {
    "vllm": "LORAFORMAT_VLLM_PYTHON",
    "llama.cpp": "LORAFORMAT_LLAMACPP_PYTHON",
    "mergekit": "LORAFORMAT_MERGEKIT_PYTHON",
    "hf-oldest": "LORAFORMAT_HF_OLDEST_PYTHON",  # the oldest huggingface-hub pyproject allows
}


def engine_python(engine: str) -> Path:
    """The interpreter of ``engine``'s venv: skipped on a developer machine without it, a failure in CI."""
    return _exported(engine, ENGINE_VARIABLES[engine])


#: other paths an engine's setup script exports (llama.cpp: the vendored sources with its converters)
ENGINE_PATHS = {"llama.cpp": "LORAFORMAT_LLAMACPP_SRC"}


def engine_path(engine: str) -> Path:
    """A directory an engine's setup exported (see ENGINE_PATHS); skipped or failed like engine_python."""
    return _exported(engine, ENGINE_PATHS[engine])


def _exported(engine: str, variable: str) -> Path:
    """The existing path in ``variable``, else a skip (developer machine) or a failure (CI)."""
    value = os.environ.get(variable)
    if value and Path(value).exists():
        return Path(value)
    message = f'{engine} engine not set up: run `eval "$(bash .ci/engines/<name>.sh)"` ({variable} unset)'
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
