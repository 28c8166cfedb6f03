"""Benchmark ``loraformat merge`` against the copy floor, a naive load/merge/save loop and PEFT.

Builds (once, cached under bench/out/merge-<size>/) a random-weight bf16 Llama-shaped base written with
safetensors directly, sharded like save_pretrained (index + config.json, so transformers and PEFT load it), and
a PEFT r16 adapter on q,k,v,o,gate,up,down (tensors + adapter_config.json), plus the same adapter converted to
loraformat and stamped with the base's digests (so that the merge verifies every target while streaming).

Each method runs in its own process; wall time and that process's peak RSS (os.wait4) are recorded. Every
method ends with its output fsynced (loraformat does it itself; the others get an fsync at the end of their
script), so all times are "until the merged model is durable on disk". The base is read once before each
method (warm page cache) unless --drop-cache (root; drops the page cache before each method instead).

  copy       copy the base's files (shutil.copyfile, i.e. copy_file_range/sendfile) + fsync: the floor
  naive      per shard: safetensors load_file, W += s * B @ A in fp32, save_file
  peft       from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained
  lf-peft    `loraformat merge BASE <PEFT dir>` (no digests recorded: nothing to verify)
  lf-verify  `loraformat merge BASE <stamped .safetensors>` (every target hashed and checked while read)

    python bench/merge_bench.py                              # TinyLlama shape, 2.2 GB, CPU
    python bench/merge_bench.py --size tiny --repeat 1       # a quick smoke run
    python bench/merge_bench.py --size llama8b-layers --device cuda --drop-cache
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {  # hidden, intermediate, layers, vocab, heads, kv heads, shard size
    "tiny": (256, 688, 4, 4000, 8, 2, "8MB"),
    "tinyllama": (2048, 5632, 22, 32000, 32, 4, "1GB"),
    "llama8b-layers": (4096, 14336, 16, 128256, 32, 8, "5GB"),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32

COPY = r"""
import os, shutil, sys
base, out = sys.argv[1], sys.argv[2]
os.mkdir(out)
for name in sorted(os.listdir(base)):
    shutil.copyfile(os.path.join(base, name), os.path.join(out, name))
for name in os.listdir(out):
    fd = os.open(os.path.join(out, name), os.O_RDONLY); os.fsync(fd); os.close(fd)
"""

NAIVE = r"""
import json, os, shutil, sys
import torch
from safetensors.torch import load_file, save_file
base, adapter, out = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
lora = load_file(os.path.join(adapter, "adapter_model.safetensors"))
s = cfg["lora_alpha"] / cfg["r"]
os.mkdir(out)
for name in os.listdir(base):
    if not name.endswith(".safetensors"):
        shutil.copyfile(os.path.join(base, name), os.path.join(out, name))
for name in sorted(n for n in os.listdir(base) if n.endswith(".safetensors")):
    state = load_file(os.path.join(base, name))
    for key in list(state):
        prefix = "base_model.model." + key[: -len(".weight")]
        if prefix + ".lora_A.weight" in lora:
            w = state[key].float()
            w += s * (lora[prefix + ".lora_B.weight"].float() @ lora[prefix + ".lora_A.weight"].float())
            state[key] = w.to(state[key].dtype)
    save_file(state, os.path.join(out, name), metadata={"format": "pt"})
    del state
for name in os.listdir(out):
    fd = os.open(os.path.join(out, name), os.O_RDONLY); os.fsync(fd); os.close(fd)
"""

PEFT = r"""
import os, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out, shard = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size=shard)
for name in os.listdir(out):
    fd = os.open(os.path.join(out, name), os.O_RDONLY); os.fsync(fd); os.close(fd)
"""

LF = "from loraformat.cli.main import main; main()"


def shapes(size: str) -> list[tuple[str, tuple[int, ...]]]:
    hidden, inter, layers, vocab, heads, kv, _ = SIZES[size]
    kv_dim = hidden // heads * kv
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    return out + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def llama_config(size: str) -> Any:
    """transformers' LlamaConfig of a bench size (bf16, untied embeddings)."""
    from transformers import LlamaConfig

    hidden, inter, layers, vocab, heads, kv, _ = SIZES[size]
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        vocab_size=vocab,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )


def build_base(size: str, path: Path) -> Path:
    """Random bf16 tensors in shards with an index, as save_pretrained lays them out; built once."""
    import torch
    from huggingface_hub.serialization import split_state_dict_into_shards_factory
    from safetensors.torch import save_file

    if (path / "config.json").exists():
        return path
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hidden, inter, layers, vocab, heads, kv, shard = SIZES[size]
    layout = dict(shapes(size))
    split = split_state_dict_into_shards_factory(
        layout,
        get_storage_size=lambda s: 2 * _numel(s),
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=shard,
    )
    g = torch.Generator().manual_seed(0)
    for fname, names in split.filename_to_tensors.items():
        state = {n: (torch.randn(layout[n], generator=g) * 0.02).to(torch.bfloat16) for n in names}
        save_file(state, tmp / fname, metadata={"format": "pt"})
        del state
    if split.is_sharded:
        index = {
            "metadata": {"total_size": sum(2 * _numel(s) for s in layout.values())},
            "weight_map": split.tensor_to_filename,
        }
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    llama_config(size).save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def build_adapters(size: str, base: Path, root: Path) -> tuple[Path, Path]:
    """A PEFT r16 adapter (q,k,v,o,gate,up,down) and the same converted to loraformat, stamped with the base."""
    import torch
    from safetensors.torch import save_file

    peft_dir, native = root / "adapter-peft", root / "adapter.safetensors"
    if not (peft_dir / "adapter_config.json").exists():
        g = torch.Generator().manual_seed(1)
        tensors = {}
        for name, shape in shapes(size):
            module = name.removesuffix(".weight")
            if module.rsplit(".", 1)[-1] in TARGETS:
                out_f, in_f = shape
                key = "base_model.model." + module
                tensors[key + ".lora_A.weight"] = torch.randn(RANK, in_f, generator=g) / in_f**0.5
                tensors[key + ".lora_B.weight"] = torch.randn(out_f, RANK, generator=g) * 0.01
        tmp = root / "adapter-peft.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": RANK,
            "lora_alpha": ALPHA,
            "target_modules": TARGETS,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "base_model_name_or_path": str(base),
            "inference_mode": True,
            "init_lora_weights": True,
        }
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        os.replace(tmp, peft_dir)
    if not native.exists():
        from loraformat.conversion import convert

        convert(peft_dir, native, base=base)
    return peft_dir, native


