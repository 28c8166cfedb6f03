"""Crash-safe outputs: write under a temporary name in the target directory, fsync, rename.

An error, Ctrl-C or SIGTERM removes the temporary; a SIGKILL leaves at most a hidden ``.<name>.tmp-`` entry,
never a partial file or directory under the final name. Without ``overwrite`` the final name is claimed with a
hard link (fails if it appeared meanwhile) instead of a rename that would clobber it. Inputs are never opened
for writing here.

Replacing an existing output (``overwrite``) is one atomic step on Linux: ``renameat2(RENAME_EXCHANGE)`` swaps
the finished temporary and the old output, so at every instant the final name holds either the old output or
the new one; the old one is then deleted. Where the call is missing or the file system refuses it, the old
output is first renamed to a hidden ``.<name>.old-<pid>-<id>`` and the new one renamed into place: a SIGKILL
between those two renames leaves no final name, and the next run that checks that output name
(:func:`check_output`) renames the old output back before doing anything else.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
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


def temp_name(final: Path, kind: str = "tmp") -> Path:
    return final.parent / f".{final.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths with renameat2(RENAME_EXCHANGE); False where the platform, the C
    library or the file system cannot (the caller falls back to two renames)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def recover_interrupted(final: Path) -> None:
    """Put back an old output that a replacement killed between its two renames left under a hidden name (only
    where RENAME_EXCHANGE was unavailable): the most recent ``.<name>.old-*`` when the final name is missing."""
    if final.exists() or final.is_symlink() or not final.parent.is_dir():
        return
    olds = sorted(final.parent.glob(f".{final.name}.old-*"), key=lambda p: p.lstat().st_mtime_ns)
    if olds:
        with contextlib.suppress(OSError):
            os.rename(olds[-1], final)
            fsync_dir(final.parent)


def _replace_existing(tmp: Path, final: Path) -> Path:
    """Make ``tmp`` the output at ``final`` (which exists); returns the path now holding the old output."""
    if exchange(tmp, final):
        return tmp
    old = temp_name(final, "old")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        os.replace(old, final)  # put the old output back
        raise
    return old


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
    recover_interrupted(final)
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
        trash = _replace_existing(tmp, final)  # one atomic step where the system allows
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
