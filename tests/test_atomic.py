"""atomic_file / atomic_dir: nothing under the final name unless the block completed; overwrite semantics."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraformat.errors import OutputExistsError, WriteError
from loraformat.io.atomic import atomic_dir, atomic_file, write_error


class Boom(Exception):
    pass


def test_file_success_and_no_leftovers(tmp_path):
    final = tmp_path / "out.bin"
    with atomic_file(final) as f:
        f.write(b"hello")
        assert not final.exists()  # invisible until the block completes
    assert final.read_bytes() == b"hello"
    assert os.listdir(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_file_exception_leaves_nothing(tmp_path, exc):
    final = tmp_path / "out.bin"
    with pytest.raises(exc):
        with atomic_file(final) as f:
            f.write(b"partial")
            raise exc()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_file_exception_keeps_existing_output(tmp_path, exc):
    final = tmp_path / "out.bin"
    final.write_bytes(b"old")
    with pytest.raises(exc):
        with atomic_file(final, overwrite=True) as f:
            f.write(b"new")
            raise exc()
    assert final.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


def test_file_overwrite_semantics(tmp_path):
    final = tmp_path / "out.bin"
    final.write_bytes(b"old")
    with pytest.raises(OutputExistsError) as err:
        with atomic_file(final) as f:
            f.write(b"new")
    assert str(err.value) == f"{final}: already exists (use --overwrite to replace it)"
    assert final.read_bytes() == b"old"
    with atomic_file(final, overwrite=True) as f:
        f.write(b"new")
    assert final.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]


def test_file_appearing_meanwhile_is_not_clobbered(tmp_path):
    final = tmp_path / "out.bin"
    with pytest.raises(OutputExistsError, match="appeared while writing"):
        with atomic_file(final) as f:
            f.write(b"mine")
            final.write_bytes(b"someone else's")
    assert final.read_bytes() == b"someone else's" and os.listdir(tmp_path) == ["out.bin"]


def test_file_missing_parent_and_directory_target(tmp_path):
    with pytest.raises(WriteError, match="parent directory does not exist"):
        with atomic_file(tmp_path / "no" / "out.bin"):
            pass
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputExistsError, match="is a directory"):
        with atomic_file(tmp_path / "d", overwrite=True):
            pass


def test_read_errors_inside_the_block_keep_their_identity(tmp_path):
    """An OSError about some *input* is not turned into a misleading write error."""
    with pytest.raises(FileNotFoundError):
        with atomic_file(tmp_path / "out.bin") as f:
            f.write((tmp_path / "missing-input").read_bytes())
    assert os.listdir(tmp_path) == []


_CHILD = """
import resource, sys
from loraformat.errors import WriteError
from loraformat.io.atomic import atomic_file, atomic_dir
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
try:
    if sys.argv[2] == "file":
        with atomic_file(sys.argv[1]) as f:
            for _ in range(4):
                f.write(b"x" * (1 << 15))
    else:
        with atomic_dir(sys.argv[1]) as d:
            (d / "a.bin").write_bytes(b"y" * (1 << 17))
except WriteError as exc:
    print(exc)
    sys.exit(exc.exit_code)
"""


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_write_failure_file_size_limit(tmp_path, kind):
    final = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(final), kind], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stdout
        == f"{final}: write failed: file too large (size limit reached); nothing was left behind\n"
    )
    assert os.listdir(tmp_path) == []


def test_enospc_message_is_one_line(tmp_path):
    err = write_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "x")
    assert isinstance(err, WriteError) and err.exit_code == 2
    assert str(err) == f"{tmp_path / 'x'}: write failed: no space left on device; nothing was left behind"
    assert "\n" not in str(err)


def test_enospc_from_the_device(tmp_path):
    """A real ENOSPC: /dev/full accepts opens and fails every write."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    link = tmp_path / "out.bin"
    # write_error maps the errno raised by a real write
    with pytest.raises(OSError) as raw:
        with open("/dev/full", "wb") as f:
            f.write(b"x")
            f.flush()
    assert raw.value.errno == errno.ENOSPC
    assert "no space left on device" in str(write_error(raw.value, link))


def test_dir_success_and_exceptions(tmp_path):
    final = tmp_path / "outdir"
    with atomic_dir(final) as d:
        (d / "a").write_text("1")
        (d / "sub").mkdir()
        (d / "sub" / "b").write_text("2")
        assert not final.exists()
    assert (final / "sub" / "b").read_text() == "2"
    assert os.listdir(tmp_path) == ["outdir"]

    for exc in (Boom, KeyboardInterrupt):
        other = tmp_path / "other"
        with pytest.raises(exc):
            with atomic_dir(other) as d:
                (d / "a").write_text("partial")
                raise exc()
        assert not other.exists()
    assert os.listdir(tmp_path) == ["outdir"]


def test_dir_overwrite_semantics(tmp_path):
    final = tmp_path / "outdir"
    final.mkdir()
    (final / "old").write_text("keep")
    with pytest.raises(OutputExistsError):
        with atomic_dir(final) as d:
            (d / "new").write_text("x")
    assert os.listdir(final) == ["old"]
    with pytest.raises(Boom):
        with atomic_dir(final, overwrite=True) as d:
            (d / "new").write_text("x")
            raise Boom()
    assert os.listdir(final) == ["old"]  # a failed replacement keeps the old output
    with atomic_dir(final, overwrite=True) as d:
        (d / "new").write_text("x")
    assert os.listdir(final) == ["new"] and os.listdir(tmp_path) == ["outdir"]


def test_sigkill_leaves_only_a_hidden_temporary(tmp_path):
    code = (
        "import os, signal; from loraformat.io.atomic import atomic_file\n"
        f"with atomic_file({str(tmp_path / 'out.bin')!r}) as f:\n"
        "    f.write(b'x'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode == -9
    names = os.listdir(tmp_path)
    assert "out.bin" not in names and all(n.startswith(".out.bin.tmp-") for n in names)


def test_final_path_accepts_str(tmp_path):
    with atomic_file(str(tmp_path / "s.bin")) as f:
        f.write(b"1")
    assert Path(tmp_path / "s.bin").read_bytes() == b"1"