def drop_or_warm(base: Path, drop: bool) -> None:
    if drop:
        subprocess.run(["sync"], check=False)
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        except OSError as exc:
            raise SystemExit(
                f"--drop-cache needs root and a writable /proc/sys/vm/drop_caches ({exc})"
            ) from None
        return
    for f in sorted(base.iterdir()):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def run_one(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes) of exactly this child, and its stderr tail."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = proc.stdout.read().decode() if proc.stdout else ""
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])}... failed ({proc.returncode}):\n{err[-3000:]}")
    return seconds, usage.ru_maxrss * 1024, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tinyllama")
    ap.add_argument("--device", default="cpu", help="device for loraformat merge (auto, cpu, cuda)")
    ap.add_argument(
        "--skip-peft", action="store_true", help="skip PEFT (slow, needs RAM for the whole model)"
    )
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--drop-cache", action="store_true", help="drop the page cache before each method (root)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    ap.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    root = args.out / f"merge-{args.size}"
    root.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "LORAFORMAT_CACHE": str(args.out / "cache"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONWARNINGS": "ignore",
    }
    os.environ["LORAFORMAT_CACHE"] = env["LORAFORMAT_CACHE"]
    base, peft_dir, native = root / "base", root / "adapter-peft", root / "adapter.safetensors"
    if args.build:
        build_adapters(args.size, build_base(args.size, base), root)
        return
    if not native.exists():
        # in a child: this process must stay small, because a child's ru_maxrss starts from its parent's RSS
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, __file__, "--build", "--size", args.size, "--out", str(args.out)],
            check=True,
            env=env,
        )
        print(f"inputs ready in {time.perf_counter() - t0:.1f} s: {base}", file=sys.stderr)
    shard = SIZES[args.size][6]
    out = root / "merged"
    lf = [sys.executable, "-c", LF, "-q", "merge", str(base)]
    methods = {
        "copy": [sys.executable, "-c", COPY, str(base), str(out)],
        "naive": [sys.executable, "-c", NAIVE, str(base), str(peft_dir), str(out)],
        "peft": [sys.executable, "-c", PEFT, str(base), str(peft_dir), str(out), shard],
        "lf-peft": [*lf, str(peft_dir), "-o", str(out), "--device", args.device, "--json"],
        "lf-verify": [*lf, str(native), "-o", str(out), "--device", args.device, "--json"],
    }
    if args.skip_peft:
        del methods["peft"]
    if args.skip_naive:
        del methods["naive"]
    results: dict[str, list[tuple[float, int]]] = {m: [] for m in methods}
    details: dict[str, dict] = {}
    for rep in range(args.repeat):
        for name, cmd in methods.items():
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=False)
            drop_or_warm(base, args.drop_cache)
            seconds, rss, stdout = run_one(cmd, env)
            results[name].append((seconds, rss))
            if name.startswith("lf-") and stdout.strip().startswith("{"):
                details[name] = json.loads(stdout)
            print(
                f"[{rep + 1}/{args.repeat}] {name:9s} {seconds:7.2f} s  peak RSS {rss / 2**30:.2f} GiB",
                file=sys.stderr,
            )
    shutil.rmtree(out, ignore_errors=True)

    size_gb = sum(f.stat().st_size for f in base.iterdir()) / 1e9
    floor_med = statistics.median(s for s, _ in results["copy"])
    floor_best = min(s for s, _ in results["copy"])
    print(
        f"\n{args.size}: {size_gb:.2f} GB base, {len(list(base.glob('*.safetensors')))} shards; "
        f"{platform.machine()}, {os.cpu_count()} CPUs; device {args.device}; {args.repeat} runs; "
        f"{'cold' if args.drop_cache else 'warm'} page cache\n"
    )
    print("| method | best | median | best / copy best | median / copy median | peak RSS (max) |")
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        times = [s for s, _ in runs]
        best, med = min(times), statistics.median(times)
        rss = max(r for _, r in runs)
        print(
            f"| {name} | {best:.2f} s | {med:.2f} s | {best / floor_best:.2f}x | {med / floor_med:.2f}x | "
            f"{rss / 2**30:.2f} GiB |"
        )
    for name, d in details.items():
        print(
            f"\n{name}: {d.get('backend', '?')} backend; {d['tensors_merged']} tensors merged, "
            f"{d['tensors_copied']} copied; "
            f"{d['bytes_read'] / 1e9:.2f} GB read, {d['bytes_written'] / 1e9:.2f} GB written; in-process "
            f"{d['seconds']:.2f} s; verified {d['verified']['tensors']} tensors; peak GPU "
            f"{d['peak_gpu_bytes'] / 2**30:.2f} GiB"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"size": args.size, "device": args.device, "results": results, "details": details}, indent=2
            )
        )


if __name__ == "__main__":
    main()
