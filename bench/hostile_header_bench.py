"""Cost of ``loraformat validate`` on the worst headers a hostile file can bring (spec/v1.md §16): near the
100 MB header cap, at and just past every count limit. Each case runs as a whole process; the figures are its
wall time and peak RSS (the limit loraformat promises: under 2 s and 512 MiB for any header it accepts, and a
quick refusal for any it does not).

    python bench/hostile_header_bench.py [--only NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loraformat import spec  # noqa: E402
from loraformat.constants import METADATA_KEY  # noqa: E402


def _write(path: Path, header: bytes, data: bytes = b"") -> Path:
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def empty_tensors(n: int) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        parts = [f'"t{i:07d}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(n)]
        return _write(path, ("{" + ",".join(parts) + "}").encode())

    return build


def metadata_keys(n: int, value_bytes: int) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        value = "v" * value_bytes
        meta = {f"k{i}": value for i in range(n)}
        return _write(path, json.dumps({"__metadata__": meta}).encode())

    return build


def one_big_string(size: int) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        return _write(path, json.dumps({"__metadata__": {"x": "v" * size}}).encode())

    return build


def many_numbers(n: int) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        pad = ",".join(["7"] * n)
        return _write(path, f'{{"__metadata__":{{}},"pad":[{pad}]}}'.encode())

    return build


def document_modules(n: int, junk: int = 0) -> Callable[[Path], Path]:
    """A loraformat document with n modules (rank 1, 1x1) and their 2n tensors: the largest accepted adapter;
    ``junk`` numbers in an unknown field (kept, as a newer minor version's field would be)."""

    def build(path: Path) -> Path:
        from loraformat.metadata import AdapterMetadata, ModuleEntry

        modules, tensors, pos = {}, {}, 0
        for i in range(n):
            m = f"model.layers.{i}.proj"
            modules[m] = ModuleEntry("linear", 1, 1, 1, 1, f"{m}.weight")
            for part in ("lora_A", "lora_B"):
                tensors[f"base_model.model.{m}.{part}.weight"] = {
                    "dtype": "F32",
                    "shape": [1, 1],
                    "data_offsets": [pos, pos + 4],
                }
                pos += 4
        doc = AdapterMetadata(
            modules=modules, name="big", created_by={"tool": "bench", "version": "1"}
        ).to_dict()
        doc["junk"] = [7] * junk
        meta = {"format": "pt", METADATA_KEY: json.dumps(doc)}
        return _write(path, json.dumps({"__metadata__": meta, **tensors}).encode(), b"\0" * pos)

    return build


CASES: dict[str, Callable[[Path], Path]] = {
    "tensors at cap (empty)": empty_tensors(spec.MAX_TENSORS),
    "tensors past cap": empty_tensors(spec.MAX_TENSORS + 1),
    "metadata keys at cap, 100 MB": metadata_keys(spec.MAX_METADATA_KEYS, 9_900),
    "one 99 MB metadata string": one_big_string(99_000_000),
    "values cap, numbers in one list": many_numbers(spec.MAX_JSON_ITEMS),
    "past the values cap": many_numbers(spec.MAX_JSON_ITEMS + 2),
    "document at the module cap": document_modules(spec.MAX_MODULES),
    "document past the module cap": document_modules(spec.MAX_MODULES + 1),
    "document with values cap junk": document_modules(1, spec.MAX_JSON_ITEMS - 40),
}


def measure(path: Path) -> tuple[float, float, float, int, str]:
    """(wall s, CPU s, peak RSS MiB, exit code, last stdout/stderr line) of one validate process."""
    args = [sys.executable, "-c", "from loraformat.cli.main import main; main()", "validate", str(path)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ)
    out = proc.stdout.read().decode() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    line = (out.strip().splitlines() or [""])[0].split(": error: ")[-1][:70]
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status), line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only")
    ap.add_argument("--build", nargs=2, metavar=("CASE", "PATH"), help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.build:  # in a child process, so that the measured processes do not inherit its memory at fork
        CASES[opts.build[0]](Path(opts.build[1]))
        return
    print(f"{'case':32} {'header MB':>9} {'wall s':>7} {'CPU s':>6} {'peak MiB':>8} exit  first finding")
    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            if opts.only and opts.only not in name:
                continue
            path = Path(tmp) / "x.safetensors"
            subprocess.run([sys.executable, __file__, "--build", name, str(path)], check=True)
            size = path.stat().st_size / 1e6
            wall, cpu, rss, code, message = measure(path)
            print(f"{name:32} {size:9.1f} {wall:7.2f} {cpu:6.2f} {rss:8.0f} {code:4}  {message}")
            path.unlink()


if __name__ == "__main__":
    main()
