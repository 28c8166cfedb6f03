"""``loraformat merge`` on the command line: exit codes, one-line errors, JSON, signals, write failures."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loraformat.cli.main import main
from loraformat.conversion import convert
from loraformat.io.checkpoint import open_checkpoint
from tests.merge_helpers import load_dir

#: runs the CLI with every block written slowly, so that a signal surely lands mid-merge (test-only wrapper)
SLOW_CLI = """
import sys, time
import loraformat.merging.engine as engine
import loraformat.merging.files as files
engine.BLOCK_BYTES = 2048
_write = files.pwrite_all
def slow(fd, mem, offset):
    time.sleep(0.05)
    _write(fd, mem, offset)
files.pwrite_all = slow
from loraformat.cli.main import main
main(sys.argv[1:])
"""


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def _leftovers(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]


def test_help_has_an_example(capsys):
    code, out, _ = run_cli(["merge", "--help"], capsys)
    assert code == 0 and "Example" in out and "loraformat merge" in out and "--max-shard-size" in out


def test_merge_and_json(tmp_path, capsys, peft_adapters, llama_base):
    code, out, err = run_cli(
        ["merge", llama_base, peft_adapters["plain"], "-o", tmp_path / "m", "--json"], capsys
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["tensors_merged"] == 14 and data["device"] == "cpu"
    for key in ("bytes_read", "bytes_written", "seconds", "gb_per_s", "peak_rss_bytes", "peak_gpu_bytes"):
        assert isinstance(data[key], (int, float)), key
    assert data["bytes_written"] >= sum(s.file_size for s in open_checkpoint(tmp_path / "m").shards)
    assert data["verified"]["enabled"] and data["verified"]["adapters_without_digests"]
    code, out, err = run_cli(["merge", llama_base, peft_adapters["plain"], "-o", tmp_path / "h"], capsys)
    assert code == 0 and "14 merged" in out and "stamp one" in out


def test_weights_dtype_and_sharding_options(tmp_path, capsys, peft_adapters, llama_base):
    args = [
        "merge",
        llama_base,
        peft_adapters["plain"],
        peft_adapters["rslora"],
        "--weight",
        "0.5",
        "--weight",
        "2",
        "--dtype",
        "fp32",
        "--max-shard-size",
        "100KB",
        "-o",
        tmp_path / "m",
        "--json",
        "--device",
        "cpu",
    ]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    data = json.loads(out)
    assert [a["weight"] for a in data["adapters"]] == [0.5, 2.0] and len(data["shards"]) > 1
    assert all(t.dtype == torch.float32 for t in load_dir(tmp_path / "m").values())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--weight", "1", "--weight", "2"], "--weight"),
        (["--max-shard-size", "lots"], "--max-shard-size"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_usage_errors_exit_2(extra, message, tmp_path, capsys, peft_adapters, llama_base):
    code, _, err = run_cli(
        ["merge", llama_base, peft_adapters["plain"], "-o", tmp_path / "m", *extra], capsys
    )
    assert code == 2 and err.startswith("error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "m").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_usage_error(tmp_path, capsys, peft_adapters, llama_base):
    code, _, err = run_cli(
        ["merge", llama_base, peft_adapters["plain"], "-o", tmp_path / "m", "--device", "cuda"], capsys
    )
    assert code == 2 and "CUDA is not available" in err


def test_existing_output_needs_overwrite(tmp_path, capsys, peft_adapters, llama_base):
    (tmp_path / "m").mkdir()
    code, _, err = run_cli(["merge", llama_base, peft_adapters["plain"], "-o", tmp_path / "m"], capsys)
    assert code == 2 and "already exists" in err
    code, _, err = run_cli(
        ["merge", llama_base, peft_adapters["plain"], "-o", tmp_path / "m", "--overwrite"], capsys
    )
    assert code == 0, err


def test_changed_base_exit_1_nothing_left(tmp_path, capsys, peft_adapters, llama_base):
    stamped = tmp_path / "a.safetensors"
    convert(peft_adapters["plain"], stamped, base=llama_base)
    changed = tmp_path / "changed"
    shutil.copytree(llama_base, changed)
    shard, info = open_checkpoint(changed).locations["model.layers.0.self_attn.q_proj.weight"]
    with open(shard.path, "r+b") as f:
        f.seek(info.start)
        f.write(b"\x00\x00\x00\x00")
    code, _, err = run_cli(["merge", changed, stamped, "-o", tmp_path / "m"], capsys)
    assert code == 1 and "q_proj.weight" in err and "digest" in err and err.count("\n") == 1
    assert not (tmp_path / "m").exists() and not _leftovers(tmp_path / "m")
    code, _, err = run_cli(["merge", changed, stamped, "-o", tmp_path / "m", "--no-verify"], capsys)
    assert code == 0 and "warning: --no-verify" in err
    code, out, _ = run_cli(["merge", llama_base, stamped, "-o", tmp_path / "ok", "--json"], capsys)
    assert code == 0 and json.loads(out)["verified"]["tensors"] == 14


def _cli(args: list[object], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        **kw,
    )


def _wait_for_output_in_progress(proc: subprocess.Popen, out: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for tmp in _leftovers(out):
            shard = tmp / "model.safetensors"
            if shard.exists() and shard.stat().st_size > 0:
                time.sleep(0.3)  # a few blocks written
                assert proc.poll() is None, "the merge finished before it could be interrupted"
                return
        if proc.poll() is not None:
            raise AssertionError(f"merge exited early: {proc.communicate()}")
        time.sleep(0.02)
    raise AssertionError("the merge never started writing")


def test_sigkill_midway_leaves_nothing_under_out(tmp_path, peft_adapters, llama_base):
    out = tmp_path / "m"
    proc = _cli(["merge", llama_base, peft_adapters["plain"], "-o", out])
    _wait_for_output_in_progress(proc, out)
    proc.kill()
    proc.wait(30)
    assert not out.exists()
    assert all(p.name.startswith(".") for p in tmp_path.iterdir())  # at most a hidden temporary


def test_sigterm_midway_removes_everything(tmp_path, peft_adapters, llama_base):
    out = tmp_path / "m"
    proc = _cli(["merge", llama_base, peft_adapters["plain"], "-o", out])
    _wait_for_output_in_progress(proc, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err
    assert not out.exists() and not _leftovers(out)


def test_file_size_limit_is_a_clean_write_error(tmp_path, peft_adapters, llama_base):
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))

    out = tmp_path / "m"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from loraformat.cli.main import main; main()",
            "merge",
            str(llama_base),
            str(peft_adapters["plain"]),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "write failed" in lines[0], proc.stderr
    assert not out.exists() and not _leftovers(out)


#: runs the CLI, then reports on stderr whether torch was imported (the numpy CPU backend must not import it)
NO_TORCH_CLI = """
import sys
from loraformat.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("torch imported:", "torch" in sys.modules, file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "auto",
            marks=pytest.mark.skipif(
                any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg", "/dev/kfd")),
                reason="a GPU device node exists: auto asks torch about CUDA",
            ),
        ),
    ],
)
def test_cpu_merge_never_imports_torch(device, tmp_path, peft_adapters, llama_base):
    stamped = tmp_path / "stamped.safetensors"
    convert(peft_adapters["patterns"], stamped, base=llama_base)  # verified while streaming
    for adapters, extra in (
        ([peft_adapters["plain"]], []),
        ([stamped, peft_adapters["embedding"]], ["--weight", "0.5", "--weight", "2"]),
        ([peft_adapters["modules_to_save"]], ["--dtype", "fp32", "--max-shard-size", "100KB"]),
    ):
        out = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                NO_TORCH_CLI,
                "merge",
                str(llama_base),
                *map(str, adapters),
                "-o",
                str(out),
                "--device",
                device,
                "--json",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        assert proc.returncode == 0, proc.stderr
        assert "torch imported: False" in proc.stderr, (adapters, proc.stderr)
        data = json.loads(proc.stdout)
        assert data["backend"] == "numpy" and data["device"] == "cpu" and data["tensors_merged"] > 0
    assert data["tensors_replaced"] == 1
    # DoRA stays on torch, and says so
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            NO_TORCH_CLI,
            "merge",
            str(llama_base),
            str(peft_adapters["dora"]),
            "-o",
            str(tmp_path / "dora"),
            "--device",
            device,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0 and "torch imported: True" in proc.stderr
    assert json.loads(proc.stdout)["backend"] == "torch"


def test_the_cli_keeps_freed_memory_instead_of_faulting_it_in_again():
    """keep_freed_memory (called by `loraformat merge`): megabyte temporaries allocated and freed in a loop no
    longer fault their pages in every time (glibc only; elsewhere a no-op)."""
    import subprocess
    import sys

    script = (
        "import resource, sys, numpy as np\n"
        "if sys.argv[1] == 'keep':\n"
        "    from loraformat.cli.common import keep_freed_memory; keep_freed_memory()\n"
        "a = np.ones(1 << 18, np.float32)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(300):\n"
        "    b = a * 2.0; c = b + a; del b, c\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    faults = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", script, mode], capture_output=True, text=True, check=True
            ).stdout
        )
        for mode in ("default", "keep")
    }
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's allocator only")
    assert faults["keep"] * 10 < faults["default"], faults
