"""Which adapters a path stands for: the files and directories ``validate``, ``check`` and the CI hook are given
(a pre-commit hook passes changed files; a repository passes its root). Headers only, no tensor data."""

from __future__ import annotations

import os
from collections.abc import Iterable

from loraformat.constants import METADATA_KEY, PEFT_CONFIG, PEFT_PICKLE, PEFT_WEIGHTS
from loraformat.errors import HeaderError, InputNotFoundError, LoraformatError, UsageError
from loraformat.io.header import read_header

_SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", ".cache", ".venv", "node_modules"}


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Turn arguments into adapters to check, without duplicates, in a stable order.

    A file is checked as given, except that ``adapter_config.json`` (and a PEFT ``adapter_model.*`` beside its
    config) stand for their PEFT directory, so a pre-commit hook that passes changed files checks the adapter.
    A PEFT adapter directory is itself. Any other directory is searched recursively for PEFT adapter directories
    and native adapters: .safetensors files whose header is broken or carries loraformat metadata (a base
    model's weights in the same tree are skipped).
    """
    out: list[str] = []
    seen: set[str] = set()

    def add(p: str) -> None:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            out.append(p)

    for arg in paths:
        p = os.fspath(arg)
        if not os.path.exists(p):
            raise InputNotFoundError("no such file or directory", path=p)
        if os.path.isfile(p):
            parent = os.path.dirname(p) or "."
            name = os.path.basename(p)
            if name == PEFT_CONFIG or (
                name in (PEFT_WEIGHTS, PEFT_PICKLE) and os.path.exists(os.path.join(parent, PEFT_CONFIG))
            ):
                add(parent)
            else:
                add(p)
        elif _is_peft_dir(p):
            add(p)
        else:
            found = _search(p)
            if not found:
                raise UsageError(
                    "holds no PEFT adapter directory and no loraformat .safetensors file", path=p
                )
            for f in found:
                add(f)
    return out


def _is_peft_dir(p: str) -> bool:
    return any(os.path.isfile(os.path.join(p, n)) for n in (PEFT_CONFIG, PEFT_WEIGHTS, PEFT_PICKLE))


def _is_native_candidate(path: str) -> bool:
    try:
        return METADATA_KEY in read_header(path).metadata
    except HeaderError:
        return True  # a broken file is reported, not skipped
    except LoraformatError:
        return False


def _search(root: str) -> list[str]:
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith((".tmp", ".")))
        if dirpath != root and _is_peft_dir(dirpath):
            found.append(dirpath)
            dirnames[:] = []
            continue
        for fn in sorted(filenames):
            full = os.path.join(dirpath, fn)
            if fn.endswith(".safetensors") and _is_native_candidate(full):
                found.append(full)
    return sorted(found)
