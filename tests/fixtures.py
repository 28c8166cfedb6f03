"""Builders for real test inputs: small random-weight transformers bases saved with save_pretrained, and real
PEFT adapters made by peft itself (init_lora_weights=False so that B is non-zero). Nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: name -> (base kind, LoraConfig kwargs). Every variant the format and the merge must get right.
PEFT_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "plain": ("llama", dict(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)),
    "rslora": ("llama", dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"])),
    "patterns": (
        "llama",
        dict(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 2},
            alpha_pattern={"v_proj": 5, "layers.0.self_attn.q_proj": 3},
        ),
    ),
    "dora": ("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"])),
    "layers": (
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            layers_to_transform=[1],
            layers_pattern="layers",
        ),
    ),
    "embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "modules_to_save": (
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    ),
    "lora_bias": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], lora_bias=True)),
    "gpt2": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "gpt2_bias_all": (
        "gpt2",
        dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, bias="all"),
    ),
    # lora_bias on layers that have a bias, so that PEFT itself can merge it (Llama's projections have none)
    "gpt2_lora_bias": (
        "gpt2",
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, lora_bias=True),
    ),
}


def make_llama_base(
    path: Path,
    *,
    dtype: str = "bfloat16",
    layers: int = 2,
    hidden: int = 64,
    intermediate: int = 160,
    vocab: int = 256,
    max_shard_size: str | None = None,
    seed: int = 0,
) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def make_gpt2_base(path: Path, *, dtype: str = "float32", seed: int = 0) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(cfg).to(getattr(torch, dtype))
    # a non-zero bias everywhere, so bias="all" and lora_bias have something to change
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    model.save_pretrained(path)
    return path


def load_base(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def make_peft_adapter(
    base: Path, out: Path, *, seed: int = 1, safe_serialization: bool = True, **lora_kwargs: Any
) -> Path:
    """A real PEFT adapter for ``base``; every LoRA weight random (B non-zero), trained-looking.
    ``safe_serialization=False`` writes the legacy pickle ``adapter_model.bin``."""
    model = load_base(base)
    return peft_adapter_for_model(model, out, seed=seed, safe_serialization=safe_serialization, **lora_kwargs)


def peft_adapter_for_model(
    model: Any, out: Path, *, seed: int = 1, safe_serialization: bool = True, **lora_kwargs: Any
) -> Path:
    """make_peft_adapter for a model already in memory (e.g. a :class:`ConvNet`)."""
    import torch
    from peft import LoraConfig, get_peft_model

    kwargs = dict(init_lora_weights=False, lora_dropout=0.0)
    kwargs.update(lora_kwargs)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(**kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                p.normal_(0, 0.05)
            if "modules_to_save" in name or (
                name.endswith(".bias") and "lora" not in name and p.requires_grad
            ):
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(out, safe_serialization=safe_serialization)
    return out


def conv_net_class() -> type:
    """A tiny model with Conv1d/Conv2d (3x3 and 1x1) and Linear layers: PEFT's conv LoRA paths."""
    import torch
    from torch import nn

    class ConvNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.pw = nn.Conv2d(8, 8, 1)
            self.seq = nn.Conv1d(8, 6, 3)
            self.head = nn.Linear(6, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.pw(self.conv(x)).mean(dim=-1)
            return self.head(self.seq(x).mean(dim=-1))

    return ConvNet


def make_conv_base(path: Path, *, seed: int = 0) -> Path:
    """A ConvNet's weights as ``path/model.safetensors`` (load them with :func:`load_conv_base`)."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = conv_net_class()()
    path.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return path


def load_conv_base(path: Path) -> Any:
    from safetensors.torch import load_file

    model = conv_net_class()()
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model
