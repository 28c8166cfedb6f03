"""PEFT's rank_pattern / alpha_pattern keys, resolved with bounded cost.

PEFT picks, for a module path, the first key (in dict order) for which ``re.match(rf"(.*\\.)?({key})$", path)``
succeeds. The keys come from an untrusted config, so they are regular expressions an attacker writes: a key with
catastrophic backtracking, thousands of nested groups or a huge repetition count must cost a bounded time and
end in a typed error, never hang or crash (spec/v1.md §16).

* at most ``MAX_PATTERN_KEYS`` keys in total and ``MAX_PATTERN_LENGTH`` characters each;
* every key the search reaches must compile under Python's ``re`` (what PEFT uses, compiling as lazily); a
  key it rejects, or that overflows its parser, is an invalid key;
* plain keys (letters, digits, ``_``, ``-`` and escaped dots, optionally anchored with ``^``; what loraformat
  itself writes) are resolved by dictionary look-ups on the path's dotted suffixes: no regex runs at all;
* other keys are matched with RE2 (google-re2), which runs in time linear in the path and never backtracks.
  For the yes/no match PEFT needs it agrees with ``re`` on the syntax both accept, with these documented
  differences: keys using backreferences, lookaround, ``\\Z``, POSIX classes (``[[:``) or repetition counts
  above 1000 are refused; ``\\w``, ``\\d``, ``\\s`` and ``\\b`` are ASCII-only; module paths holding control
  characters are refused. Resolution as a whole, compiling included, runs against one budget
  (``MATCH_BUDGET_S``), so even the largest accepted config ends in an answer or an error within it. Each module path is resolved once, for rank
  and alpha together.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import re2

from loraformat import spec
from loraformat.errors import AdapterError

#: seconds of regex matching one config may cost
MATCH_BUDGET_S = 1.0

_PLAIN = re.compile(r"\^?(?:[A-Za-z0-9_-]|\\\.)+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


def _full(key: str) -> str:
    return rf"(.*\.)?({key})$"


def _shown(text: str) -> str:
    return repr(text) if len(text) <= 60 else repr(text[:57]) + "…"


@dataclass
class PatternTable:
    """One pattern dict (``rank_pattern`` or ``alpha_pattern``), checked and indexed for resolution."""

    name: str
    values: list[Any]
    keys: list[str]
    anchored: dict[str, int] = field(default_factory=dict)  # plain key "^a\.b" as "a.b" -> first index
    suffix: dict[str, int] = field(default_factory=dict)  # plain key "a\.b" as "a.b" -> first index
    regex_keys: list[int] = field(
        default_factory=list
    )  # indexes of the other keys, compiled when first reached
    programs: dict[int, Any] = field(default_factory=dict)

    def first_match(self, module: str, deadline: float, path: str) -> int | None:
        """Index of the first key matching ``module`` (PEFT's rule), or None."""
        best = self.anchored.get(module)
        start = 0
        while True:  # the path itself and every tail after a dot
            hit = self.suffix.get(module[start:])
            if hit is not None and (best is None or hit < best):
                best = hit
            dot = module.find(".", start)
            if dot < 0:
                break
            start = dot + 1
        for index in self.regex_keys:
            if best is not None and index > best:
                break
            if time.monotonic() > deadline:
                raise AdapterError(
                    f"adapter_config.json: resolving {self.name} takes more than {MATCH_BUDGET_S} s "
                    f"({len(self.regex_keys)} regex keys); refusing (spec/v1.md §16)",
                    path=path,
                )
            program = self.programs.get(index)
            if program is None:  # as PEFT, a key is compiled when the search first reaches it
                program = self.programs[index] = _compile(self.name, self.keys[index], path)
            if program.match(module):
                return index
        return best


def _compile(name: str, key: str, path: str) -> Any:
    """The RE2 program of PEFT's full pattern for ``key``, once Python's ``re`` (PEFT's engine) accepted it."""
    try:
        re.compile(_full(key))
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:80] or exc.__class__.__name__
        raise AdapterError(
            f"adapter_config.json: {name} key {_shown(key)} is not a valid regex ({reason})", path=path
        ) from None
    try:
        if "[:" in key:
            raise re2.error("POSIX class syntax, which Python reads differently")
        return re2.compile(_full(key), _RE2_OPTIONS)
    except re2.error as exc:
        reason = " ".join(str(exc).strip("b'\"").split())[:80]
        raise AdapterError(
            f"adapter_config.json: {name} key {_shown(key)} uses what the linear-time matcher refuses "
            f"({reason}): backreferences, lookaround, \\Z, POSIX classes, repetition counts above 1000 "
            "(spec/v1.md §16)",
            path=path,
        ) from None


def build_table(name: str, patterns: dict[str, Any], path: str) -> PatternTable:
    """Check every key of one pattern dict and index it; AdapterError naming the key otherwise."""
    table = PatternTable(name, list(patterns.values()), list(patterns))
    for index, key in enumerate(table.keys):
        if len(key) > spec.MAX_PATTERN_LENGTH:
            raise AdapterError(
                f"adapter_config.json: {name} key {_shown(key)} is {len(key)} characters long, above the "
                f"limit of {spec.MAX_PATTERN_LENGTH} (spec/v1.md §16)",
                path=path,
            )
        if _PLAIN.fullmatch(key):
            plain = key.replace("\\.", ".")
            target = table.anchored if plain.startswith("^") else table.suffix
            target.setdefault(plain.removeprefix("^"), index)
        else:
            table.regex_keys.append(index)
    return table


def check_key_count(total: int, path: str) -> None:
    if total > spec.MAX_PATTERN_KEYS:
        raise AdapterError(
            f"adapter_config.json: {total} rank_pattern/alpha_pattern keys, above the limit of "
            f"{spec.MAX_PATTERN_KEYS} (spec/v1.md §16)",
            path=path,
        )


def resolve_all(
    modules: list[str], tables: list[PatternTable], defaults: list[Any], path: str
) -> dict[str, list[Any]]:
    """{module: [value from each table, or its default]}: every module resolved once against every table."""
    deadline = time.monotonic() + MATCH_BUDGET_S
    out = {}
    for module in modules:
        if _CONTROL.search(module):
            raise AdapterError(f"module path {_shown(module)} holds a control character; refusing", path=path)
        out[module] = [
            default if (i := table.first_match(module, deadline, path)) is None else table.values[i]
            for table, default in zip(tables, defaults, strict=True)
        ]
    return out
