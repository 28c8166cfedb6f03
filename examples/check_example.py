"""The example's last step: transformers loads the merged model as it is, and its logits equal PEFT's."""

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


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/out"))
