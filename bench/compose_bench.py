"""SVD recompression of composed adapters: loraformat's QR-core SVD against the full-SVD recipe.

Four rank-64 adapters (random factors, weights 1, 0.5, -0.7, 0.3, LoRA scale 2) on Llama-3-8B-shaped modules are
summed and recompressed to rank 64. Two ways:

- QR-core (ours, loraformat.ops): QR of the stacked B (out x 256) and of the stacked A^T (in x 256), SVD of
  the 256 x 256 core, lift back. Never forms the out x in delta.
- Full SVD (the recipe PEFT's ``*_svd`` combinations and kohya's svd_merge_lora use): form each dense
  out x in delta, sum them, ``torch.linalg.svd``, keep the top 64 triplets.

Both are compared with the exact sum (formed in fp64 from the factors) by relative Frobenius error, next to the
optimal (Eckart-Young) error of a rank-64 approximation. Wall and CPU (user + sys of this process) times are
recorded; on a shared machine wall times are noisy: ours is the median (and min) of --repeat runs, the full SVD
runs once (it takes seconds to minutes).

    python bench/compose_bench.py                      # all three shapes (slow: full SVDs of 14336 x 4096)
    python bench/compose_bench.py --modules 4096x4096  # one shape
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from loraformat.ops.combine import flat, stack
from loraformat.ops.lowrank import qr_core_svd
from loraformat.ops.term import Term

SHAPES = {"4096x4096": (4096, 4096), "14336x4096": (14336, 4096), "4096x14336": (4096, 14336)}
WEIGHTS = (1.0, 0.5, -0.7, 0.3)
LORA_SCALE = 2.0


def make_terms(out: int, inp: int, rank: int, seed: int) -> list[Term]:
    g = torch.Generator().manual_seed(seed)
    return [
        flat(
            torch.randn(rank, inp, generator=g) / inp**0.5,
            torch.randn(out, rank, generator=g) / rank**0.5,
            w * LORA_SCALE,
        )
        for w in WEIGHTS
    ]


def qr_core(terms: list[Term], rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    A, B = stack([flat(t.A.to(dtype), t.B.to(dtype), t.scale) for t in terms])
    return qr_core_svd(A, B).factors(rank)


def full_svd(terms: list[Term], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT / kohya: dense delta per adapter, summed, full SVD, truncate (B = U S, A = Vh)."""
    delta = sum(t.scale * (t.B @ t.A) for t in terms)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return Vh[:rank], U[:, :rank] * S[:rank]


def rel_error(A: torch.Tensor, B: torch.Tensor, exact: torch.Tensor) -> float:
    return float((B.double() @ A.double() - exact).norm() / exact.norm())


def bench_shape(name: str, rank: int, repeat: int, seed: int, full: bool = True) -> dict:
    out, inp = SHAPES[name]
    terms = make_terms(out, inp, rank, seed)
    exact = sum(t.scale * (t.B.double() @ t.A.double()) for t in terms)
    A64, B64 = stack([flat(t.A.double(), t.B.double(), t.scale) for t in terms])
    S = qr_core_svd(A64, B64).S
    optimal = float(S[rank:].square().sum().sqrt() / S.square().sum().sqrt())
    row: dict = {
        "module": name,
        "parents": len(terms),
        "parent_rank": rank,
        "target_rank": rank,
        "optimal_rel_error": optimal,
    }
    for label, dtype in (("qr_core_fp32", torch.float32), ("qr_core_fp64", torch.float64)):
        times, cpu = [], []
        for _ in range(repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            A, B = qr_core(terms, rank, dtype)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        row[f"{label}_s"] = statistics.median(times)
        row[f"{label}_cpu_s"] = statistics.median(cpu)
        row[f"{label}_min_s"] = min(times)
        row[f"{label}_rel_error"] = rel_error(A, B, exact)
    if full:
        t0, c0 = time.perf_counter(), time.process_time()
        A, B = full_svd(terms, rank)
        row["full_svd_fp32_s"] = time.perf_counter() - t0
        row["full_svd_fp32_cpu_s"] = time.process_time() - c0
        row["full_svd_fp32_rel_error"] = rel_error(A, B, exact)
        row["speedup_fp32"] = row["full_svd_fp32_s"] / row["qr_core_fp32_s"]
        row["speedup_fp64"] = row["full_svd_fp32_s"] / row["qr_core_fp64_s"]
    row["load_average_1min"] = os.getloadavg()[0]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--modules", default=",".join(SHAPES), help=f"comma-separated subset of {list(SHAPES)}"
    )
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument(
        "--repeat", type=int, default=7, help="runs of the QR-core path (median and min reported)"
    )
    parser.add_argument("--no-full-svd", action="store_true", help="time only the QR-core path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    args = parser.parse_args()
    names = [m.strip() for m in args.modules.split(",") if m.strip()]
    unknown = [m for m in names if m not in SHAPES]
    if unknown:
        parser.error(f"unknown module shape(s) {unknown}; choose from {list(SHAPES)}")
    machine = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "processor": platform.processor() or platform.machine(),
    }
    rows = []
    for name in names:
        rows.append(bench_shape(name, args.rank, args.repeat, args.seed, full=not args.no_full_svd))
        if not args.json:
            r = rows[-1]
            opt = r["optimal_rel_error"]
            line = (
                f"{name:>11}: optimal rel. error {opt:.6f}; [excess over optimal]; load {r['load_average_1min']:.1f}\n"
                f"{'':>13}QR-core fp32 {r['qr_core_fp32_s'] * 1e3:7.1f} ms (min {r['qr_core_fp32_min_s'] * 1e3:.1f})"
                f" [{r['qr_core_fp32_rel_error'] - opt:+.1e}] | QR-core fp64 {r['qr_core_fp64_s'] * 1e3:7.1f} ms"
                f" (min {r['qr_core_fp64_min_s'] * 1e3:.1f}) [{r['qr_core_fp64_rel_error'] - opt:+.1e}]"
            )
            if "full_svd_fp32_s" in r:
                line += (
                    f" | full SVD fp32 {r['full_svd_fp32_s']:.2f} s [{r['full_svd_fp32_rel_error'] - opt:+.1e}]"
                    f" | speedup {r['speedup_fp32']:.0f}x wall (fp32 median), "
                    f"{r['full_svd_fp32_cpu_s'] / r['qr_core_fp32_cpu_s']:.0f}x CPU time"
                )
            print(line, flush=True)
    if args.json:
        print(json.dumps({"machine": machine, "results": rows}, indent=2))
    else:
        print(f"machine: {machine}")


if __name__ == "__main__":
    main()
