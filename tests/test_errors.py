"""Exit codes are mapped in one place (loraformat/errors.py) and documented wherever a user looks for them."""

from __future__ import annotations

import re
from pathlib import Path

from loraformat import errors
from loraformat.cli.main import cli

ROOT = Path(__file__).resolve().parent.parent


def _codes() -> set[int]:
    return {v for k, v in vars(errors).items() if k.startswith("EXIT_")}


def test_every_exit_code_is_documented_in_readme_errors_and_help() -> None:
    readme = (ROOT / "README.md").read_text("utf-8")
    table = set(map(int, re.findall(r"^\| (\d+) \|", readme, re.M)))
    assert table == _codes()
    assert {int(c) for c in re.findall(r"^(\d+) {2,}", errors.__doc__ or "", re.M)} == _codes()
    assert _codes() <= {int(c) for c in re.findall(r"\b(\d+) [a-z]", cli.help or "")}


def test_every_error_class_maps_to_a_documented_code() -> None:
    classes = [
        c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.LoraformatError)
    ]
    assert len(classes) > 10
    assert {c.exit_code for c in classes} <= _codes()
