"""Time ``loraformat validate`` (its default level, data, and the --level header fast path) and ``loraformat
inspect`` as whole processes (what a user and a pre-commit hook pay), median of N runs, on a converted adapter.
Targets: < 0.3 s for the header-only commands, < 0.5 s for the data level.

    python bench/header_bench.py [--runs 15] [--adapter PATH] [--write-docs]

Without --adapter it builds a Llama-shaped PEFT adapter (r16 on q,k,v,o,gate,up,down over 22 layers: 154
modules, 308 tensors, like a TinyLlama adapter) from random tensors and converts it with loraformat. With
--write-docs the figures replace the "### validate and inspect" part of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import build_tinyllama_adapter

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
SUBHEADING = "### validate and inspect"


def time_command(args: list[str], runs: int) -> tuple[float, float]:
    """(median, min) wall seconds of the whole process."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        done = subprocess.run(args, capture_output=True)
        times.append(time.perf_counter() - t0)
        if done.returncode != 0:
            sys.exit(f"{' '.join(args)} failed: {done.stderr.decode()[:500]}")
    return statistics.median(times), min(times)


def entry_point() -> list[str]:
    """The installed console script itself (not a pyenv shim), else ``python -m``-style fallback."""
    script = Path(sys.executable).parent / "loraformat"
    if script.exists():
        return [str(script)]
    found = shutil.which("loraformat")
    return [found] if found else [sys.executable, "-c", "from loraformat.cli.main import main; main()"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--write-docs", action="store_true")
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        adapter = opts.adapter or build_tinyllama_adapter(Path(tmp))
        size = os.path.getsize(adapter)
        cli = entry_point()
        baseline = time_command([sys.executable, "-c", "pass"], opts.runs)
        results = {
            "validate (default level: data)": time_command([*cli, "validate", str(adapter)], opts.runs),
            "validate --level header": time_command(
                [*cli, "validate", "--level", "header", str(adapter)], opts.runs
            ),
            "inspect": time_command([*cli, "inspect", str(adapter)], opts.runs),
            "inspect --json": time_command([*cli, "inspect", "--json", str(adapter)], opts.runs),
        }
        from loraformat.io.header import read_header

        tensors = len(read_header(adapter).tensors)
    load = os.getloadavg()[0]
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, load average {load:.1f}"
    if load > (os.cpu_count() or 1):
        machine += ": shared with other jobs, so every figure is inflated (compare with `python -c pass`)"
    lines = [
        SUBHEADING,
        "",
        f"`python bench/header_bench.py --runs {opts.runs}` ({time.strftime('%Y-%m-%d')}; {machine}). Whole "
        f"processes through the `loraformat` console script, median (min) of {opts.runs} runs, on a converted "
        f"{tensors}-tensor adapter of {size / 2**20:.1f} MiB (r16 on every projection of a 22-layer "
        "TinyLlama-shaped model). Targets: < 0.3 s for the header-only commands, < 0.5 s for the data level.",
        "",
        "| command | median | min |",
        "|---|---|---|",
        *[f"| `loraformat {name}` | {med:.3f} s | {low:.3f} s |" for name, (med, low) in results.items()],
        f"| `python -c pass` (interpreter start, for reference) | {baseline[0]:.3f} s | {baseline[1]:.3f} s |",
        "",
        "No command imports torch: the data level tests the raw bits of every tensor with numpy (NaN/Inf: "
        "exponent all ones; zero deltas: no bit but the sign) and hashes the data section; the metadata "
        "document is checked by loraformat's built-in evaluator of the v1 schema (importing jsonschema alone "
        "costs ~0.1 s).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if opts.write_docs:
        write_docs(text)


def write_docs(block: str) -> None:
    """Replace our sub-section inside "## Header-only commands and hashing", leaving the rest untouched."""
    doc = DOCS.read_text("utf-8")
    head = "## Header-only commands and hashing"
    start = doc.index(head)
    body_start = doc.index("\n", start) + 1
    nxt = doc.find("\n## ", body_start)
    end = len(doc) if nxt < 0 else nxt + 1
    body = doc[body_start:end]
    if SUBHEADING in body:
        s = body.index(SUBHEADING)
        e = body.find("\n### ", s + 1)
        e = len(body) if e < 0 else e + 1
        body = body[:s] + block + body[e:]
    else:
        body = body.replace("(not yet measured)\n", "")
        body = body.rstrip("\n") + "\n\n" + block if body.strip() else body + block
    if not body.endswith("\n\n"):
        body = body.rstrip("\n") + "\n\n"
    DOCS.write_text(doc[:body_start] + body + doc[end:], "utf-8")


if __name__ == "__main__":
    main()
