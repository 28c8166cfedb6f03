"""Benchmark ``loraformat extract`` against mergekit-extract-lora and a full-SVD reference, same inputs, one run.

Builds (once, cached under bench/out/extract-<size>/) the random-weight bf16 Llama-shaped base of
merge_bench.py (sharded, 1 GB shards) and a "tuned" copy, written as ONE file (so shards and layout differ),
in which every q,k,v,o,gate,up,down weight moved by a delta with a known decaying spectrum,
sigma_i = s0 * rho**i for i < 64, rounded to bf16 (the rounding adds a full-rank noise floor, as in real
fine-tunes). Embeddings and norms are unchanged.

Each method runs in its own process; wall time and that process's peak RSS (os.wait4) are recorded:

  loraformat   `loraformat extract BASE TUNED --rank R` with a cold hash cache (both models hashed: the
               output's stamp and the fine-tune's identity), and again with the hashes cached
  mergekit     `mergekit-extract-lora --model TUNED --base-model BASE --max-rank R` (its own venv: run
               `bash bench/setup_mergekit.sh`, or pass --mergekit-python); full fp32 SVD per module
  full-SVD     this script: per module the singular values of the exact fp32 delta (torch.linalg.svdvals),
               i.e. the Eckart-Young optimum of the rank-R relative Frobenius error, ||S[R:]|| / ||S||

Then every module's actual error ||D - B A||_F / ||D||_F is measured here, from each output file's factors,
against the optimum.

    python bench/extract_bench.py                       # TinyLlama shape (2.2 GB bf16), rank 16
    python bench/extract_bench.py --layers 2            # TinyLlama widths, 2 layers (14 modules)
    python bench/extract_bench.py --size tiny           # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_bench  # noqa: E402
from merge_bench import TARGETS, build_base, shapes  # noqa: E402

HERE = Path(__file__).resolve().parent
LF = "from loraformat.cli.main import main; main()"
SPECTRUM_RANK, RHO = 64, 0.9
DEFAULT_MERGEKIT = (
    Path(os.environ.get("LORAFORMAT_CI_CACHE", Path.home() / ".cache/loraformat-ci")) / "mergekit"
)


def weight_map(model: Path) -> dict[str, str]:
    """tensor name -> file name (an unsharded model has no index)."""
    index = model / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), "pt") as f:
        return {name: "model.safetensors" for name in f.keys()}


def is_target(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in TARGETS


def build_tuned(size: str, base: Path, path: Path) -> Path:
    """base + U diag(s0 * rho**i) V^T on every target, rounded to bf16, in one model.safetensors; built once."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    if (path / "config.json").exists():
        return path
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = weight_map(base)
    g = torch.Generator().manual_seed(1)
    state = {}
    for name, _shape in shapes(size):
        with safe_open(str(base / index[name]), "pt") as f:
            w = f.get_tensor(name)
        if is_target(name):
            m, n = w.shape
            U = torch.linalg.qr(torch.randn(m, SPECTRUM_RANK, generator=g))[0]
            V = torch.linalg.qr(torch.randn(n, SPECTRUM_RANK, generator=g))[0]
            s = torch.tensor([RHO**i for i in range(SPECTRUM_RANK)])
            delta = (U * s) @ V.T
            delta *= 0.05 * float(w.float().norm()) / float(delta.norm())  # ||D|| = 5% of ||W||
            w = (w.float() + delta).to(torch.bfloat16)
        state[name] = w
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(base / "config.json", tmp / "config.json")
    os.replace(tmp, path)
    return path


def with_architecture(model: Path) -> Path:
    """mergekit needs config.json's ``architectures`` (merge_bench.py's base does without)."""
    config = json.loads((model / "config.json").read_text())
    if not config.get("architectures"):
        config["architectures"] = ["LlamaForCausalLM"]
        (model / "config.json").write_text(json.dumps(config, indent=2))
    return model


