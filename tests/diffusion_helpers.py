"""Real diffusion components for the kohya/diffusers tests: a tiny Stable Diffusion pipeline (UNet2DConditionModel,
CLIPTextModel, AutoencoderKL, CLIPTokenizer, DDIMScheduler) built from configs with random weights and saved
with save_pretrained, and LoRA adapters made by peft and saved by diffusers' own save_lora_weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.0.proj"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def tiny_unet(seed: int = 0, layers_per_block: int = 2) -> Any:
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=layers_per_block,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )


def tiny_sd3_transformer(num_layers: int = 1, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )


def tiny_text_encoder(seed: int = 1) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        pad_token_id=1,
        vocab_size=100,
        hidden_act="gelu",
        projection_dim=32,
    )
    return CLIPTextModel(config)


def tiny_tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {
        "<|startoftext|>": 0,
        "<|endoftext|>": 2,
        "!": 1,
        **{f"{c}</w>": 3 + i for i, c in enumerate("abcdef")},
    }
    (folder / "vocab.json").write_text(json.dumps(vocab), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", "utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)


def save_pipeline(root: Path) -> Path:
    """A loadable StableDiffusionPipeline directory with random tiny weights."""
    torch.manual_seed(2)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(4,),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=2,
    )
    pipe = diffusers.StableDiffusionPipeline(
        unet=tiny_unet(),
        vae=vae,
        text_encoder=tiny_text_encoder(),
        tokenizer=tiny_tokenizer(root / "_tok"),
        scheduler=diffusers.DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = root / "pipeline"
    pipe.save_pretrained(out)
    return out


def add_unet_lora(unet: Any, **overrides: Any) -> Any:
    from peft import LoraConfig

    config = dict(
        r=4,
        lora_alpha=6,
        target_modules=UNET_TARGETS,
        init_lora_weights=False,
        rank_pattern={"to_q": 2},
        alpha_pattern={"conv1": 3},
    )
    config.update(overrides)
    torch.manual_seed(3)
    unet.add_adapter(LoraConfig(**config))
    return unet


def add_te_lora(te: Any) -> Any:
    """peft's own injection (transformers' add_adapter needs a newer peft than the pinned one)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=TE_TARGETS, init_lora_weights=False)
    torch.manual_seed(4)
    inject_adapter_in_model(config, te)
    te.peft_config = {"default": config}
    return te


def save_sd_lora(folder: Path, unet: Any, te: Any | None = None) -> Path:
    """diffusers' own save path: StableDiffusionPipeline.save_lora_weights with lora_adapter_metadata."""
    from peft.utils import get_peft_model_state_dict

    kwargs: dict[str, Any] = {
        "unet_lora_layers": get_peft_model_state_dict(unet),
        "unet_lora_adapter_metadata": unet.peft_config["default"].to_dict(),
    }
    if te is not None:
        kwargs["text_encoder_lora_layers"] = get_peft_model_state_dict(te)
        kwargs["text_encoder_lora_adapter_metadata"] = te.peft_config["default"].to_dict()
    diffusers.StableDiffusionPipeline.save_lora_weights(str(folder), **kwargs)
    return folder / "pytorch_lora_weights.safetensors"


def unet_inputs(seed: int = 5) -> tuple[Any, Any, Any]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]), torch.randn(1, 3, 32, generator=g)


def unet_output(unet: Any) -> Any:
    sample, t, hidden = unet_inputs()
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=hidden).sample


def load_into_unet(path: Path, unet: Any) -> Any:
    """diffusers' own reading rule for a LoRA file of any layout it knows (kohya keys converted by it), the
    unet half of StableDiffusionPipeline.load_lora_weights (lora_adapter_metadata included)."""
    pipe = diffusers.StableDiffusionPipeline
    state, alphas, metadata = pipe.lora_state_dict(
        str(path), unet_config=unet.config, return_lora_metadata=True
    )
    pipe.load_lora_into_unet(state, alphas, unet, adapter_name="x", metadata=metadata)
    return unet


def module_deltas(adapter: Any) -> dict[str, Any]:
    """scale * B @ A per module (flattened), in float64, from an opened loraformat Adapter."""
    out = {}
    for name in adapter.modules:
        a = adapter.lora_A(name).double().flatten(1)
        b = adapter.lora_B(name).double().flatten(1)
        out[name] = adapter.scale(name) * (b @ a)
    return out
