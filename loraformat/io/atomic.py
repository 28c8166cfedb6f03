"""Crash-safe outputs: write under a temporary name in the target directory, fsync, rename.

An error, Ctrl-C or SIGTERM removes the temporary; a SIGKILL leaves at most a hidden ``.<name>.tmp-`` entry,
never a partial file or directory under the final name. Without ``overwrite`` the final name is claimed with a
hard link (fails if it appeared meanwhile) instead of a rename that would clobber it. Inputs are never opened
for writing here.
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

_WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EFBIG: "file too large (size limit reached)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "I/O error",
}


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
    if (final.exists() or final.is_symlink()) and not overwrite:
        raise OutputExistsError("already exists (use --overwrite to replace it)", path=final)
    if not final.parent.is_dir():
        raise WriteError("parent directory does not exist", path=final)


def _is_ours(exc: OSError, tmp: Path) -> bool:
    """True when the OSError comes from writing the output (no file name, or a name inside ``tmp``) rather
    than from reading some input inside the block, which must keep its own message."""
    if exc.filename is None:
        return True
    name = Path(os.fspath(exc.filename))
    return name == tmp or tmp in name.parents


def _claim(tmp: Path, final: Path, *, overwrite: bool) -> None:
    """Move a finished file to ``final``: replace when allowed, else link (atomic no-clobber) and unlink."""
    if overwrite:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise OutputExistsError("appeared while writing; left untouched", path=final) from None
    except OSError as exc:  # no hard links on this file system: a rename after the earlier check
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        if final.exists():
            raise OutputExistsError("appeared while writing; left untouched", path=final) from None
        os.replace(tmp, final)
        return
    os.unlink(tmp)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[BinaryIO]:
    """Yield a binary file that appears as ``final`` only if the block completes."""
    final = Path(final)
    check_output(final, overwrite=overwrite)
    if final.is_dir() and not final.is_symlink():
        raise OutputExistsError("is a directory; give a file name", path=final)
    tmp = temp_name(final)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _claim(tmp, final, overwrite=overwrite)
        fsync_dir(final.parent)
    except OSError as exc:
        _remove(tmp)
        if not _is_ours(exc, tmp):
            raise
        raise write_error(exc, final) from None
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``final``; on success its files are fsynced and it is renamed
    to ``final`` (an existing ``final`` is replaced only with ``overwrite``, and only after the new one is
    complete)."""
    final = Path(final)
    check_output(final, overwrite=overwrite)
    tmp = temp_name(final)
    trash: Path | None = None
    try:
        tmp.mkdir()
        yield tmp
        trash = commit_dir(tmp, final, overwrite=overwrite)
    except OSError as exc:
        _remove(tmp)
        if not _is_ours(exc, tmp):
            raise
        raise write_error(exc, final) from None
    except BaseException:
        _remove(tmp)
        raise
    finally:
        if trash is not None:
            _remove(trash)


def commit_dir(tmp: Path, final: Path, *, overwrite: bool) -> Path | None:
    """fsync every file of a finished temporary directory and rename it to ``final`` (replacing an existing
    one only with ``overwrite``); returns the replaced old output, renamed aside, for the caller to remove."""
    for child in tmp.rglob("*"):
        if child.is_file() and not child.is_symlink():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(tmp)
    trash: Path | None = None
    if final.exists() or final.is_symlink():
        if not overwrite:
            raise OutputExistsError("appeared while writing; left untouched", path=final)
        trash = temp_name(final)
        os.replace(final, trash)
        try:
            os.replace(tmp, final)
        except OSError:
            os.replace(trash, final)  # put the old output back
            raise
    else:
        os.rename(tmp, final)  # fails rather than clobbers if a non-empty dir appeared meanwhile
    fsync_dir(final.parent)
    return trash


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
