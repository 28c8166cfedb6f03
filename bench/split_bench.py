"""Benchmark split merges: per-worker throughput of a share, the cost of --assemble, and Ray against local
processes doing the same shares.

Uses merge_bench.py's cached inputs (a random bf16 Llama-shaped base and a stamped r16 adapter, so every share
verifies its targets' digests) and re-shards the output with --max-shard-size so there are shards to split.
Every figure is the median of --repeat runs, each with a warm page cache, each until the output is durable.
Wall seconds and CPU seconds (user + system of every process involved: os.wait4 for the CLI runs; for Ray the
driver, the share tasks' own counts and the Ray processes this script started, reaped at shutdown) are both
reported: on a shared machine the CPU seconds are the stable figure.

  one        `loraformat merge` on one machine: the reference
  share 1/1  the whole merge as one share (+ hashing the shards for the done-file) and --assemble 1
  share i/N  each of N shares alone, one after another: per-worker throughput (GB/s of output written)
  assemble   `--assemble N` after all shares: checks done-files and headers, writes index/config, renames
  local xN   N shares as N concurrent processes, then --assemble (what a job array does on one node)
  ray xN     distributed.merge on a local Ray instance with N CPUs: N tasks + assemble (driver connect excluded)

    python bench/split_bench.py                        # TinyLlama shape (2.2 GB), N = 2
    python bench/split_bench.py --size tiny --repeat 1 # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from merge_bench import LF, build_adapters, build_base, drop_or_warm  # noqa: E402


def cli(*args: object) -> list[str]:
    return [sys.executable, "-c", LF, "-q", *map(str, args)]


def run_all(cmds: list[list[str]], env: dict[str, str]) -> tuple[float, float]:
    """Run the commands concurrently: (wall seconds, CPU seconds of exactly these children)."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env) for c in cmds]
    cpu = 0.0
    for p in procs:
        _, status, usage = os.wait4(p.pid, 0)
        cpu += usage.ru_utime + usage.ru_stime
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"{' '.join(map(str, p.args[3:6]))} failed: {p.stderr.read().decode()[-2000:]}")
    return time.perf_counter() - t0, cpu


def ray_merge(
    base: Path, adapter: Path, out: Path, workers: int, shard: str
) -> tuple[float, float, float, float]:
    """(wall of distributed.merge, CPU of everything, CPU of the shares themselves, connect seconds) on a
    local Ray instance started here."""
    import resource

    import ray

    from loraformat import distributed

    os.environ.setdefault(
        "RAY_AUTH_MODE", "disabled"
    )  # a local ray.init would otherwise write ~/.ray/auth_token
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    connect = time.perf_counter() - t0
    try:
        r = distributed.merge(base, [adapter], out, workers=workers, max_shard_size=shard)
    finally:
        ray.shutdown()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    children = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    shares = sum(s["cpu_seconds"] for s in r.shares)
    return r.seconds, time.process_time() - cpu0 + max(children, shares), shares, connect


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tinyllama", choices=["tiny", "tinyllama", "llama8b-layers"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-size", default="256MB", help="output --max-shard-size (shards to split)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args()
    root = args.out / f"merge-{args.size}"
    root.mkdir(parents=True, exist_ok=True)
    base = build_base(args.size, root / "base")
    _, adapter = build_adapters(args.size, base, root)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1")
    work = args.out / "split-work"
    n, shard = args.workers, args.shard_size
    common = [base, adapter, "--max-shard-size", shard]
    times: dict[str, list[float]] = {}
    cpus: dict[str, list[float]] = {}

    def record(name: str, wall_cpu: tuple[float, float]) -> None:
        times.setdefault(name, []).append(wall_cpu[0])
        cpus.setdefault(name, []).append(wall_cpu[1])

    def merge(*extra: object) -> list[str]:
        return cli("merge", *common, *extra)

    total = 0
    for _ in range(args.repeat):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        drop_or_warm(base, False)
        record("one", run_all([merge("-o", work / "one")], env))
        total = sum(f.stat().st_size for f in (work / "one").iterdir())
        record("share 1/1", run_all([merge("-o", work / "s1", "--shard", "0/1")], env))
        record("assemble 1", run_all([merge("-o", work / "s1", "--assemble", 1)], env))
        for i in range(n):
            record(f"share {i}/{n}", run_all([merge("-o", work / "sn", "--shard", f"{i}/{n}")], env))
        record(f"assemble {n}", run_all([merge("-o", work / "sn", "--assemble", n)], env))
        drop_or_warm(base, False)
        wall, cpu = run_all([merge("-o", work / "pn", "--shard", f"{i}/{n}") for i in range(n)], env)
        wall2, cpu2 = run_all([merge("-o", work / "pn", "--assemble", n)], env)
        record(f"local x{n}", (wall + wall2, cpu + cpu2))
        if not args.skip_ray:
            drop_or_warm(base, False)
            wall, cpu, shares, connect = ray_merge(base, adapter, work / "rn", n, shard)
            record(f"ray x{n}", (wall, cpu))
            record(f"ray x{n} tasks", (0.0, shares))
            record("ray init", (connect, 0.0))
        for d in ("s1", "sn", "pn", "rn"):
            if (work / d).exists():
                assert _same(work / "one", work / d), f"{d} differs from the one-machine merge"
    report(times, cpus, total, n, args)


def _same(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / x).read_bytes() == (b / x).read_bytes() for x in names
    )


def report(
    times: dict[str, list[float]], cpus: dict[str, list[float]], total: int, n: int, args: argparse.Namespace
) -> None:
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu = {k: statistics.median(v) for k, v in cpus.items()}
    load = os.getloadavg()[0]
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, load {load:.1f}; output {total / 1e9:.2f} GB, {n} shares"
    )
    print(f"{'run':<16}{'wall s':>8}{'cpu s':>8}{'cpu s/GB':>10}{'wall vs one':>12}")
    for k in med:
        per_gb = cpu[k] / (total / 1e9) if k in ("one", "share 1/1", f"local x{n}", f"ray x{n}") else None
        shown = f"{per_gb:.2f}" if per_gb is not None else ""
        print(f"{k:<16}{med[k]:>8.2f}{cpu[k]:>8.2f}{shown:>10}{med[k] / med['one']:>11.2f}x")
    share_cpu = sum(cpu[f"share {i}/{n}"] for i in range(n))
    print(f"per-worker throughput (CPU-bound): {total / share_cpu / 1e9:.3f} GB of output per CPU second")
    if f"ray x{n}" in med:
        print(
            f"ray x{n} / local x{n}: wall {med[f'ray x{n}'] / med[f'local x{n}']:.2f}, "
            f"cpu {cpu[f'ray x{n}'] / cpu[f'local x{n}']:.2f}"
        )
    print(json.dumps({"median_wall_s": med, "median_cpu_s": cpu, "output_bytes": total, "load": load}))


if __name__ == "__main__":
    main()
