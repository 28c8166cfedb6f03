"""Regenerate loraformat/io/module_templates.json: the module-name templates of the diffusion architectures
whose kohya underscored names loraformat resolves without a base (spec/interop/kohya.md §Resolving names).

Run with diffusers and transformers installed: ``python3 tools/gen_module_templates.py``. Models are built on the
meta device (no weights); numeric path segments become ``N``.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "loraformat" / "io" / "module_templates.json"


def templates(model: object) -> set[str]:
    out = set()
    for name, module in model.named_modules():  # type: ignore[attr-defined]
        if name and any(True for _ in module.parameters(recurse=False)):
            out.add(".".join("N" if s.isdigit() else s for s in name.split(".")))
    return out


def main() -> None:
    import diffusers
    import transformers
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    sdxl = dict(
        cross_attention_dim=2048,
        transformer_layers_per_block=[1, 2, 10],
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True,
        attention_head_dim=(5, 10, 20),
    )
    families: dict[str, set[str]] = {"unet": set(), "transformer": set(), "text_encoder": set()}
    with init_empty_weights():
        families["unet"] |= templates(UNet2DConditionModel())  # SD 1.x / 2.x layout
        families["unet"] |= templates(UNet2DConditionModel(**sdxl))
        families["transformer"] |= templates(SD3Transformer2DModel(num_layers=2))
        families["transformer"] |= templates(FluxTransformer2DModel(num_layers=1, num_single_layers=1))
        families["text_encoder"] |= templates(CLIPTextModel(CLIPTextConfig()))
        families["text_encoder"] |= templates(CLIPTextModelWithProjection(CLIPTextConfig()))
        families["text_encoder"] |= templates(T5EncoderModel(T5Config(num_layers=1)))
    doc = {
        "generated_with": {"diffusers": diffusers.__version__, "transformers": transformers.__version__},
        "families": {k: sorted(v) for k, v in families.items()},
    }
    OUT.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", "utf-8")
    print(f"wrote {OUT}: " + ", ".join(f"{k} {len(v)}" for k, v in families.items()))


if __name__ == "__main__":
    main()
