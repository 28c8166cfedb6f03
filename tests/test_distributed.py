"""Split merges and validation on a real two-node Ray cluster (127.0.0.1), and validate --jobs.

One cluster per module (about 15 s to start); every test uses it. Without Ray installed these tests skip on a
dev machine and fail in CI (CI=true), like the engine tests.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from loraformat.merging.split import staging_dirs
from tests.test_merge_split import merge_args, run_cli, tree_bytes

try:
    import ray  # noqa: F401

    HAVE_RAY = True
except ImportError:  # pragma: no cover - the extra is part of the test install
    HAVE_RAY = False

pytestmark = pytest.mark.skipif(
    not HAVE_RAY and os.environ.get("CI") != "true",
    reason="ray is not installed (pip install loraformat[ray])",
)

SLOW_HOOK = "tests.ray_cluster.slow_writes"


@pytest.fixture(scope="module")
def cluster():
    from tests.ray_cluster import ray_cluster

    with ray_cluster() as c:
        yield c


def test_ray_merge_is_byte_identical_on_two_nodes(
    tmp_path, cluster, llama_base, stamped_adapter, split_reference, capsys
):
    nodes: list[set[str]] = []
    for attempt in range(3):  # SPREAD is best effort: a busy machine may start every share on the head
        out = tmp_path / f"m{attempt}"
        code, stdout, err = run_cli(
            merge_args(
                llama_base, stamped_adapter, out, f"--ray={cluster.address}", "--workers", 3, "--json"
            ),
            capsys,
        )
        assert code == 0, err
        result = json.loads(stdout)
        assert tree_bytes(out) == split_reference and result["workers"] == 3
        assert not any(p.exists() for p in staging_dirs(out))
        nodes.append(set(result["nodes"]))
        if len(nodes[-1]) == 2:
            break
    assert len(nodes[-1]) == 2, nodes  # the shares ran on both nodes


def _kill_a_share_mid_write(cluster, out: Path, stop: threading.Event) -> list[int]:
    """SIGKILL the worker process of the first share seen writing: its private directory (named with its
    pid) holds a file and the process is one of this cluster's running share tasks."""
    staging, _ = staging_dirs(out)
    deadline = time.monotonic() + 120
    while not stop.is_set() and time.monotonic() < deadline:
        running = set(cluster.task_processes("loraformat-merge-"))
        for private in staging.glob(".w*-of-*-*") if staging.is_dir() else []:
            pid = int(private.name.split("-")[3])
            if pid in running and any(private.iterdir()):
                os.kill(pid, 9)
                return [pid]
        time.sleep(0.01)
    return []


def _merge_with_a_kill(cluster, llama_base, stamped_adapter, out, retries):
    from loraformat.distributed import merge

    stop = threading.Event()
    killed: list[int] = []
    killer = threading.Thread(target=lambda: killed.extend(_kill_a_share_mid_write(cluster, out, stop)))
    killer.start()
    try:
        return merge(
            llama_base,
            [stamped_adapter],
            out,
            address=cluster.address,
            workers=2,
            max_retries=retries,
            max_shard_size="60KB",
            runtime_env={"worker_process_setup_hook": SLOW_HOOK},
        ), killed
    finally:
        stop.set()
        killer.join()


def test_worker_killed_mid_task_is_retried(tmp_path, cluster, llama_base, stamped_adapter, split_reference):
    out = tmp_path / "m"
    result, killed = _merge_with_a_kill(cluster, llama_base, stamped_adapter, out, retries=2)
    assert killed, "no share task was found running"
    assert killed[0] not in [s["pid"] for s in result.shares]  # the killed attempt's share was redone
    assert result.recovered == 1  # the retry removed the dead attempt's private directory
    assert tree_bytes(out) == split_reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_task_that_keeps_failing_leaves_nothing(tmp_path, cluster, llama_base, stamped_adapter):
    from loraformat.errors import DistributedError

    out = tmp_path / "m"
    with pytest.raises(DistributedError, match=r"share \d/2: its worker process died 1 time\(s\)"):
        _merge_with_a_kill(cluster, llama_base, stamped_adapter, out, retries=0)
    assert sorted(tmp_path.iterdir()) == []


