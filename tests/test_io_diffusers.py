"""diffusers LoRA files in and out, with diffusers itself as the oracle: adapters made by peft on a real
UNet2DConditionModel / CLIPTextModel and saved by StableDiffusionPipeline.save_lora_weights; our kohya and
diffusers exports loaded back through diffusers' own reading rule give the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraformat.adapter import open_adapter
from loraformat.constants import Format
from loraformat.conversion import convert
from loraformat.io.tensors import SafetensorsSource
from tests.diffusion_helpers import (
    add_te_lora,
    add_unet_lora,
    load_into_unet,
    module_deltas,
    save_pipeline,
    save_sd_lora,
    tiny_text_encoder,
    tiny_unet,
    torch,
    unet_output,
)


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("sd")
    unet = add_unet_lora(tiny_unet())
    te = add_te_lora(tiny_text_encoder())
    return {
        "root": root,
        "pipeline": save_pipeline(root),
        "lora": save_sd_lora(root / "lora", unet, te),
        "unet_lora_only": save_sd_lora(root / "lora_unet", unet),
        "reference": unet_output(unet),
        "unet": unet,
        "te": te,
    }


def test_reads_diffusers_file_with_peft_patterns(sd: dict) -> None:
    with open_adapter(sd["lora"]) as a:
        assert a.source_format == Format.DIFFUSERS
        q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
        conv = "unet.down_blocks.0.resnets.0.conv1"
        k = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
        te = "text_encoder.encoder.layers.0.self_attn.q_proj"
        assert (a.modules[q].rank, a.modules[q].alpha) == (2, 6)  # rank_pattern
        assert (a.modules[conv].rank, a.modules[conv].alpha, a.modules[conv].kind) == (
            4,
            3,
            "conv",
        )  # alpha_pattern
        assert (a.modules[k].rank, a.modules[k].alpha) == (4, 6)
        assert (a.modules[te].rank, a.modules[te].alpha) == (4, 8)
        peft_delta = sd["te"].encoder.layers[0].self_attn.q_proj.get_delta_weight("default")
        torch.testing.assert_close(module_deltas(a)[te], peft_delta.detach().double(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("to", ["kohya", "diffusers"])
def test_export_loads_in_diffusers_with_same_outputs(sd: dict, tmp_path: Path, to: str) -> None:
    out = tmp_path / f"{to}.safetensors"
    convert(sd["lora"], out, to=to, base=sd["pipeline"])
    got = unet_output(load_into_unet(out, tiny_unet()))
    assert torch.equal(got, sd["reference"])
    assert not torch.equal(unet_output(tiny_unet()), sd["reference"])  # the adapter does change the output


def test_round_trip_through_all_four_layouts_is_bit_exact(sd: dict, tmp_path: Path) -> None:
    chain = ["kohya", "loraformat", "peft", "diffusers", "kohya", "diffusers"]
    src, paths = sd["lora"], []
    for i, to in enumerate(chain):
        dst = tmp_path / (f"{i}-{to}" + ("" if to == "peft" else ".safetensors"))
        convert(src, dst, to=to, base=sd["pipeline"])
        paths.append(dst)
        src = dst
    with open_adapter(sd["lora"]) as first:
        want = {m: (e.rank, e.alpha) for m, e in first.modules.items()}
        tensors = {k: first.tensor(k) for k in first.source.infos}
    for p in paths:
        with open_adapter(p, base=sd["pipeline"]) as a:
            assert {m: (e.rank, e.alpha) for m, e in a.modules.items()} == want, p
            assert all(torch.equal(a.tensor(k), t) for k, t in tensors.items()), p
    with open_adapter(paths[1]) as native:
        assert native.meta.provenance.source_format == Format.KOHYA


def test_unprefixed_save_lora_adapter_file(sd: dict, tmp_path: Path) -> None:
    """UNet2DConditionModel.save_lora_adapter writes keys without a component; --component names it."""
    sd["unet"].save_lora_adapter(str(tmp_path / "single"))
    path = tmp_path / "single" / "pytorch_lora_weights.safetensors"
    with open_adapter(path) as a:
        assert all(not m.startswith("unet.") for m in a.modules)
    out = tmp_path / "k.safetensors"
    convert(path, out, to="kohya", component="unet")
    assert torch.equal(unet_output(load_into_unet(out, tiny_unet())), sd["reference"])


def test_older_lora_linear_layer_keys_and_alpha_scalars(sd: dict, tmp_path: Path) -> None:
    """diffusers' older key spellings: .lora_linear_layer.down/up.weight and .lora.down/up.weight with
    network alphas stored as <module>.alpha; no lora_adapter_metadata (alpha = rank where no scalar)."""
    from safetensors.torch import save_file

    with open_adapter(sd["unet_lora_only"]) as a:
        state = {}
        for i, m in enumerate(sorted(a.modules)[:6]):
            style = ".lora_linear_layer" if i % 2 else ".lora"
            state[f"{m}{style}.down.weight"] = a.lora_A(m).contiguous()
            state[f"{m}{style}.up.weight"] = a.lora_B(m).contiguous()
            if i < 3:
                state[f"{m}.alpha"] = torch.tensor(float(a.modules[m].alpha))
        modules = {m: a.modules[m] for m in sorted(a.modules)[:6]}
    path = tmp_path / "old.safetensors"
    save_file(state, path)
    with open_adapter(path) as b:
        assert b.source_format == Format.DIFFUSERS
        for i, (m, e) in enumerate(modules.items()):
            assert b.modules[m].rank == e.rank
            assert b.modules[m].alpha == (e.alpha if i < 3 else e.rank)


def test_diffusers_file_metadata_is_diffusers_own(sd: dict, tmp_path: Path) -> None:
    out = tmp_path / "d.safetensors"
    convert(sd["lora"], out, to="diffusers")
    raw = SafetensorsSource(out).header.metadata
    packed = json.loads(raw["lora_adapter_metadata"])
    assert packed["unet.r"] == 4 and packed["unet.lora_alpha"] == 6 and packed["text_encoder.lora_alpha"] == 8
    from peft import LoraConfig

    LoraConfig(**{k[len("unet.") :]: v for k, v in packed.items() if k.startswith("unet.")})


def test_rslora_adapter_keeps_its_scale_in_kohya(tmp_path: Path) -> None:
    """kohya knows only alpha / r: an rsLoRA module's kohya alpha is s * r, so the scale is kept."""
    unet = add_unet_lora(tiny_unet(), use_rslora=True, rank_pattern={}, alpha_pattern={})
    src = save_sd_lora(tmp_path / "rs", unet)
    out = tmp_path / "k.safetensors"
    convert(src, out, to="kohya")
    with open_adapter(src) as a, open_adapter(out) as b:
        assert a.meta.scaling == "alpha/sqrt(r)" and b.meta.scaling == "alpha/r"
        for m in a.modules:
            assert b.scale(m) == pytest.approx(a.scale(m), rel=1e-15)
    torch.testing.assert_close(
        unet_output(load_into_unet(out, tiny_unet())), unet_output(unet), rtol=1e-6, atol=1e-6
    )


