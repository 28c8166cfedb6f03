"""The one vocabulary: constants.py agrees with spec/v1.md and the schema, and no other module re-declares
its names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from loraformat import constants
from loraformat.constants import (
    BIAS_MODES,
    MODULE_KINDS,
    FindingCode,
    LayerKind,
    ScalingRule,
    StrEnum,
)
from loraformat.schema import load_schema

ROOT = Path(__file__).resolve().parent.parent
SPEC = (ROOT / "spec" / "v1.md").read_text("utf-8")


def spec_finding_codes() -> list[str]:
    table = SPEC.split("<!-- finding-codes -->", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^\| `([a-z-]+)` \|", table, re.M)


def test_finding_codes_equal_the_spec_table() -> None:
    listed = spec_finding_codes()
    assert len(listed) == len(set(listed)), "a code is listed twice in spec §15"
    assert sorted(listed) == sorted(c.value for c in FindingCode)


def test_kinds_and_rules_equal_the_schema() -> None:
    schema = load_schema()
    assert sorted(schema["$defs"]["module"]["properties"]["kind"]["enum"]) == sorted(MODULE_KINDS)
    assert sorted(schema["properties"]["scaling"]["enum"]) == sorted(ScalingRule)
    assert sorted(schema["properties"]["bias"]["enum"]) == sorted(BIAS_MODES)
    assert LayerKind.BIAS not in MODULE_KINDS  # a plan-only kind


def test_members_equal_and_print_as_their_spelling() -> None:
    assert (
        LayerKind.LINEAR == "linear" and f"{LayerKind.CONV}" == "conv" and str(FindingCode.SCHEMA) == "schema"
    )
    assert ", ".join(ScalingRule) == "alpha/r, alpha/sqrt(r)"


def _vocabulary() -> set[str]:
    words: set[str] = set()
    for value in vars(constants).values():
        if isinstance(value, type) and issubclass(value, StrEnum) and value is not StrEnum:
            words.update(m.value for m in value)
        elif isinstance(value, str) and value:
            words.add(value)
    return words


def _literal_strings(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        items = [_literal_strings(e) for e in node.elts]
        return [s for group in items for s in group] if all(items) else []
    return []


def test_no_module_redeclares_a_vocabulary_name() -> None:
    """A module-level constant elsewhere whose value is a constants.py spelling is a second copy."""
    words = _vocabulary() - {"format"}  # ``format`` is also an ordinary word in unrelated constants
    copies = []
    for path in sorted((ROOT / "loraformat").rglob("*.py")):
        if path.name == "constants.py":
            continue
        for node in ast.parse(path.read_text("utf-8")).body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                found = [s for s in _literal_strings(node.value) if s in words]
                if found:
                    copies.append(f"{path.relative_to(ROOT)}:{node.lineno} {found}")
    assert not copies, "re-declared vocabulary (import it from loraformat.constants): " + "; ".join(copies)