def test_input_error_in_a_task_is_one_line_and_not_retried(
    tmp_path, cluster, llama_base, stamped_adapter, capsys
):
    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    weights = load_file(base / "model.safetensors")
    name = "model.layers.1.self_attn.q_proj.weight"
    weights[name] = weights[name] + 1  # no longer the base the adapter recorded digests of
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "m"
    code, _, err = run_cli(
        merge_args(base, stamped_adapter, out, f"--ray={cluster.address}", "--workers", 2), capsys
    )
    assert code == 1 and "differs from the digest recorded" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, peft_adapters, llama_base) -> Path:
    """Adapters as a team would keep them: several good ones, one with a NaN, one truncated file."""
    from loraformat.conversion import convert

    root = tmp_path_factory.mktemp("fleet")
    for i in range(5):
        convert(peft_adapters["plain"], root / f"tenant{i}.safetensors", base=llama_base, name=f"t{i}")
    shutil.copytree(peft_adapters["plain"], root / "peft-tenant")
    bad = load_file(root / "tenant3.safetensors")
    key = next(k for k in sorted(bad) if "lora_B" in k)
    bad[key][0, 0] = float("nan")
    from safetensors import safe_open

    with safe_open(root / "tenant3.safetensors", "pt") as f:
        meta = f.metadata()
    save_file(bad, root / "tenant3.safetensors", metadata=meta)
    data = (root / "tenant4.safetensors").read_bytes()
    (root / "tenant4.safetensors").write_bytes(data[: len(data) // 2])
    return root


def test_validate_ray_and_jobs_equal_a_local_run(cluster, fleet, llama_base, capsys, monkeypatch):
    monkeypatch.chdir(fleet.parent)  # relative paths in, the same relative paths out
    args = ["validate", fleet.name, "--base", llama_base, "--json"]  # level base: every check
    local = run_cli(args, capsys)
    assert local[0] == 1 and json.loads(local[1])["summary"]["invalid"] == 2
    assert run_cli([*args, f"--ray={cluster.address}"], capsys) == local
    assert run_cli([*args, "--jobs", 2], capsys) == local
    text = [a for a in args if a != "--json"]
    assert run_cli([*text, f"--ray={cluster.address}"], capsys) == run_cli(text, capsys)


def test_unreachable_cluster_is_one_line(tmp_path, llama_base, stamped_adapter, capsys):
    from tests.ray_cluster import free_ports

    code, _, err = run_cli(
        merge_args(llama_base, stamped_adapter, tmp_path / "m", f"--ray=127.0.0.1:{free_ports(1)[0]}"), capsys
    )
    assert code == 2 and "cannot reach the Ray cluster" in err and err.count("\n") == 1
    assert sorted(tmp_path.iterdir()) == []


def test_ray_merge_of_an_fp8_base_is_byte_identical(tmp_path, cluster, quantized_bases, capsys):
    """A re-quantized FP8 (128x128 block scales) merge split over the cluster writes the bytes of a one-machine
    merge: every share re-quantizes its weights with fresh scales and writes the scales beside them."""
    from tests.fixtures import LLAMA_TARGETS, make_peft_adapter

    base = quantized_bases["fp8-block"]
    adapter = make_peft_adapter(
        quantized_bases["bf16"], tmp_path / "a", r=8, lora_alpha=16, target_modules=LLAMA_TARGETS
    )
    args = ["merge", base, adapter, "--max-shard-size", "10KB", "--json", "-o"]
    code, _, err = run_cli([*args, tmp_path / "whole"], capsys)
    assert code == 0, err
    code, stdout, err = run_cli([*args, tmp_path / "ray", f"--ray={cluster.address}", "--workers", 3], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["workers"] == 3
    assert tree_bytes(tmp_path / "ray") == tree_bytes(tmp_path / "whole")
    assert len(list((tmp_path / "whole").glob("*.safetensors"))) > 5