def run_one(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes) of exactly this child, and its stdout (to a file: no pipe to fill)."""
    with open(log, "wb") as out, open(log.with_suffix(".err"), "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed:\n{log.with_suffix('.err').read_text()[-3000:]}")
    return seconds, usage.ru_maxrss * 1024, log.read_text()


def reference(size: str, base: Path, tuned: Path, rank: int) -> tuple[dict[str, dict[str, float]], float]:
    """Per target: ||D||^2 and the rank-R Eckart-Young optimum from the full fp32 spectrum; and the seconds."""
    import torch
    from safetensors import safe_open

    index = weight_map(base)
    out, t0 = {}, time.perf_counter()
    for name, _ in shapes(size):
        if not is_target(name):
            continue
        with (
            safe_open(str(base / index[name]), "pt") as fb,
            safe_open(str(tuned / "model.safetensors"), "pt") as ft,
        ):
            d = ft.get_tensor(name).float() - fb.get_tensor(name).float()
        S2 = torch.linalg.svdvals(d).double().square()
        out[name] = {"total": float(S2.sum()), "optimum": float((S2[rank:].sum() / S2.sum()).sqrt())}
    return out, time.perf_counter() - t0


def factors_of(path: Path) -> dict[str, tuple[object, object, float]]:
    """base tensor name -> (A, B, scale) from a loraformat file or a PEFT directory."""
    sys.path.insert(0, str(HERE.parent))
    from loraformat.adapter import open_adapter

    with open_adapter(path) as a:
        return {e.base_tensor: (a.lora_A(m), a.lora_B(m), a.scale(m)) for m, e in a.modules.items()}


def errors(
    size: str, base: Path, tuned: Path, adapter: Path, ref: dict[str, dict[str, float]]
) -> dict[str, float]:
    """Per target: ||D - s B A||_F / ||D||_F of the adapter's stored factors, divided by the optimum."""
    from safetensors import safe_open

    index = weight_map(base)
    fac = factors_of(adapter)
    ratios = {}
    for name, r in ref.items():
        with (
            safe_open(str(base / index[name]), "pt") as fb,
            safe_open(str(tuned / "model.safetensors"), "pt") as ft,
        ):
            d = ft.get_tensor(name).float() - fb.get_tensor(name).float()
        A, B, s = fac[name]
        d.addmm_(B.float(), A.float(), alpha=-s)  # type: ignore[union-attr]
        err = float(d.double().square().sum().sqrt()) / r["total"] ** 0.5
        ratios[name] = err / r["optimum"]
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "tinyllama"], default="tinyllama")
    ap.add_argument(
        "--layers",
        type=int,
        help="keep the size's widths but only this many layers (mergekit's full SVD of all 154 TinyLlama "
        "modules takes hours on a loaded 2-core machine)",
    )
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--mergekit-python", type=Path, default=DEFAULT_MERGEKIT / "bin/python")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.layers:
        hidden, inter, _, vocab, heads, kv, shard = merge_bench.SIZES[args.size]
        args.size = f"{args.size}-{args.layers}l"
        merge_bench.SIZES[args.size] = (hidden, inter, args.layers, vocab, heads, kv, shard)

    root = HERE / "out" / f"extract-{args.size}"
    if args.build_only:
        with_architecture(
            build_tuned(args.size, with_architecture(build_base(args.size, root / "base")), root / "tuned")
        )
        return
    if not (
        root / "tuned" / "config.json"
    ).exists():  # build in a child: a forked child's peak RSS starts at ours
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--build-only"], check=True)
    base, tuned = root / "base", root / "tuned"
    work = Path(tempfile.mkdtemp(prefix="extract-bench-", dir=root))
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "LORAFORMAT_CACHE": str(work / "cache")}
    results: dict[str, dict[str, float]] = {}
    try:
        for label in ("loraformat-cold", "loraformat-cached"):
            out = work / f"{label}.safetensors"
            cmd = [sys.executable, "-c", LF, "extract", str(base), str(tuned), "-o", str(out)]
            secs, rss, text = run_one([*cmd, "--rank", str(args.rank), "--json"], env, work / f"{label}.log")
            results[label] = {"seconds": secs, "peak_rss_gib": rss / 2**30, "file": str(out)}  # type: ignore[dict-item]
            print(f"{label:18s} {secs:8.1f} s  peak RSS {rss / 2**30:5.2f} GiB", flush=True)
            report = json.loads(text)
        if not args.skip_mergekit:
            mk = args.mergekit_python.parent / "mergekit-extract-lora"
            out_dir = work / "mergekit"
            cmd = [str(mk), "--model", str(tuned), "--base-model", str(base), "--out-path", str(out_dir)]
            secs, rss, _ = run_one([*cmd, "--max-rank", str(args.rank)], env, work / "mergekit.log")
            results["mergekit"] = {"seconds": secs, "peak_rss_gib": rss / 2**30, "file": str(out_dir)}  # type: ignore[dict-item]
            print(f"{'mergekit':18s} {secs:8.1f} s  peak RSS {rss / 2**30:5.2f} GiB", flush=True)
        ref, ref_secs = reference(args.size, base, tuned, args.rank)
        results["full-svd-reference"] = {"seconds": ref_secs}
        print(f"{'full-SVD (svdvals)':18s} {ref_secs:8.1f} s  (in this process)", flush=True)
        summary(args, results, ref, report, base, tuned)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def summary(args, results, ref, report, base: Path, tuned: Path) -> None:  # type: ignore[no-untyped-def]
    ours = errors(args.size, base, tuned, Path(results["loraformat-cold"]["file"]), ref)
    line = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "size": args.size,
        "rank": args.rank,
        "modules": len(ref),
        "loraformat_seconds_cold": round(results["loraformat-cold"]["seconds"], 2),
        "loraformat_seconds_cached": round(results["loraformat-cached"]["seconds"], 2),
        "loraformat_peak_rss_gib": round(results["loraformat-cold"]["peak_rss_gib"], 3),
        "full_svd_reference_seconds": round(results["full-svd-reference"]["seconds"], 1),
        "error_over_optimum_max": round(max(ours.values()), 5),
        "error_over_optimum_mean": round(sum(ours.values()) / len(ours), 5),
        "optimum_relative_error_mean": round(sum(r["optimum"] for r in ref.values()) / len(ref), 4),
        "reported_max_relative_error": round(report["max_relative_error"], 4),
    }
    if "mergekit" in results:
        theirs = errors(args.size, base, tuned, Path(results["mergekit"]["file"]), ref)
        line["mergekit_seconds"] = round(results["mergekit"]["seconds"], 1)
        line["mergekit_peak_rss_gib"] = round(results["mergekit"]["peak_rss_gib"], 3)
        line["speedup_vs_mergekit_cold"] = round(
            results["mergekit"]["seconds"] / results["loraformat-cold"]["seconds"], 1
        )
        line["speedup_vs_mergekit_cached"] = round(
            results["mergekit"]["seconds"] / results["loraformat-cached"]["seconds"], 1
        )
        line["mergekit_error_over_optimum_max"] = round(max(theirs.values()), 5)
    print(json.dumps(line, indent=2))


if __name__ == "__main__":
    main()
