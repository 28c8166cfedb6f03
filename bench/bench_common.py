"""Inputs shared by the benchmark scripts (run them as ``python bench/<name>.py``)."""

from __future__ import annotations

import json
from pathlib import Path


def build_tinyllama_adapter(
    folder: Path, rank: int = 16, layers: int = 22, hidden: int = 2048, inter: int = 5632, kv: int = 256
) -> Path:
    """A TinyLlama-shaped PEFT adapter on q,k,v,o,gate,up,down written with safetensors directly from random bf16
    tensors (no model needed), then converted to loraformat (rank 16: ~25 MB; rank 64: ~100 MB)."""
    import torch
    from safetensors.torch import save_file

    from loraformat.conversion import convert

    shapes = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    tensors = {}
    for layer in range(layers):
        for name, (out, inp) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inp, dtype=torch.bfloat16) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, dtype=torch.bfloat16) * 0.01
    peft_dir = folder / "peft"
    peft_dir.mkdir()
    save_file(tensors, str(peft_dir / "adapter_model.safetensors"), {"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "task_type": "CAUSAL_LM",
        "target_modules": sorted({n.split(".")[-1] for n in shapes}),
        "base_model_name_or_path": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    }
    (peft_dir / "adapter_config.json").write_text(json.dumps(config))
    out = folder / "adapter.safetensors"
    convert(peft_dir, out)
    return out
