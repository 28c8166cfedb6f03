"""Underscored kohya paths: the module templates cover the real diffusers/transformers models, resolution is
exact, and every name that is ambiguous or unknown is refused rather than guessed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraformat.errors import AdapterError
from loraformat.io.names import NameIndex, split_component, template_index, templates_version
from tests.diffusion_helpers import tiny_sd3_transformer, tiny_text_encoder, tiny_unet, torch


def _parametrised(model: object) -> list[str]:
    return [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("family", "model"),
    [
        ("unet", lambda: tiny_unet()),
        ("text_encoder", lambda: tiny_text_encoder()),
        ("transformer", lambda: tiny_sd3_transformer(num_layers=2)),
    ],
)
def test_templates_place_every_module_of_real_models(family: str, model: object) -> None:
    """Every module with parameters of a real model resolves from its underscored name to itself alone."""
    index = template_index(family)
    assert index is not None
    for name in _parametrised(model()):  # type: ignore[operator]
        assert index.candidates(name.replace(".", "_")) == [name], name


def test_templates_record_the_versions_they_were_generated_with() -> None:
    assert set(templates_version()) == {"diffusers", "transformers"}
    doc = json.loads(
        (Path(__file__).resolve().parent.parent / "loraformat/io/module_templates.json").read_text()
    )
    assert all(doc["families"][f] for f in ("unet", "transformer", "text_encoder"))


def test_base_index_is_exact_and_refuses_ambiguity() -> None:
    index = NameIndex(["blocks.a_b.c", "blocks.a.b_c", "down_blocks.0.attn"])
    assert index.candidates("down_blocks_0_attn") == ["down_blocks.0.attn"]
    assert index.candidates("blocks_a_b_c") == ["blocks.a.b_c", "blocks.a_b.c"]
    assert index.candidates("up_blocks_0_attn") == []


def test_ambiguous_kohya_name_is_refused_through_open(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from loraformat.adapter import open_adapter

    base = tmp_path / "unet"
    base.mkdir()
    save_file(
        {"blocks.a_b.c.weight": torch.ones(4, 4), "blocks.a.b_c.weight": torch.ones(4, 4)},
        base / "m.safetensors",
    )
    adapter = tmp_path / "k.safetensors"
    save_file(
        {
            "lora_unet_blocks_a_b_c.lora_down.weight": torch.ones(2, 4),
            "lora_unet_blocks_a_b_c.lora_up.weight": torch.ones(4, 2),
        },
        adapter,
    )
    with pytest.raises(AdapterError, match=r"ambiguous, it can be any of blocks\.a\.b_c, blocks\.a_b\.c"):
        open_adapter(adapter, base=base)


def test_numbers_fill_only_numeric_segments() -> None:
    index = template_index("unet")
    assert index is not None
    assert index.candidates("time_embedding_linear_1") == ["time_embedding.linear_1"]
    assert index.candidates("time_embedding_linear_7") == []  # linear_1 is a name, not a number slot
    assert index.candidates("input_blocks_4_1_proj_in") == []  # sgm naming: refused, not guessed


def test_split_component() -> None:
    assert split_component("unet.down_blocks.0") == ("unet", "down_blocks.0")
    assert split_component("model.layers.0") == (None, "model.layers.0")
    assert split_component("unet") == (None, "unet")
