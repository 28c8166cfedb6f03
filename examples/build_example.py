"""Build the bundled example: a small Llama-architecture base with random weights (saved with transformers'
save_pretrained) and two real PEFT LoRA adapters trained-looking (random, non-zero B) made by peft itself.

Nothing is downloaded: the point is to exercise the whole loraformat pipeline on real file layouts.
"""

from __future__ import annotations

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
    print(f"built {out}/base (4 layers, bf16, sharded) and two PEFT adapters")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/out"))
