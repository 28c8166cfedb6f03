"""Benchmark split merges: per-worker throughput of a share, the cost of --assemble, and Ray against local
processes doing the same shares.

Uses merge_bench.py's cached inputs (a random bf16 Llama-shaped base and a stamped r16 adapter, so every share
verifies its targets' digests) and re-shards the output with --max-shard-size so there are shards to split.
Every figure is the median of --repeat runs, each with a warm page cache, each until the output is durable.

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

from merge_bench import LF, build_adapters, build_base, drop_or_warm, run_one  # noqa: E402


def cli(*args: object) -> list[str]:
    return [sys.executable, "-c", LF, "-q", *map(str, args)]


def timed_parallel(cmds: list[list[str]], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env) for c in cmds]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"a share failed: {err.decode()[-2000:]}")
    return time.perf_counter() - t0


def ray_merge(base: Path, adapter: Path, out: Path, workers: int, shard: str) -> tuple[float, float, float]:
    """(wall seconds of distributed.merge, of which assemble, connect seconds) on a local Ray instance."""
    import ray

    from loraformat import distributed

    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    connect = time.perf_counter() - t0
    try:
        r = distributed.merge(base, [adapter], out, workers=workers, max_shard_size=shard)
    finally:
        ray.shutdown()
    return r.seconds, r.assemble_seconds, connect


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

    def record(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)

    total = 0
    for _ in range(args.repeat):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        drop_or_warm(base, False)
        record("one", run_one(cli("merge", *common, "-o", work / "one"), env)[0])
        total = sum(f.stat().st_size for f in (work / "one").iterdir())
        record("share 1/1", run_one(cli("merge", *common, "-o", work / "s1", "--shard", "0/1"), env)[0])
        record("assemble 1", run_one(cli("merge", *common, "-o", work / "s1", "--assemble", 1), env)[0])
        for i in range(n):
            record(
                f"share {i}/{n}",
                run_one(cli("merge", *common, "-o", work / "sn", "--shard", f"{i}/{n}"), env)[0],
            )
        record(f"assemble {n}", run_one(cli("merge", *common, "-o", work / "sn", "--assemble", n), env)[0])
        drop_or_warm(base, False)
        shares = [cli("merge", *common, "-o", work / "pn", "--shard", f"{i}/{n}") for i in range(n)]
        wall = timed_parallel(shares, env)
        wall += run_one(cli("merge", *common, "-o", work / "pn", "--assemble", n), env)[0]
        record(f"local x{n}", wall)
        if not args.skip_ray:
            drop_or_warm(base, False)
            seconds, assemble_s, connect = ray_merge(base, adapter, work / "rn", n, shard)
            record(f"ray x{n}", seconds)
            record("ray connect", connect)
        for d in ("s1", "sn", "pn", "rn"):
            if (work / d).exists():
                assert _same(work / "one", work / d), f"{d} differs from the one-machine merge"
    report(times, total, n, args)


def _same(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / x).read_bytes() == (b / x).read_bytes() for x in names
    )


def report(times: dict[str, list[float]], total: int, n: int, args: argparse.Namespace) -> None:
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores; output {total / 1e9:.2f} GB"
    )
    print(f"{'run':<14}{'median s':>10}{'GB/s':>8}{'vs one':>9}")
    for k, v in med.items():
        gbs = f"{total / v / 1e9:.2f}" if k in ("one", "share 1/1", f"local x{n}", f"ray x{n}") else ""
        print(f"{k:<14}{v:>10.2f}{gbs:>8}{v / med['one']:>8.2f}x")
    per_share = [med[f"share {i}/{n}"] for i in range(n)]
    print(
        f"per-worker throughput: {total / n / statistics.mean(per_share) / 1e9:.2f} GB/s of output per share"
    )
    if f"ray x{n}" in med:
        print(f"ray x{n} / local x{n}: {med[f'ray x{n}'] / med[f'local x{n}']:.2f}")
    print(json.dumps({"median_s": med, "output_bytes": total, "workers": n, "size": args.size}))


if __name__ == "__main__":
    main()
