"""Quantized-base merges on a TinyLlama-shaped model (22 layers, hidden 2048, intermediate 5632, vocab 32000).

FP8: a block-scaled base (F8_E4M3 projections with 128x128 ``weight_scale_inv``, bf16 embeddings, norms and
lm_head: 1.0 GB of FP8 + 0.26 GB of bf16), an r16 adapter on q_proj and v_proj (PEFT's default targets for Llama);
compared, each in its own process with a warm page cache:
  copy        copying the base's files, left dirty in the page cache
  copy+fsync  the copy floor: the same, then fsynced, as loraformat's output is before it is renamed (and
              bench/merge_bench.py's floor and the script below)
  loraformat  loraformat merge (decode, add, re-quantize with fresh scales, streaming): the C passes, and the
              numpy passes a build without a C compiler runs (LORAFORMAT_NATIVE=0)
  script      what users do today: dequantize everything to bf16, PEFT merge_and_unload, re-quantize, save
NF4: the same model as a bf16 base (2.2 GB) and an adapter recording a bitsandbytes NF4 (double-quant) training
base: the QLoRA-faithful merge (--dequantize-as nf4) against the plain merge (--dequantize-as none).

Prints medians of ``--repeat`` runs (and the fastest), ratios to the floors and peak RSS; ``--json`` also writes them. The machine's load average is
printed: on a shared machine the figures move with the other jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from merge_bench import build_base, drop_or_warm, llama_config, run_one, shapes  # noqa: E402

RANK, ALPHA = 16, 32
TARGETS = ["q_proj", "v_proj"]
LF = "from loraformat.cli.main import main; main()"
DURABLE_COPY = """
import os, shutil, sys
shutil.copytree(sys.argv[1], sys.argv[2])
for f in os.listdir(sys.argv[2]):
    fd = os.open(os.path.join(sys.argv[2], f), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
"""

SCRIPT = r"""
import json, os, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM
from peft import PeftModel
base, adapter, out = map(Path, sys.argv[1:4])
sd = load_file(str(base / "model.safetensors"))
def expand(s, shape):
    return s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
dense = {}
for k, v in sd.items():
    if k.endswith("_scale_inv"):
        continue
    if v.dtype == torch.float8_e4m3fn:
        s = sd[k[: -len("weight")] + "weight_scale_inv"]
        v = (v.float() * expand(s, v.shape)).to(torch.bfloat16)
    dense[k] = v
del sd
config = LlamaConfig.from_pretrained(base)
config.quantization_config = None
with torch.device("meta"):
    model = LlamaForCausalLM(config)
model.load_state_dict(dense, assign=True, strict=False)
del dense
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
result = {}
for k, v in model.state_dict().items():
    if v.ndim == 2 and k.endswith("proj.weight"):
        x = v.float()
        r, c = x.shape
        pad = torch.nn.functional.pad(x, (0, -c % 128, 0, -r % 128))
        amax = pad.abs().reshape(pad.shape[0] // 128, 128, -1, 128).amax(dim=(1, 3))
        scale = (amax / 448.0).clamp(min=1e-12)
        result[k] = (x / expand(scale, x.shape)).clamp(-448, 448).to(torch.float8_e4m3fn)
        result[k[: -len("weight")] + "weight_scale_inv"] = scale
    else:
        result[k] = v.contiguous()
out.mkdir()
save_file(result, str(out / "model.safetensors"), metadata={"format": "pt"})
for f in ("config.json",):
    (out / f).write_bytes((base / f).read_bytes())
for f in out.iterdir():  # durable, as loraformat's output and merge_bench's floor are
    fd = os.open(f, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
"""


def build_fp8_base(path: Path) -> Path:
    """Random F8_E4M3 projections with positive block scales, bf16 elsewhere; one model.safetensors."""
    import torch
    from safetensors.torch import save_file

    if (path / "config.json").exists():
        return path
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in shapes("tinyllama"):
        if len(shape) == 2 and name.endswith("proj.weight"):
            q = torch.randint(0, 120, shape, dtype=torch.uint8, generator=g)  # finite E4M3 bit patterns
            q |= torch.randint(0, 2, shape, dtype=torch.uint8, generator=g) << 7
            state[name] = q.view(torch.float8_e4m3fn)
            tiles = (-(-shape[0] // 128), -(-shape[1] // 128))
            state[name[: -len("weight")] + "weight_scale_inv"] = torch.rand(tiles, generator=g) * 1e-4 + 1e-5
        else:
            state[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    config = llama_config("tinyllama").to_dict()
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    os.replace(tmp, path)
    return path


def build_adapter(root: Path, base: Path, quantization: str | None) -> tuple[Path, Path]:
    """A PEFT r16 adapter on q_proj and v_proj, and the same converted (and stamped against ``base``)."""
    import torch
    from safetensors.torch import save_file

    from loraformat.conversion import convert

    name = "adapter-qlora" if quantization else "adapter"
    peft_dir, native = root / f"{name}-peft", root / f"{name}.safetensors"
    if not (peft_dir / "adapter_config.json").exists():
        g = torch.Generator().manual_seed(1)
        tensors = {}
        for tensor, shape in shapes("tinyllama"):
            module = tensor.removesuffix(".weight")
            if module.rsplit(".", 1)[-1] in TARGETS:
                out_f, in_f = shape
                key = "base_model.model." + module
                tensors[key + ".lora_A.weight"] = torch.randn(RANK, in_f, generator=g) / in_f**0.5
                tensors[key + ".lora_B.weight"] = torch.randn(out_f, RANK, generator=g) * 0.01
        peft_dir.mkdir(parents=True)
        save_file(tensors, peft_dir / "adapter_model.safetensors", metadata={"format": "pt"})
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": RANK,
            "lora_alpha": ALPHA,
            "target_modules": TARGETS,
            "bias": "none",
            "base_model_name_or_path": str(base),
        }
        (peft_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    if not native.exists():
        convert(peft_dir, native, base=base, base_quantization=quantization)
    return peft_dir, native


def alternating(
    runs: dict[str, list[str]], env: dict[str, str], out: Path, repeat: int
) -> list[dict[str, float]]:
    """Like :func:`timed` for several commands, run in turn ``repeat`` times: the page cache's writeback of one
    run's output then weighs on every command alike."""
    times: dict[str, list[float]] = {label: [] for label in runs}
    rss = dict.fromkeys(runs, 0)
    for _ in range(repeat):
        for label, cmd in runs.items():
            shutil.rmtree(out, ignore_errors=True)
            seconds, peak, _ = run_one(cmd, env)
            times[label].append(seconds)
            rss[label] = max(rss[label], peak)
    shutil.rmtree(out, ignore_errors=True)
    figures = []
    for label, t in times.items():
        med = statistics.median(t)
        print(f"  {label:<34} {med:8.2f} s (fastest {min(t):.2f})   peak RSS {rss[label] / 2**30:6.2f} GiB")
        figures.append({"seconds": med, "fastest": min(t), "peak_rss_bytes": rss[label]})
    return figures


def timed(label: str, cmd: list[str], env: dict[str, str], out: Path, repeat: int) -> dict[str, float]:
    """The median of ``repeat`` runs (and the fastest), and the largest peak RSS."""
    times, rss = [], 0
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        seconds, peak, _ = run_one(cmd, env)
        times.append(seconds)
        rss = max(rss, peak)
    shutil.rmtree(out, ignore_errors=True)
    med = statistics.median(times)
    print(
        f"  {label:<34} {med:8.2f} s (fastest {min(times):.2f})   peak RSS {rss / 2**30:6.2f} GiB", flush=True
    )
    return {"seconds": med, "fastest": min(times), "peak_rss_bytes": rss}


def fp8_figures(
    root: Path, env: dict[str, str], repeat: int, skip_script: bool
) -> dict[str, dict[str, float]]:
    py, figures = sys.executable, {}
    fp8 = root / "fp8-base"
    peft_dir, adapter = root / "adapter-peft", root / "adapter.safetensors"
    size = sum(f.stat().st_size for f in fp8.iterdir())
    print(f"FP8 block-scaled base: {size / 1e9:.2f} GB; adapter r{RANK} on {', '.join(TARGETS)}", flush=True)
    drop_or_warm(fp8, False)
    out = root / "merged"
    copy = [py, "-c", "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2])", str(fp8), str(out)]
    figures["fp8_copy"] = timed("copy floor", copy, env, out, repeat)
    durable = [py, "-c", DURABLE_COPY, str(fp8), str(out)]
    figures["fp8_copy_fsync"] = timed("copy + fsync floor", durable, env, out, repeat)
    lf = [py, "-c", LF, "--quiet", "merge", str(fp8), str(adapter), "-o", str(out)]
    figures["fp8_loraformat"] = timed("loraformat merge (re-quantize)", lf, env, out, repeat)
    numpy_env = {**env, "LORAFORMAT_NATIVE": "0"}  # as installed without a C compiler
    figures["fp8_loraformat_numpy"] = timed("loraformat merge, numpy passes", lf, numpy_env, out, repeat)
    if not skip_script:
        script = [py, "-c", SCRIPT, str(fp8), str(peft_dir), str(out)]
        figures["fp8_script"] = timed("dequantize / PEFT merge / requantize", script, env, out, 1)
    floor, durable_floor = figures["fp8_copy"]["seconds"], figures["fp8_copy_fsync"]["seconds"]
    for k in ("fp8_loraformat", "fp8_loraformat_numpy", "fp8_script"):
        if k in figures:
            s = figures[k]["seconds"]
            print(
                f"  {k[4:]:<34} {s / floor:8.2f} x the copy floor, {s / durable_floor:.2f} x copy + fsync",
                flush=True,
            )
    return figures


def nf4_figures(root: Path, env: dict[str, str], repeat: int) -> dict[str, dict[str, float]]:
    py, figures, out = sys.executable, {}, root / "merged"
    bf16, qlora = root / "bf16-base", root / "adapter-qlora.safetensors"
    drop_or_warm(bf16, False)
    print("bf16 base 2.2 GB; adapter recording an NF4 double-quant training base", flush=True)
    plain = [
        py,
        "-c",
        LF,
        "--quiet",
        "merge",
        str(bf16),
        str(qlora),
        "-o",
        str(out),
        "--dequantize-as",
        "none",
    ]
    faithful = plain[:-1] + ["nf4"]
    runs = {"plain merge (W + delta)": plain, "QLoRA-faithful (dequant(quant(W)))": faithful}
    figures["nf4_plain"], figures["nf4_faithful"] = alternating(runs, env, out, repeat)
    ratio = figures["nf4_faithful"]["seconds"] / figures["nf4_plain"]["seconds"]
    print(f"  {'faithful / plain':<34} {ratio:8.2f} x", flush=True)
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--skip-script", action="store_true", help="skip the dequantize/PEFT/re-quantize script")
    ap.add_argument("--skip-nf4", action="store_true")
    ap.add_argument("--skip-fp8", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = args.out / "quant-tinyllama"
    root.mkdir(parents=True, exist_ok=True)
    if args.build_only:  # in its own process, so that no measured child inherits its peak RSS
        fp8 = build_fp8_base(root / "fp8-base")
        build_adapter(root, fp8, None)
        if not args.skip_nf4:
            bf16 = build_base("tinyllama", root / "bf16-base")
            build_adapter(root, bf16, "bnb-nf4,block_size=64,double_quant=true")
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    py = sys.executable
    figures: dict[str, dict[str, float]] = {}
    build = [py, __file__, "--build-only", "--out", str(args.out)] + (["--skip-nf4"] if args.skip_nf4 else [])
    run_one(build, env)
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    if not args.skip_fp8:
        figures.update(fp8_figures(root, env, args.repeat, args.skip_script))
    if not args.skip_nf4:
        figures.update(nf4_figures(root, env, args.repeat))
    print(f"load average after: {os.getloadavg()[0]:.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
