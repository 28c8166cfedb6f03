"""Crash-safe outputs: write under a temporary name in the target directory, fsync, rename.

An error, Ctrl-C or SIGTERM removes the temporary; a SIGKILL leaves at most a hidden ``.tmp-`` entry, never a
partial file or directory under the final name. Inputs are never opened for writing here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from loraformat.errors import OutputExistsError, WriteError

_WRITE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EFBIG: "file too large (size limit reached)",
                 errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
                 errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}


def temp_name(final: Path) -> Path:
    return final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_error(exc: OSError, path: Path | str) -> WriteError:
    reason = _WRITE_ERRNOS.get(exc.errno or 0, exc.strerror or str(exc))
    return WriteError(f"write failed: {reason}; nothing was left behind", path=path)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_output(final: Path, *, overwrite: bool) -> None:
    if final.exists() and not overwrite:
        raise OutputExistsError("already exists (use --overwrite to replace it)", path=final)
    if not final.parent.exists():
        raise WriteError("parent directory does not exist", path=final)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[BinaryIO]:
    """Yield a binary file that appears as ``final`` only if the block completes."""
    final = Path(final)
    check_output(final, overwrite=overwrite)
    tmp = temp_name(final)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as exc:
        _remove(tmp)
        raise write_error(exc, final) from None
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``final``; on success it is fsynced and renamed to ``final``
    (an existing ``final`` is replaced only with ``overwrite``)."""
    final = Path(final)
    check_output(final, overwrite=overwrite)
    tmp = temp_name(final)
    try:
        tmp.mkdir()
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():
            trash = temp_name(final)
            os.replace(final, trash)
            os.replace(tmp, final)
            _remove(trash)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as exc:
        _remove(tmp)
        raise write_error(exc, final) from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
