"""Merging into diffusers pipeline directories: each targeted component goes through the merge engine, the
result loads with diffusers' from_pretrained and matches diffusers' fuse_lora (unet, SD3 transformer) and
PEFT's merge (CLIP text encoder); every other file is copied byte for byte; bad bases are refused."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import pytest

from loraformat.merging.api import merge
from tests.diffusion_helpers import (
    add_te_lora,
    add_unet_lora,
    diffusers,
    load_into_unet,
    save_pipeline,
    save_sd_lora,
    tiny_sd3_transformer,
    tiny_text_encoder,
    tiny_unet,
    torch,
)


def close(a: object, b: object) -> None:
    """Within one fp32 ulp of the magnitudes involved (PEFT and diffusers scale B@A in another order)."""
    torch.testing.assert_close(a, b, rtol=2**-22, atol=2e-7)


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("sd")
    unet, te = add_unet_lora(tiny_unet()), add_te_lora(tiny_text_encoder())
    lora = save_sd_lora(root / "lora", unet, te)
    pipeline = save_pipeline(root)
    out = root / "merged"
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "from loraformat.cli.main import main; main()",
            "merge",
            str(pipeline),
            str(lora),
        ]
        + ["-o", str(out), "--json", "--device", "cpu"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    return {
        "root": root,
        "pipeline": pipeline,
        "lora": lora,
        "out": out,
        "te": te,
        "json": json.loads(run.stdout),
    }


def test_merged_pipeline_loads_and_matches_fuse_lora(sd: dict) -> None:
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd["out"])
    unet = load_into_unet(sd["lora"], tiny_unet())
    unet.fuse_lora()
    unet.unload_lora()
    want, got = unet.state_dict(), pipe.unet.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        close(got[k], want[k])
    assert sd["json"]["components"].keys() == {"unet", "text_encoder"}
    assert sd["json"]["tensors_merged"] == 82


def test_text_encoder_matches_peft_merge(sd: dict) -> None:
    from peft.tuners.lora import LoraLayer

    te = sd["te"]
    for module in te.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    want = {k.replace(".base_layer", ""): v for k, v in te.state_dict().items() if "lora_" not in k}
    got = diffusers.StableDiffusionPipeline.from_pretrained(sd["out"]).text_encoder.state_dict()
    for k, v in got.items():
        close(v, want[k])


def test_every_non_weight_file_is_copied(sd: dict) -> None:
    base, out = sd["pipeline"], sd["out"]
    files = [p.relative_to(base) for p in base.rglob("*") if p.is_file()]
    assert sorted(files) == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for rel in files:
        if rel.parts[0] in ("unet", "text_encoder") and rel.suffix == ".safetensors":
            continue
        assert filecmp.cmp(base / rel, out / rel, shallow=False), rel
    assert filecmp.cmp(
        base / "vae/diffusion_pytorch_model.safetensors", out / "vae/diffusion_pytorch_model.safetensors"
    )


def test_fp16_pipeline_rounds_once(sd: dict, tmp_path: Path) -> None:
    base = tmp_path / "fp16"
    diffusers.StableDiffusionPipeline.from_pretrained(
        sd["pipeline"], torch_dtype=torch.float16
    ).save_pretrained(base)
    merge(base, [sd["lora"]], tmp_path / "out", device="cpu")
    from safetensors.torch import load_file

    w16 = load_file(base / "unet/diffusion_pytorch_model.safetensors")
    got = load_file(tmp_path / "out/unet/diffusion_pytorch_model.safetensors")
    w32 = load_file(sd["pipeline"] / "unet/diffusion_pytorch_model.safetensors")
    m32 = load_file(sd["out"] / "unet/diffusion_pytorch_model.safetensors")
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight"
    delta = m32[name].double() - w32[name].double()  # the fp32 merge's delta
    want = (w16[name].double() + delta).half()
    assert got[name].dtype == torch.float16
    assert (got[name].float() - want.float()).abs().max() <= 2**-10 * want.float().abs().max()


def test_component_folder_merges_its_part_only(sd: dict, tmp_path: Path) -> None:
    result = merge(sd["pipeline"] / "unet", [sd["lora"]], tmp_path / "unet", device="cpu")
    assert any("text_encoder" in w for w in result.warnings)
    merged = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    full = diffusers.UNet2DConditionModel.from_pretrained(sd["out"] / "unet")
    for k, v in merged.state_dict().items():
        assert torch.equal(v, full.state_dict()[k])


def test_sd3_transformer_pipeline(tmp_path: Path) -> None:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = tiny_sd3_transformer()
    pipeline = tmp_path / "sd3"
    model.save_pretrained(pipeline / "transformer")
    (pipeline / "model_index.json").write_text(
        json.dumps(
            {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}
        )
    )
    torch.manual_seed(1)
    model.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=2,
            target_modules=["to_q", "to_k", "add_k_proj", "proj_out"],
            init_lora_weights=False,
        )
    )
    diffusers.StableDiffusion3Pipeline.save_lora_weights(
        str(tmp_path / "lora"),
        transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
    )
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    merge(pipeline, [lora], tmp_path / "out", device="cpu")
    got = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "out" / "transformer").state_dict()
    # what StableDiffusion3Pipeline.load_lora_weights does (ModelMixin.load_lora_adapter(path) alone drops the
    # file's lora_adapter_metadata in diffusers 0.42.1 and applies alpha = rank: spec/interop/diffusers.md)
    loader = diffusers.StableDiffusion3Pipeline
    state, metadata = loader.lora_state_dict(str(lora), return_lora_metadata=True)
    ref = diffusers.SD3Transformer2DModel.from_pretrained(pipeline / "transformer")
    loader.load_lora_into_transformer(state, ref, metadata=metadata)
    ref.fuse_lora()
    ref.unload_lora()
    model.fuse_lora()
    model.unload_lora()
    for k, v in ref.state_dict().items():
        close(got[k], v)
        close(got[k], model.state_dict()[k])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from loraformat.cli.main import main; main()", *args],
        capture_output=True,
        text=True,
    )


def test_adapter_for_a_missing_component_is_refused(sd: dict, tmp_path: Path) -> None:
    te2 = tmp_path / "te2.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(sd["lora"])
    save_file({k.replace("text_encoder.", "text_encoder_2."): v for k, v in state.items()}, te2)
    run = _cli("merge", str(sd["pipeline"]), str(te2), "-o", str(tmp_path / "out"))
    assert run.returncode == 1 and "has no text_encoder_2 component" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_single_model_adapter_needs_its_component(sd: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = {k[len("unet.") :]: v for k, v in load_file(sd["lora"]).items() if k.startswith("unet.")}
    path = tmp_path / "plain.safetensors"
    save_file(state, path)
    run = _cli("merge", str(sd["pipeline"]), str(path), "-o", str(tmp_path / "out"))
    assert run.returncode != 0 and "--component" in run.stderr and not (tmp_path / "out").exists()
    ok = _cli("merge", str(sd["pipeline"] / "unet"), str(path), "-o", str(tmp_path / "out"))
    assert ok.returncode == 0, ok.stderr


def test_sharded_component_keeps_diffusers_index_name(sd: dict, tmp_path: Path) -> None:
    """Large components (SDXL's unet, SD3/Flux transformers) are sharded with
    diffusion_pytorch_model.safetensors.index.json; the merged folder keeps that name so diffusers finds it."""
    unet = diffusers.UNet2DConditionModel.from_pretrained(sd["pipeline"] / "unet")
    base = tmp_path / "unet"
    unet.save_pretrained(base, max_shard_size="20KB")
    assert (base / "diffusion_pytorch_model.safetensors.index.json").exists()
    merge(base, [sd["lora"]], tmp_path / "out", device="cpu")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.json" in names
    assert "model.safetensors.index.json" not in names
    merged = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "out").state_dict()
    full = diffusers.UNet2DConditionModel.from_pretrained(sd["out"] / "unet").state_dict()
    assert all(torch.equal(v, full[k]) for k, v in merged.items())
