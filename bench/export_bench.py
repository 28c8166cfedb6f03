"""Engine exports and engine checks on a TinyLlama-shaped adapter, against the copy floor.

A 22-layer TinyLlama-shaped PEFT adapter (r16 on all seven projections, bf16, ~25 MB; bench_common) is
exported for each engine, and checked with ``validate --for``, each in its own process so that peak RSS
(ru_maxrss of the child) is the operation's own. The copy floor is copying the PEFT directory's files.
llama.cpp needs the base's architecture, heads and target shapes: a 22-layer base holding only the target
weights (zeros, bf16, 2 GB) would dominate, so the GGUF export runs against a 2-layer base and its 2-layer
adapter and is compared with copying that adapter.

    python bench/export_bench.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: the CLI in a child that reports its own peak RSS (KiB) on its last stderr line, whatever the exit code
CLI = (
    "import atexit, resource, sys; atexit.register(lambda: print(resource.getrusage(resource.RUSAGE_SELF)"
    ".ru_maxrss, file=sys.stderr)); from loraformat.cli.main import main; main(sys.argv[1:])"
)


def timed(args: list[str], runs: int, cleanup: Path | None = None) -> tuple[float, float, float, float]:
    """(median wall s, min wall s, median CPU s, peak RSS MiB) of ``loraformat ARGS`` run ``runs`` times; CPU
    is user + sys of the child, the honest figure on a shared machine."""
    walls, cpus, peak = [], [], 0.0
    for _ in range(runs):
        if cleanup is not None and cleanup.exists():
            shutil.rmtree(cleanup) if cleanup.is_dir() else cleanup.unlink()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        if done.returncode not in (0, 1):
            raise SystemExit(f"{args}: {done.stderr}")
        peak = max(peak, int(done.stderr.strip().splitlines()[-1]) / 1024)
    return statistics.median(walls), min(walls), statistics.median(cpus), peak


def copy_floor(src: Path, runs: int, tmp: Path) -> float:
    walls = []
    for i in range(runs):
        start = time.perf_counter()
        shutil.copytree(src, tmp / f"copy{i}")
        walls.append(time.perf_counter() - start)
    return statistics.median(walls)


def small_base(folder: Path) -> Path:
    """A 2-layer TinyLlama-shaped base: config.json + the target weights (zeros) the export checks."""
    import torch
    from safetensors.torch import save_file

    hidden, inter, kv = 2048, 5632, 256
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden)}
    shapes |= {"self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden)}
    shapes |= {
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    folder.mkdir()
    tensors = {
        f"model.layers.{i}.{n}.weight": torch.zeros(s, dtype=torch.bfloat16)
        for i in range(2)
        for n, s in shapes.items()
    }
    save_file(tensors, str(folder / "model.safetensors"), {"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "num_attention_heads": 32}
    (folder / "config.json").write_text(json.dumps(config | {"num_key_value_heads": 4}))
    return folder


def in_child(code: str) -> None:
    """Build inputs in a child, so that this process never imports torch: a child forked from a parent with
    torch loaded would report the parent's RSS as its own peak."""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="export-bench-") as name:
        tmp = Path(name)
        bench_dir = Path(__file__).resolve().parent
        in_child(
            f"import sys; sys.path.insert(0, {str(bench_dir)!r}); from pathlib import Path; "
            f"from bench_common import build_tinyllama_adapter; build_tinyllama_adapter(Path({str(tmp)!r}))"
        )
        native = tmp / "adapter.safetensors"
        peft, out = tmp / "peft", tmp / "out"
        size = sum(f.stat().st_size for f in peft.iterdir()) / 2**20
        floor = copy_floor(peft, args.runs, tmp)
        rows = [("copy the PEFT directory (floor)", floor, floor, floor, 0.0)]
        rows.append(
            (
                "convert (PEFT -> loraformat, for reference)",
                *timed(["convert", str(peft), "-o", str(out)], args.runs, out),
            )
        )
        for label, extra in (
            ("convert --for vllm", []),
            ("convert --for vllm --uniform", ["--uniform"]),
            ("convert --for vllm --max-rank 8", ["--max-rank", "8"]),
        ):
            rows.append(
                (
                    label,
                    *timed(["convert", str(native), "--for", "vllm", *extra, "-o", str(out)], args.runs, out),
                )
            )
        for engine in ("vllm", "llama.cpp"):
            rows.append(
                (f"validate --for {engine}", *timed(["validate", str(peft), "--for", engine], args.runs))
            )
        base = tmp / "base2"
        in_child(
            f"import sys; sys.path.insert(0, {str(bench_dir)!r}); from pathlib import Path; "
            f"from export_bench import small_base; small_base(Path({str(base)!r}))"
        )
        print(
            f"# {platform.machine()}, {platform.python_version()}; adapter {size:.1f} MiB, {args.runs} runs"
        )
        print("| operation | wall median | wall min | CPU median | peak RSS |")
        print("|---|---|---|---|---|")
        for label, med, low, cpu, rss in rows:
            print(f"| `{label}` | {med:.3f} s | {low:.3f} s | {cpu:.2f} s | {rss:.0f} MiB |")
        for line in gguf_section(tmp, base, args.runs):
            print(line)


def gguf_section(tmp: Path, base: Path, runs: int) -> list[str]:
    """The GGUF export of a 2-layer adapter (rsLoRA, so every lora_B is folded) against copying it."""
    folder = tmp / "two"
    folder.mkdir()
    bench_dir = Path(__file__).resolve().parent
    in_child(
        f"import sys; sys.path.insert(0, {str(bench_dir)!r}); from pathlib import Path; "
        f"from bench_common import build_tinyllama_adapter; build_tinyllama_adapter(Path({str(folder)!r}), layers=2)"
    )
    peft = folder / "peft"
    config = json.loads((peft / "adapter_config.json").read_text())
    (peft / "adapter_config.json").write_text(json.dumps(config | {"use_rslora": True}))
    floor = copy_floor(peft, runs, folder)
    out = tmp / "a.gguf"
    med, low, cpu, rss = timed(
        ["convert", str(peft), "--for", "llama.cpp", "--base", str(base), "-o", str(out)], runs, out
    )
    return [
        f"| `copy a 2-layer PEFT directory (floor)` | {floor:.3f} s | | | |",
        f"| `convert --for llama.cpp` (2 layers, rsLoRA: all folded, q/k permuted) | {med:.3f} s | {low:.3f} s "
        f"| {cpu:.2f} s | {rss:.0f} MiB |",
    ]


if __name__ == "__main__":
    main()