def test_dora_cannot_go_to_kohya(tmp_path: Path) -> None:
    import subprocess
    import sys

    unet = add_unet_lora(tiny_unet(), use_dora=True, rank_pattern={}, alpha_pattern={})
    src = save_sd_lora(tmp_path / "dora", unet)
    with open_adapter(src) as a:
        assert a.meta.dora
    out = tmp_path / "k.safetensors"
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "from loraformat.cli.main import main; main()",
            "convert",
            str(src),
            "-o",
            str(out),
        ]
        + ["--to", "kohya"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "cannot carry DoRA" in run.stderr and not out.exists()


def test_mixed_component_and_plain_keys_are_refused(sd: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from loraformat.errors import AdapterError

    state = load_file(sd["unet_lora_only"])
    first = sorted(state)[0]
    state[first.removeprefix("unet.")] = state.pop(first)
    path = tmp_path / "mixed.safetensors"
    save_file(state, path)
    with pytest.raises(AdapterError, match="mixes keys with a component prefix"):
        open_adapter(path)


def test_other_commands_take_diffusion_adapters(sd: dict, tmp_path: Path) -> None:
    """compose, rescale and validate --base go through the same detection. (unet only: without a base, kohya's
    CLIP names resolve to the text_model. spelling, which this transformers 5 text encoder does not use.)"""
    from loraformat.composition import compose
    from loraformat.rescaling import rescale
    from loraformat.validation import validate

    kohya = tmp_path / "k.safetensors"
    convert(sd["unet_lora_only"], kohya, to="kohya")
    compose([sd["unet_lora_only"], kohya], tmp_path / "cat.safetensors", method="cat", weights=[0.5, 0.5])
    with open_adapter(tmp_path / "cat.safetensors") as cat, open_adapter(sd["unet_lora_only"]) as one:
        for m, want in module_deltas(one).items():
            torch.testing.assert_close(module_deltas(cat)[m], want, rtol=1e-5, atol=1e-7)
    rescale(kohya, tmp_path / "r8.safetensors", rank=2)
    report = validate(kohya, base=sd["pipeline"])
    assert report.ok(), [f.message for f in report.findings]
