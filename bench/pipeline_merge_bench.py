"""Merge a kohya LoRA into a diffusers pipeline: ``loraformat merge`` against the copy floor and diffusers' own
``load_lora_weights`` + ``fuse_lora`` + ``save_pretrained``.

Inputs (built once under bench/out/pipeline-<size>/): a StableDiffusionPipeline-shaped directory with random
fp16 weights — UNet2DConditionModel in SD 1.5's shape (859 M parameters, 1.72 GB) and a CLIP ViT-L text encoder
(123 M, 0.25 GB) — plus a VAE, tokenizer and scheduler; and a kohya-layout unet LoRA, rank 16, alpha 8, on
every attention projection, feed-forward and proj_in/proj_out (SD 1.5's usual kohya targets), written by
``loraformat convert --to kohya``. Each method runs as its own process (imports included) until its output is
written; peak RSS is that process's, from wait4; the base is read once before each run (warm page cache).

    python bench/pipeline_merge_bench.py --repeat 3 [--size tiny]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from merge_bench import run_one  # noqa: E402

LF = "from loraformat.cli.main import main; main()"
COPY = "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2])"
DIFFUSERS = """
import sys, torch, diffusers
pipe = diffusers.StableDiffusionPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float16)
P = diffusers.StableDiffusionPipeline
state, alphas = P.lora_state_dict(sys.argv[2], unet_config=pipe.unet.config)
P.load_lora_into_unet(state, alphas, pipe.unet)
pipe.unet.fuse_lora()
pipe.unet.unload_lora()
pipe.save_pretrained(sys.argv[3])
"""

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]


def build(root: Path, size: str) -> tuple[Path, Path]:
    """The pipeline directory and the kohya LoRA (in a child, so the parent stays small)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(ROOT))
    from loraformat.conversion import convert
    from tests.diffusion_helpers import tiny_tokenizer

    torch.manual_seed(0)
    if size == "sd15":
        unet = UNet2DConditionModel()  # SD 1.5's configuration is the default
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12))
    else:
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
        )
        te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2))
    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=8, latent_channels=4)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=te,
        tokenizer=tiny_tokenizer(root / "_tok"),
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(torch.float16)
    base = root / "pipeline"
    pipe.save_pretrained(base)
    unet.add_adapter(LoraConfig(r=16, lora_alpha=8, target_modules=UNET_TARGETS, init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(
        str(root / "lora"),
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    kohya = root / "kohya.safetensors"
    convert(root / "lora" / "pytorch_lora_weights.safetensors", kohya, to="kohya", base=base)
    return base, kohya


def warm(base: Path) -> None:
    for f in sorted(base.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["sd15", "tiny"], default="sd15")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = args.out / f"pipeline-{args.size}"
    if args.build:
        root.mkdir(parents=True, exist_ok=True)
        build(root, args.size)
        return
    base, kohya = root / "pipeline", root / "kohya.safetensors"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    if not kohya.exists():
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, __file__, "--build", "--size", args.size, "--out", str(args.out)],
            check=True,
            env=env,
        )
        print(f"inputs ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    out = root / "merged"
    methods = {
        "copy": [sys.executable, "-c", COPY, str(base), str(out)],
        "diffusers": [sys.executable, "-c", DIFFUSERS, str(base), str(kohya), str(out)],
        "loraformat": [
            sys.executable,
            "-c",
            LF,
            "-q",
            "merge",
            str(base),
            str(kohya),
            "-o",
            str(out),
            "--device",
            "cpu",
        ],
    }
    results: dict[str, list[tuple[float, int]]] = {m: [] for m in methods}
    for rep in range(args.repeat):
        for name, cmd in methods.items():
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=False)
            warm(base)
            seconds, rss, _ = run_one(cmd, env)
            results[name].append((seconds, rss))
            print(
                f"[{rep + 1}/{args.repeat}] {name:10s} {seconds:7.2f} s  peak RSS {rss / 2**30:.2f} GiB",
                file=sys.stderr,
            )
    shutil.rmtree(out, ignore_errors=True)
    size_gb = sum(f.stat().st_size for f in base.rglob("*") if f.is_file()) / 1e9
    floor_best = min(s for s, _ in results["copy"])
    floor_med = statistics.median(s for s, _ in results["copy"])
    print(
        f"\n{args.size}: {size_gb:.2f} GB pipeline; {platform.machine()}, {os.cpu_count()} CPUs; "
        f"{args.repeat} runs; warm page cache\n"
    )
    print("| method | best | median | best / copy best | median / copy median | peak RSS (max) |")
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        times = [s for s, _ in runs]
        best, med, rss = min(times), statistics.median(times), max(r for _, r in runs)
        print(
            f"| {name} | {best:.2f} s | {med:.2f} s | {best / floor_best:.2f}x | {med / floor_med:.2f}x | "
            f"{rss / 2**30:.2f} GiB |"
        )


if __name__ == "__main__":
    main()
