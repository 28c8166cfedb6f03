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


# --- replacing an existing output under SIGKILL (merge --overwrite) -------------------------------------------

KILLER = """
import os, signal, sys
from pathlib import Path
import loraformat.io.atomic as atomic

mode, base, adapter, out = sys.argv[1:5]
real_exchange, real_replace = atomic.exchange, os.replace

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "before-exchange":
    atomic.exchange = lambda a, b: die()
elif mode == "after-exchange":
    atomic.exchange = lambda a, b: (real_exchange(a, b), die())
elif mode == "after-moving-out":  # the old code's window: OUT renamed away, the new one not yet in place
    def replace(a, b):
        real_replace(a, b)
        if Path(a) == Path(out):
            die()
    os.replace = os.rename = replace
elif mode == "between-renames":  # a file system without RENAME_EXCHANGE: the two-rename fallback
    atomic.exchange = lambda a, b: False
    def replace(a, b):
        real_replace(a, b)
        if Path(b).name.startswith("." + Path(out).name + ".old-"):
            die()
    os.replace = replace
from loraformat.cli.main import main
main(["--quiet", "merge", base, adapter, "-o", out, "--overwrite"])
"""


def _old_output(out: Path) -> None:
    out.mkdir()
    (out / "OLD").write_text("the output of an earlier run")


def _killed_merge(mode: str, out: Path, llama_base: Path, adapter: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, mode, str(llama_base), str(adapter), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]


def test_rename_exchange_swaps_atomically(tmp_path):
    from loraformat.io.atomic import exchange

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("dir")
    (tmp_path / "b").write_text("file")
    assert exchange(tmp_path / "a", tmp_path / "b")  # Linux file systems the tests run on support it
    assert (tmp_path / "b" / "x").read_text() == "dir" and (tmp_path / "a").read_text() == "file"


@pytest.mark.parametrize("mode", ["before-exchange", "after-exchange"])
def test_sigkill_during_overwrite_leaves_old_or_new_output(tmp_path, llama_base, peft_adapters, mode):
    """At every instant OUT holds a complete output: the old one before the exchange, the new one after."""
    out = tmp_path / "merged"
    _old_output(out)
    _killed_merge(mode, out, llama_base, peft_adapters["plain"])
    if mode == "before-exchange":
        assert (out / "OLD").exists() and not (out / "model.safetensors").exists()
    else:
        from loraformat.io.checkpoint import open_checkpoint

        assert not (out / "OLD").exists() and open_checkpoint(out).shards  # the new, complete merge
    assert {p.name for p in tmp_path.iterdir() if not p.name.startswith(".")} == {"merged"}


def test_no_instant_without_an_output(tmp_path, llama_base, peft_adapters):
    """Killed the moment the old output is moved away (if it ever is): OUT must still be there, complete."""
    out = tmp_path / "merged"
    _old_output(out)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            KILLER,
            "after-moving-out",
            str(llama_base),
            str(peft_adapters["plain"]),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode in (0, -9), proc.stderr[-2000:]
    assert (out / "model.safetensors").exists() or (out / "OLD").exists()


def test_sigkill_between_fallback_renames_is_recovered(tmp_path, llama_base, peft_adapters):
    """Without RENAME_EXCHANGE a SIGKILL between the two renames leaves no OUT; the next run puts the old one
    back before anything else (and so refuses to overwrite it without --overwrite)."""
    from loraformat.io.atomic import check_output

    out = tmp_path / "merged"
    _old_output(out)
    _killed_merge("between-renames", out, llama_base, peft_adapters["plain"])
    assert not out.exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".merged.old-")]
    with pytest.raises(OutputExistsError):
        check_output(out, overwrite=False)
    assert (out / "OLD").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.old-")]
