"""The QLoRA trade-off, measured on the bundled example (examples/build_example.py: a 4-layer Llama, hidden 256, and
its two real PEFT adapters): which merged 16-bit model behaves like the adapter as it was trained, i.e. applied
by PEFT on the NF4 (double-quantized, bf16 compute) model that bitsandbytes and transformers make of the base?

  faithful  loraformat merge --dequantize-as nf4: dequant(quant(W)) + delta
  plain     loraformat merge --dequantize-as none: W + delta

Prints, per adapter, the largest and the mean absolute logit difference of each merge to that reference (over
4 prompts of 32 tokens), and the adapter's own effect on the 4-bit model for scale.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# bitsandbytes loads a hub CPU kernel for 4-bit matmuls only in offline mode (it then skips the publisher check);
# with the hub "online" (nothing is fetched: every input is local) it keeps its own CPU path
os.environ["HF_HUB_OFFLINE"] = "0"


def main() -> None:
    import torch
    from build_example import main as build_example
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loraformat.conversion import convert
    from loraformat.merging.api import merge

    root = ROOT / "bench" / "out" / "qlora-example"
    if not (root / "base" / "config.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        build_example(root)
    prompts = torch.randint(0, 1024, (4, 32), generator=torch.Generator().manual_seed(0))
    nf4 = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )

    def logits(model: object) -> torch.Tensor:
        for module in model.modules():  # type: ignore[attr-defined]
            # bitsandbytes' AVX-512 CPU repacking needs output rows divisible by 32 (the example has 688):
            # keep its generic CPU path, which computes the same dequantize-then-matmul
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        with torch.no_grad():
            return model(prompts).logits.float()  # type: ignore[operator]

    def load(path: Path, **kw: object) -> object:
        return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.bfloat16, **kw)

    for name in ("peft-summarise", "peft-translate"):
        adapter = root / name
        four_bit = logits(load(root / "base", quantization_config=nf4))
        reference = logits(PeftModel.from_pretrained(load(root / "base", quantization_config=nf4), adapter))
        native = root / f"{name}-qlora.safetensors"
        if not native.exists():
            convert(adapter, native, base_quantization="bnb-nf4,block_size=64,double_quant=true")
        gaps = {}
        for choice in ("nf4", "none"):
            out = root / f"merged-{name}-{choice}"
            if not out.exists():
                merge(root / "base", [native], out, dequantize_as=choice)
            diff = (logits(load(out)) - reference).abs()
            gaps[choice] = (diff.max().item(), diff.mean().item())
        effect = (reference - four_bit).abs()
        print(
            f"{name}: adapter effect on the 4-bit model max {effect.max().item():.4f} mean {effect.mean().item():.4f}; "
            f"gap to it: faithful (nf4) max {gaps['nf4'][0]:.4f} mean {gaps['nf4'][1]:.4f}, "
            f"plain (none) max {gaps['none'][0]:.4f} mean {gaps['none'][1]:.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
