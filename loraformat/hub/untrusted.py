"""Checks for everything a hub server or a hub's files hand us: commit ids, object ids, sizes and the paths they
become. A hostile or corrupted hub controls these strings, so each one is checked against its format before it
touches the file system (spec/v1.md §16, docs/hub.md "Trust").

* a Hugging Face commit or git blob id is 40 lowercase hex digits, a local-hub commit or sha256 64;
* a size is a non-negative integer no larger than the cap for that file (``FILE_SIZE_CAPS``);
* a path built from such a string goes through :func:`join_under`, which refuses anything that is not a plain
  relative name or that resolves (symlinks included) outside its root;
* :func:`remove_tree` deletes only inside a root the caller names (the cache, an output's temporary directory).

Every refusal is a :class:`VerificationError` (exit 1) with a one-line message that quotes the offending value
shortened and escaped, never the raw bytes.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from loraformat.errors import VerificationError
from loraformat.hub.refs import CARD_FILE, CONFIG_FILE, HF_COMMIT, LOCAL_COMMIT, WEIGHTS_FILE, safe_relpath

GIT_OID = HF_COMMIT
SHA256_HEX = LOCAL_COMMIT

GIB, MIB = 1 << 30, 1 << 20
#: The largest size a file of an adapter repository may have; a listing or response announcing more is refused
#: before any byte is transferred. Far above any real adapter (a rank-256 adapter of every linear layer of a
#: 405B model is about 13 GiB); the card and config are small text files.
FILE_SIZE_CAPS = {WEIGHTS_FILE: 64 * GIB, CONFIG_FILE: 16 * MIB, CARD_FILE: 16 * MIB}
#: Sizes of files loraformat never downloads are only checked to be integers in this range.
MAX_LISTED_SIZE = 1 << 53


def shown(value: object, limit: int = 60) -> str:
    """A server-supplied value for an error message: repr (escapes NUL, newlines, surrogates), shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_commit(commit: object, kind: str, *, where: str) -> str:
    """A commit id as the hub kind writes it (``hf``: 40 hex digits, ``local``: 64), else VerificationError."""
    pattern, digits = (HF_COMMIT, 40) if kind == "hf" else (LOCAL_COMMIT, 64)
    if not isinstance(commit, str) or not pattern.match(commit):
        raise VerificationError(
            f"{where}: the hub answered commit id {shown(commit)}, not {digits} lowercase hex digits; refusing"
        )
    return commit


def check_hex(value: object, pattern: re.Pattern[str], *, what: str, where: str) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise VerificationError(f"{where}: {what} {shown(value)} is malformed; refusing")
    return value


def check_size(size: object, name: str, *, where: str) -> int:
    """A listed file size: an int (not a bool) in 0..cap, the cap being the file's in FILE_SIZE_CAPS."""
    cap = FILE_SIZE_CAPS.get(name, MAX_LISTED_SIZE)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise VerificationError(f"{where}: {name} has size {shown(size)}, not a byte count; refusing")
    if size > cap:
        raise VerificationError(
            f"{where}: {name} is announced as {size} bytes, above the {cap} byte limit for it; refusing"
        )
    return size


def is_inside(root: Path, path: Path) -> bool:
    """True when ``path`` resolves (symlinks included) strictly inside ``root``."""
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    return real != real_root and os.path.commonpath([real_root, real]) == real_root


def join_under(root: Path, *names: str, where: str = "") -> Path:
    """``root/names...`` for untrusted names: each a plain relative path, the result strictly inside root even
    after resolving symlinks; VerificationError otherwise."""
    for name in names:
        safe_relpath(name, repo=where)
    path = root.joinpath(*names)
    if not is_inside(root, path):
        raise VerificationError(
            f"{where + ': ' if where else ''}{shown('/'.join(names))} leaves {root}; refusing"
        )
    return path


def remove_tree(path: Path, root: Path) -> None:
    """rmtree ``path`` only when it lies strictly inside ``root`` (and is not a symlink); never anything else."""
    if path.is_symlink() or not is_inside(root, path):
        raise VerificationError(f"refusing to delete {path}: it is not inside {root}")
    shutil.rmtree(path, ignore_errors=True)
