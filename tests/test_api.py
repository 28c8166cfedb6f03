"""The public API resolves lazily to functions, keeps resolving to them, and never imports torch on import."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import loraformat

FUNCTIONS = [
    "open_adapter",
    "validate",
    "validate_for",
    "export",
    "inspect",
    "convert",
    "hash_base",
    "merge",
    "compose",
    "rescale",
    "spectrum",
    "push",
    "pull",
]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_exports_stay_functions_after_their_modules_are_imported(name):
    first = getattr(loraformat, name)
    assert callable(first) and not isinstance(first, type(sys)), name
    # importing every implementation module (as the CLI does) must not shadow the function
    importlib.import_module("loraformat.cli.main")
    for module in (
        "validation",
        "inspection",
        "conversion",
        "merging",
        "composition",
        "rescaling",
        "hashing",
        "exporting",
        "engine_check",
    ):
        importlib.import_module(f"loraformat.{module}")

    again = getattr(loraformat, name)
    assert again is first and callable(again), name


def test_validate_can_be_called_twice(peft_adapters):
    path = peft_adapters["plain"]
    assert loraformat.validate(path).ok(False)
    assert loraformat.validate(path).ok(False)


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError):
        loraformat.no_such_thing  # noqa: B018


def test_import_does_not_import_torch():
    code = "import loraformat, sys; loraformat.open_adapter; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
