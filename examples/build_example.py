"""Build the bundled example: a small Llama-architecture base with random weights (saved with transformers'
save_pretrained), the same base in FP8 with block scales (the DeepSeek-V3 / Qwen3-FP8 layout, quantized
with torch's float8 cast), and two real PEFT LoRA adapters trained-looking (random, non-zero B) made by peft
itself.

Nothing is downloaded: the point is to exercise the whole loraformat pipeline on real file layouts.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=1024,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out / "base", max_shard_size="2MB")
    for name, seed, targets, rank in (
        ("peft-summarise", 1, ["q_proj", "v_proj", "o_proj"], 8),
        ("peft-translate", 2, ["q_proj", "k_proj", "v_proj", "up_proj"], 16),
    ):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(out / "base")
        lora = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=targets,
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        get_peft_model(base, lora).save_pretrained(out / name)
    fp8_copy(out / "base", out / "base-fp8")
    print(
        f"built {out}/base (4 layers, bf16, sharded), {out}/base-fp8 (block-scaled FP8) and two PEFT adapters"
    )


def fp8_copy(src: Path, dst: Path, block: int = 16) -> None:
    """The projections as F8_E4M3 with one F32 ``weight_scale_inv`` per block x block tile (absmax / 448),
    everything else as it is; config.json says so (``quant_method: fp8``, ``weight_block_size``). Real checkpoints
    use 128x128 tiles; this toy model's MLP is 688 wide, and transformers' CPU dequantization wants whole tiles."""
    import torch
    from safetensors.torch import load_file, save_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(src.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    out: dict[str, torch.Tensor] = {}
    for name, w in state.items():
        if not name.endswith("proj.weight"):
            out[name] = w
            continue
        x = w.float()
        rows, cols = x.shape
        padded = torch.nn.functional.pad(x, (0, -cols % block, 0, -rows % block))
        tiles = padded.abs().reshape(padded.shape[0] // block, block, -1, block).amax(dim=(1, 3))
        scale = tiles / 448.0
        expanded = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
        out[name] = (x / expanded).clamp(-448, 448).to(torch.float8_e4m3fn)
        out[name[: -len("weight")] + "weight_scale_inv"] = scale.contiguous()
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [block, block],
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/out"))
