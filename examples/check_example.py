"""The example's last step: transformers loads the merged models as they are: the merge's logits equal PEFT's,
the FP8 merge's are within FP8's error of them, and the QLoRA-faithful merge's are close to them too."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(out: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", torch_dtype=torch.float32)
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(out / "base", torch_dtype=torch.float32), out / "pulled"
    ).merge_and_unload()
    with torch.no_grad():
        a, b = merged(tokens).logits, peft(tokens).logits
    diff = (a - b).abs().max().item()
    print(f"merged model vs PEFT (pulled adapter): max |logit diff| = {diff:.2e}")
    if diff > 5e-2:
        sys.exit("logits differ more than bf16 rounding allows")
    for name, limit in (("merged-fp8", 0.25), ("merged-qlora", 0.25)):
        # transformers dequantizes FP8 on CPU in bf16
        other = AutoModelForCausalLM.from_pretrained(out / name, device_map="cpu", dtype=torch.bfloat16)
        with torch.no_grad():
            c = other(tokens).logits.float()
        gap = (c - a).abs().max().item()
        print(
            f"{name} vs the bf16 merge: max |logit diff| = {gap:.2e} (quantization error; logits span {a.abs().max():.2f})"
        )
        if not torch.isfinite(c).all() or gap > limit:
            sys.exit(f"{name}: logits are not within quantization error of the bf16 merge")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/out"))
