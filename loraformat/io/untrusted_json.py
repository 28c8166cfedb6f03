"""One loader for every JSON text read from an input (safetensors headers, the metadata document, PEFT configs,
checkpoint indexes): bounded in cost, and every way such a text can be malformed ends in the caller's typed
error naming the field (spec/v1.md §16), never in RecursionError, OverflowError or UnicodeEncodeError later on.

Rules, checked before anything else reads the document:

* at most ``MAX_JSON_ITEMS`` commas (bounds the number of values, hence memory, before parsing);
* valid UTF-8 / JSON; nesting at most ``MAX_JSON_DEPTH`` deep;
* numbers: floats finite (``NaN``, ``Infinity`` and overflowing literals such as ``1e400`` are refused),
  integers within a signed 64-bit range;
* strings and keys encodable as UTF-8 (a lone surrogate escape such as ``"\\ud800"`` is refused).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
from collections.abc import Iterator
from typing import Any

from loraformat import spec
from loraformat.errors import InvalidInputError

_INT_LIMIT = 1 << 63
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_STR = re.compile(r"\\u[dD][89a-fA-F]")


def _where(parts: tuple[object, ...]) -> str:
    """A field's JSON path as ``lora_alpha``, ``rank_pattern['x']`` or ``modules['m']['alpha']``."""
    head, rest = ("", parts)
    if parts and isinstance(parts[0], str):  # a plain field name bare, anything else quoted and escaped
        head, rest = (
            (parts[0] if re.fullmatch(r"[\w.-]{1,60}", parts[0], re.ASCII) else repr(parts[0])),
            parts[1:],
        )
    return head + "".join(f"[{p!r}]" for p in rest)


def _problem(value: Any, surrogates: bool) -> str | None:
    """What is wrong with one scalar, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value!r} is not a finite number"
    if isinstance(value, int) and not isinstance(value, bool) and not -_INT_LIMIT <= value < _INT_LIMIT:
        return "an integer outside the 64-bit range"
    if surrogates and isinstance(value, str) and not _encodable(value):
        return "a string that is not valid Unicode (a lone surrogate)"
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _first_problem(doc: Any, surrogates: bool) -> tuple[tuple[object, ...], str] | None:
    """(JSON path, reason) of the first bad value, or None; iterative, so depth costs no recursion. Slow (builds
    every path): only run once the fast scan found something."""
    stack: list[tuple[Any, tuple[object, ...]]] = [(doc, ())]
    while stack:
        node, where = stack.pop()
        if len(where) > spec.MAX_JSON_DEPTH:
            return where, f"nested deeper than {spec.MAX_JSON_DEPTH} levels"
        if isinstance(node, dict):
            for key, value in node.items():
                if surrogates and not _encodable(key):
                    return where, f"key {key!r} is not valid Unicode (a lone surrogate)"
                stack.append((value, (*where, key)))
        elif isinstance(node, list):
            stack.extend((v, (*where, i)) for i, v in enumerate(node))
        else:
            reason = _problem(node, surrogates)
            if reason:
                return where, reason
    return None


def _suspect(doc: Any, surrogates: bool) -> bool:
    """Fast scan: True if some value may break a rule. Touches every value once with no allocation per value,
    so checking the largest accepted text costs a fraction of parsing it."""
    stack: list[tuple[Any, int]] = [(doc, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > spec.MAX_JSON_DEPTH:
            return True
        if type(node) is dict:
            if surrogates and not all(map(_encodable, node)):
                return True
            values: Any = node.values()
        else:
            values = node
        for v in values:
            kind = type(v)
            if kind is dict or kind is list:
                stack.append((v, depth + 1))
            elif kind is float:
                if not math.isfinite(v):
                    return True
            elif kind is int:
                if not -_INT_LIMIT <= v < _INT_LIMIT:
                    return True
            elif surrogates and kind is str and not _encodable(v):
                return True
    return False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building a large tree of fresh containers (JSON parsing): it
    would otherwise rescan them every few thousand allocations, doubling the cost. Nothing built here forms
    cycles, so nothing is lost."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load_json(
    text: str | bytes,
    *,
    what: str,
    error: type[InvalidInputError],
    path: str | os.PathLike[str] | None = None,
    deep: bool = True,
) -> Any:
    """Parse and check an untrusted JSON text; ``error("<what>: <field>: <reason>", path=path)`` on any problem
    (``what`` may be empty when ``path`` already names the text). ``deep=False`` skips the number and depth
    scan for a caller that checks every value it uses itself (the safetensors header reader); strings are
    still checked for lone surrogates."""
    subject = f"{what} is " if what else "is "
    comma = b"," if isinstance(text, bytes) else ","
    if text.count(comma) > spec.MAX_JSON_ITEMS:  # type: ignore[arg-type]
        raise error(f"{subject}more than {spec.MAX_JSON_ITEMS} values; refusing (spec/v1.md §16)", path=path)
    try:
        with gc_paused():
            doc = json.loads(text)
    except RecursionError:
        raise error(f"{subject}nested deeper than {spec.MAX_JSON_DEPTH} levels", path=path) from None
    except (ValueError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise error(f"{subject}not valid JSON ({reason})", path=path) from None
    if isinstance(text, bytes):
        surrogates = _SURROGATE_ESCAPE.search(text) is not None
    else:
        surrogates = _SURROGATE_ESCAPE_STR.search(text) is not None or not _encodable(text)
    if type(doc) not in (dict, list):
        doc_problem = _problem(doc, surrogates)
        if doc_problem:
            raise error(f"{what}: {doc_problem}" if what else doc_problem, path=path)
        return doc
    if deep:
        found = _first_problem(doc, surrogates) if _suspect(doc, surrogates) else None
    else:
        found = _first_problem(doc, True) if surrogates and _suspect(doc, True) else None
    if found:
        prefix = ": ".join(p for p in (what, _where(found[0])) if p)
        raise error(f"{prefix}: {found[1]}" if prefix else found[1], path=path)
    return doc
