"""Benchmark ``loraformat hash`` on a ~1.5 GB bf16 checkpoint in the page cache (issue 2: >= 1 GB/s).

Builds (once, reused under bench/out/) a Llama-shaped bf16 checkpoint of random tensors in four shards with
an index, warms the page cache, then times, several times each because other work shares this machine:
  - ``loraformat hash --no-cache --json`` as a whole process (Python start-up and imports included),
  - the library call ``hash_base(path, use_cache=False)``,
  - a cached second run as a whole process.
Prints GB/s (1 GB = 1e9 bytes) as best and median of the repeats.

    python bench/hash_bench.py [--repeat 5] [--out bench/out/hash-ckpt]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loraformat.io.header import encode_header  # noqa: E402

HIDDEN, INTER, VOCAB, LAYERS, SHARDS = 3072, 8192, 32000, 5, 4


def layout() -> list[tuple[str, tuple[int, ...]]]:
    tensors = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensors += [(p + f"self_attn.{n}_proj.weight", (HIDDEN, HIDDEN)) for n in "qkvo"]
        tensors += [
            (p + "mlp.gate_proj.weight", (INTER, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTER)),
        ]
        tensors += [
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
        ]
    tensors += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return tensors


def build(out: Path) -> Path:
    """Write the shards and index once; a complete earlier build is reused."""
    index_path = out / "model.safetensors.index.json"
    if index_path.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tensors = layout()
    total = sum(int(np.prod(s)) * 2 for _, s in tensors)
    per_shard = total / SHARDS
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        if size >= per_shard and len(groups) < SHARDS:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += int(np.prod(shape)) * 2
    rng = np.random.default_rng(0)
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header, _ = encode_header([(n, "BF16", s) for n, s in group], {"format": "pt"})
        with open(out / fname, "wb") as f:
            f.write(header)
            for name, shape in group:
                f.write(rng.bytes(int(np.prod(shape)) * 2))
                weight_map[name] = fname
    index_path.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return out


def warm(path: Path) -> int:
    total = 0
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                total += len(chunk)
    return total


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def cli(args: list[str], env: dict[str, str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    exe = shutil.which("loraformat") or sys.exit(
        "the loraformat console script is not on PATH (pip install -e .)"
    )
    proc = subprocess.run([exe, *args], capture_output=True, text=True, env=env, check=True)
    return time.perf_counter() - t0, json.loads(proc.stdout)


def summary(label: str, nbytes: int, seconds: list[float]) -> str:
    best, med = min(seconds), statistics.median(seconds)
    return (
        f"{label:<34} best {best:6.3f} s ({nbytes / best / 1e9:5.2f} GB/s)   "
        f"median {med:6.3f} s ({nbytes / med / 1e9:5.2f} GB/s)   n={len(seconds)}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "hash-ckpt")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    from loraformat.hashing import hash_base

    path = build(args.out)
    nbytes = warm(path)
    cache = tempfile.mkdtemp(prefix="lf-hash-bench-")
    env = {**os.environ, "LORAFORMAT_CACHE": cache}
    print(
        f"checkpoint {path}: {nbytes / 1e9:.2f} GB in {len(list(path.glob('*.safetensors')))} shards, "
        f"{os.cpu_count()} CPUs"
    )

    proc_s, lib_s, proc_cpu, lib_cpu = [], [], [], []
    for _ in range(args.repeat):
        warm(path)
        c0 = children_cpu()
        s, out = cli(["hash", str(path), "--no-cache", "--json"], env)
        proc_s.append(s)
        proc_cpu.append(children_cpu() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        res = hash_base(path, use_cache=False)
        lib_s.append(time.perf_counter() - t0)
        lib_cpu.append(time.process_time() - c0)
        assert res.content_hash == out["content_hash"]
    cli(["hash", str(path), "--json"], env)  # fills the cache
    cached_s = []
    for _ in range(args.repeat):
        s, out = cli(["hash", str(path), "--json"], env)
        assert out["cached"] is True
        cached_s.append(s)
    print(summary("loraformat hash --no-cache (process)", nbytes, proc_s))
    print(summary("hash_base(use_cache=False) (library)", nbytes, lib_s))
    print(
        f"{'loraformat hash, cached (process)':<34} best {min(cached_s):6.3f} s   "
        f"median {statistics.median(cached_s):6.3f} s"
    )
    # CPU time does not depend on what else runs on the machine: bytes per CPU-second times the cores is
    # the rate on an idle machine (hashing is CPU-bound once the files are in the page cache)
    for label, cpu in (("process", proc_cpu), ("library", lib_cpu)):
        med = statistics.median(cpu)
        print(
            f"CPU time ({label}): median {med:.3f} CPU-s = {nbytes / med / 1e9:.2f} GB per CPU-second "
            f"-> {nbytes / med * (os.cpu_count() or 1) / 1e9:.2f} GB/s on {os.cpu_count()} idle cores"
        )


if __name__ == "__main__":
    main()
