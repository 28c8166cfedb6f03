"""``merge --shard I/N`` and ``--assemble N`` with real worker processes: byte-identical to a one-machine merge,
a missing or dead share refused and completed by a rerun, untrusted done-files and staging entries refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loraformat.cli.main import main
from loraformat.merging.split import staging_dirs
from tests.test_cli_merge import SLOW_CLI

SHARD_SIZE = "60KB"  # the 2-layer test Llama in 5 output shards


def run_cli(args, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def cli_process(args, *, slow: bool = False) -> subprocess.Popen[str]:
    code = SLOW_CLI if slow else "import sys; from loraformat.cli.main import main; main(sys.argv[1:])"
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def merge_args(llama_base, stamped_adapter, out, *extra):
    return ["merge", llama_base, stamped_adapter, "-o", out, "--max-shard-size", SHARD_SIZE, *extra]


def test_n_processes_then_assemble_is_byte_identical(
    tmp_path, llama_base, stamped_adapter, split_reference, capsys
):
    out = tmp_path / "m"
    procs = [
        cli_process(merge_args(llama_base, stamped_adapter, out, "--shard", f"{i}/3", "--json"))
        for i in range(3)
    ]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        results.append(json.loads(stdout))
    assert not out.exists()  # nothing under OUT before --assemble
    written = [s["name"] for r in results for s in r["shards"]]
    assert sorted(written) == sorted(n for n in split_reference if n.endswith(".safetensors"))
    assert sum(r["tensors_verified"] for r in results) > 0  # each worker checked its own targets' digests
    code, stdout, err = run_cli(
        merge_args(llama_base, stamped_adapter, out, "--assemble", 3, "--json"), capsys
    )
    assert code == 0, err
    assert tree_bytes(out) == split_reference
    assert not any(p.exists() for p in staging_dirs(out))
    assert json.loads(stdout)["workers"] == 3


def test_missing_share_refused_then_rerun_completes(
    tmp_path, llama_base, stamped_adapter, split_reference, capsys
):
    out = tmp_path / "m"
    for i in (0, 2):
        assert run_cli(merge_args(llama_base, stamped_adapter, out, "--shard", f"{i}/3"), capsys)[0] == 0
    code, stdout, err = run_cli(merge_args(llama_base, stamped_adapter, out, "--assemble", 3), capsys)
    assert code == 2 and not out.exists()
    assert err.count("\n") == 1 and "1 of 3 workers have not finished (1)" in err and "--shard 1/3" in err
    code, stdout, _ = run_cli(merge_args(llama_base, stamped_adapter, out, "--shard", "0/3"), capsys)
    assert code == 0 and "already done" in stdout  # a finished worker is not redone
    assert run_cli(merge_args(llama_base, stamped_adapter, out, "--shard", "1/3"), capsys)[0] == 0
    assert run_cli(merge_args(llama_base, stamped_adapter, out, "--assemble", 3), capsys)[0] == 0
    assert tree_bytes(out) == split_reference


def test_killed_worker_leaves_no_partial_file_and_rerun_recovers(
    tmp_path, llama_base, stamped_adapter, split_reference, capsys
):
    out = tmp_path / "m"
    staging, done = staging_dirs(out)
    proc = cli_process(merge_args(llama_base, stamped_adapter, out, "--shard", "0/2"), slow=True)
    deadline = time.monotonic() + 60
    while not any(p.is_dir() and any(p.iterdir()) for p in staging.glob(".w0-of-2-*")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the worker never started writing"
        time.sleep(0.02)
    time.sleep(0.2)
    assert proc.poll() is None, "the worker finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not any(p.name.endswith(".safetensors") for p in staging.iterdir())  # only its private dir
    assert not (done.exists() and any(done.iterdir()))
    assert run_cli(merge_args(llama_base, stamped_adapter, out, "--shard", "1/2"), capsys)[0] == 0
    code, _, err = run_cli(merge_args(llama_base, stamped_adapter, out, "--assemble", 2), capsys)
    assert code == 2 and "--shard 0/2" in err and not out.exists()
    code, stdout, _ = run_cli(
        merge_args(llama_base, stamped_adapter, out, "--shard", "0/2", "--json"), capsys
    )
    assert code == 0 and json.loads(stdout)["recovered"] == 1
    assert run_cli(merge_args(llama_base, stamped_adapter, out, "--assemble", 2), capsys)[0] == 0
    assert tree_bytes(out) == split_reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def _two_shares(llama_base, stamped_adapter, out, capsys):
    for i in range(2):
        assert run_cli(merge_args(llama_base, stamped_adapter, out, "--shard", f"{i}/2"), capsys)[0] == 0


def test_tampered_shares_are_refused(tmp_path, llama_base, stamped_adapter, capsys):
    out = tmp_path / "m"
    staging, done = staging_dirs(out)
    _two_shares(llama_base, stamped_adapter, out, capsys)
    marker = sorted(done.iterdir())[1]
    doc = json.loads(marker.read_text())
    for bad, match in [
        ({**doc, "plan": "0" * 64}, "other inputs"),
        ({**doc, "shards": [{**doc["shards"][0], "name": "../evil"}, *doc["shards"][1:]]}, "where the plan"),
    ]:
        marker.write_text(json.dumps(bad))
        code, _, err = run_cli(merge_args(llama_base, stamped_adapter, out, "--assemble", 2), capsys)
        assert code == 2 and match in err and "worker 1/2" in err and err.count("\n") == 1
    marker.write_text(json.dumps(doc))
    shard = staging / doc["shards"][0]["name"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-1])  # truncated after the worker finished
    code, _, err = run_cli(merge_args(llama_base, stamped_adapter, out, "--assemble", 2), capsys)
    assert code == 2 and "not a file of the recorded" in err
    shard.write_bytes(b"X" + data[1:])
    code, _, err = run_cli(merge_args(llama_base, stamped_adapter, out, "--assemble", 2), capsys)
    assert code == 2 and "planned header" in err
    shard.write_bytes(data)
    (staging / "stray.txt").write_text("x")
    code, _, err = run_cli(merge_args(llama_base, stamped_adapter, out, "--assemble", 2), capsys)
    assert code == 2 and "stray.txt" in err and not out.exists()
    (staging / "stray.txt").unlink()
    assert run_cli(merge_args(llama_base, stamped_adapter, out, "--assemble", 2), capsys)[0] == 0


def test_other_options_or_split_never_assemble(tmp_path, llama_base, stamped_adapter, capsys):
    out = tmp_path / "m"
    _two_shares(llama_base, stamped_adapter, out, capsys)
    code, _, err = run_cli(merge_args(llama_base, stamped_adapter, out, "--assemble", 3), capsys)
    assert code == 2 and "3 of 3 workers have not finished" in err
    code, _, err = run_cli(
        merge_args(llama_base, stamped_adapter, out, "--assemble", 2, "--weight", 0.5), capsys
    )
    assert code == 2 and "other inputs" in err and not out.exists()


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--shard", "2/2"], "I must be in 0..1"),
        (["--shard", "x"], "expected I/N"),
        (["--assemble", 0], "between 1 and"),
        (["--shard", "0/2", "--assemble", 2], "cannot be combined"),
        (["--workers", 2], "go with --ray"),
    ],
)
def test_usage_errors(tmp_path, llama_base, stamped_adapter, capsys, extra, match):
    code, _, err = run_cli(merge_args(llama_base, stamped_adapter, tmp_path / "m", *extra), capsys)
    assert code == 2 and match in err and err.count("\n") == 1
    assert sorted(tmp_path.iterdir()) == []


def test_existing_output_refused_by_workers(tmp_path, llama_base, stamped_adapter, capsys):
    out = tmp_path / "m"
    out.mkdir()
    code, _, err = run_cli(merge_args(llama_base, stamped_adapter, out, "--shard", "0/2"), capsys)
    assert code == 2 and "already exists" in err and sorted(tmp_path.iterdir()) == [out]


def test_diffusers_pipeline_is_split_per_component(tmp_path, llama_base, stamped_adapter, capsys):
    base = tmp_path / "pipe"
    base.mkdir()
    (base / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    code, _, err = run_cli(merge_args(base, stamped_adapter, tmp_path / "m", "--shard", "0/2"), capsys)
    assert code == 2 and "split it per component" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_help_shows_the_split_and_ray_examples(capsys):
    code, out, _ = run_cli(["merge", "--help"], capsys)
    assert code == 0 and "--shard 3/8" in out and "--assemble 8" in out and "--ray=" in out
    code, out, _ = run_cli(["validate", "--help"], capsys)
    assert code == 0 and "--jobs 8" in out and "--ray=" in out
