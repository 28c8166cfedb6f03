"""kohya sd-scripts files: alpha kept exactly (alpha != rank, missing, zero), names resolved against the base
or the known architectures and refused when ambiguous, ss_* metadata kept and shown, sshs hashes recomputed,
and bad input refused with one line, exit 1 and nothing written."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from loraformat.adapter import open_adapter
from loraformat.constants import Format
from loraformat.conversion import convert
from loraformat.errors import AdapterError
from loraformat.inspection import inspect
from loraformat.io.names import NameIndex
from loraformat.io.tensors import SafetensorsSource
from tests.diffusion_helpers import load_into_unet, save_pipeline, tiny_unet, torch, unet_output

Q = "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "down_blocks_0_resnets_0_conv1"
FF = "down_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj"
TE = "text_model_encoder_layers_1_self_attn_v_proj"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_pipeline(tmp_path_factory.mktemp("sd"))


def kohya_state(seed: int = 0) -> dict[str, object]:
    """A hand-written kohya file as sd-scripts lays it out: alpha 3 for rank 4 (scale 0.75), a conv module
    with alpha 1.5, one module without alpha and one with alpha 0 (both mean alpha = rank)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> object:
        return torch.randn(*shape, generator=g).to(torch.float16)

    return {
        f"lora_unet_{Q}.lora_down.weight": r(4, 8),
        f"lora_unet_{Q}.lora_up.weight": r(8, 4),
        f"lora_unet_{Q}.alpha": torch.tensor(3.0, dtype=torch.float16),
        f"lora_unet_{CONV}.lora_down.weight": r(2, 4, 3, 3),
        f"lora_unet_{CONV}.lora_up.weight": r(4, 2, 1, 1),
        f"lora_unet_{CONV}.alpha": torch.tensor(1.5),
        f"lora_unet_{FF}.lora_down.weight": r(4, 8),
        f"lora_unet_{FF}.lora_up.weight": r(64, 4),
        f"lora_te_{TE}.lora_down.weight": r(4, 32),
        f"lora_te_{TE}.lora_up.weight": r(32, 4),
        f"lora_te_{TE}.alpha": torch.tensor(0.0),
    }


@pytest.fixture()
def kohya_file(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    path = tmp_path / "civitai.safetensors"
    meta = {
        "ss_network_dim": "4",
        "ss_network_alpha": "3",
        "ss_base_model_version": "sd_v1",
        "ss_num_epochs": "10",
        "ss_learning_rate": "0.0001",
        "sshs_model_hash": "0" * 64,  # stale on purpose
    }
    save_file(kohya_state(), path, metadata=meta)
    return path


def test_reads_alpha_rules_and_resolves_against_base(kohya_file: Path, pipeline: Path) -> None:
    with open_adapter(kohya_file, base=pipeline) as a:
        assert a.source_format == Format.KOHYA
        q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
        conv = "unet.down_blocks.0.resnets.0.conv1"
        ff = "unet.down_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj"
        te = "text_encoder.encoder.layers.1.self_attn.v_proj"  # transformers 5 saves CLIP without text_model.
        assert a.scale(q) == 0.75 and a.scale(conv) == 0.75 and a.scale(ff) == 1.0 and a.scale(te) == 1.0
        assert a.modules[conv].kernel_size == [3, 3]
    with open_adapter(kohya_file) as a:  # no base: the known architectures' module templates
        assert "text_encoder.text_model.encoder.layers.1.self_attn.v_proj" in a.modules


def test_alpha_not_rank_survives_kohya_loraformat_diffusers_kohya(
    kohya_file: Path, pipeline: Path, tmp_path: Path
) -> None:
    native, diff, back = tmp_path / "n.safetensors", tmp_path / "d.safetensors", tmp_path / "k.safetensors"
    convert(kohya_file, native, base=pipeline)
    convert(native, diff, to="diffusers")
    convert(diff, back, to="kohya")
    original = kohya_state()
    from safetensors.torch import load_file

    again = load_file(back)
    for key, tensor in original.items():
        if key.endswith(".alpha"):
            continue
        assert torch.equal(again[key], tensor), key  # bit for bit, fp16 kept
    assert float(again[f"lora_unet_{Q}.alpha"]) == 3.0 and float(again[f"lora_unet_{CONV}.alpha"]) == 1.5
    assert float(again[f"lora_te_{TE}.alpha"]) == 4.0  # alpha 0 meant alpha = rank: same scale, explicit now
    assert float(again[f"lora_unet_{FF}.alpha"]) == 4.0
    with open_adapter(kohya_file, base=pipeline) as a, open_adapter(back, base=pipeline) as b:
        for m in a.modules:
            assert a.scale(m) == b.scale(m)


def test_kohya_file_loads_in_diffusers_like_ours(pipeline: Path, tmp_path: Path) -> None:
    """diffusers' own kohya conversion and our merge agree on a file whose alpha (3) differs from its ranks
    (4 and 2). Per-module alphas that differ from the file's most common one are not compared: diffusers 0.42.1
    mis-keys them for attention modules and ignores them (spec/interop/kohya.md §diffusers)."""
    from safetensors.torch import save_file

    from loraformat.merging.api import merge

    state = {k: v for k, v in kohya_state().items() if k.startswith("lora_unet_")}
    state.update({k: torch.tensor(3.0) for k in [f"lora_unet_{n}.alpha" for n in (Q, CONV, FF)]})
    unet_part = tmp_path / "unet_only.safetensors"
    save_file(state, unet_part)
    theirs = load_into_unet(unet_part, tiny_unet())
    theirs.fuse_lora()
    merged = merge(pipeline / "unet", [unet_part], tmp_path / "merged_unet", device="cpu")
    import diffusers

    ours = diffusers.UNet2DConditionModel.from_pretrained(merged.output)
    assert not torch.equal(unet_output(ours), unet_output(tiny_unet()))
    torch.testing.assert_close(unet_output(ours), unet_output(theirs), rtol=1e-5, atol=1e-6)


def test_sshs_hash_recomputed_and_ss_metadata_kept(kohya_file: Path, tmp_path: Path, pipeline: Path) -> None:
    out = tmp_path / "k.safetensors"
    convert(kohya_file, out, to="kohya", base=pipeline)
    src = SafetensorsSource(out)
    raw = src.header.metadata
    with open(out, "rb") as f:
        f.seek(src.header.data_start)
        data = f.read()
    assert raw["sshs_model_hash"] == hashlib.sha256(data).hexdigest() != "0" * 64
    assert raw["ss_base_model_version"] == "sd_v1" and raw["ss_num_epochs"] == "10"
    assert len(raw["sshs_legacy_hash"]) == 8
    stale = inspect(kohya_file)["kohya_training"]
    assert stale["sshs_model_hash_state"] == "stale" and stale["fields"]["base model"] == "sd_v1"
    assert inspect(out)["kohya_training"]["sshs_model_hash_state"] == "matches"


def test_inspect_text_shows_training_in_plain_words(kohya_file: Path) -> None:
    run = _cli("inspect", str(kohya_file))
    assert run.returncode == 0, run.stderr
    assert "format       kohya" in run.stdout and "epochs" in run.stdout and "sd_v1" in run.stdout
    assert "STALE" in run.stdout and "unet (3 modules)" in run.stdout


def test_ambiguous_underscored_name_is_refused() -> None:
    index = NameIndex(["blocks.a_b.c", "blocks.a.b_c"])
    assert index.candidates("blocks_a_b_c") == ["blocks.a.b_c", "blocks.a_b.c"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from loraformat.cli.main import main; main()", *args],
        capture_output=True,
        text=True,
    )


def _bad(state: dict[str, object], tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file(state, path)
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop(f"lora_unet_{Q}.lora_up.weight"), "has no matching lora_up.weight"),
        (lambda s: s.__setitem__(f"lora_unet_{Q}.alpha", torch.ones(2)), "alpha has shape [2]"),
        (
            lambda s: s.__setitem__("lora_unet_x.weird.weight", torch.ones(2)),
            "keys outside the kohya LoRA layout",
        ),
        (lambda s: s.__setitem__("unet.a.lora_A.weight", torch.ones(2, 2)), "mixes adapter layouts"),
        (
            lambda s: (
                s.__setitem__("lora_unet_input_blocks_1_1_proj_in.lora_down.weight", torch.ones(2, 2))
                or s.__setitem__("lora_unet_input_blocks_1_1_proj_in.lora_up.weight", torch.ones(2, 2))
            ),
            "cannot place 1 kohya modules",
        ),
    ],
)
def test_bad_kohya_input_one_line_exit_1_nothing_written(tmp_path: Path, edit: object, message: str) -> None:
    state = kohya_state()
    edit(state)  # type: ignore[operator]
    src, out = _bad(state, tmp_path), tmp_path / "out.safetensors"
    run = _cli("convert", str(src), "-o", str(out), "--to", "diffusers")
    assert run.returncode == 1, run.stderr
    assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_unknown_layout_names_the_keys(tmp_path: Path) -> None:
    src = _bad({"model.layers.0.weight": torch.ones(2, 2)}, tmp_path)
    with pytest.raises(AdapterError, match=r"no key ends in lora_A.*model\.layers\.0\.weight"):
        open_adapter(src)


def test_base_missing_a_target_is_refused(kohya_file: Path, tmp_path: Path) -> None:
    small = tmp_path / "unet"
    tiny_unet(layers_per_block=1).save_pretrained(small)
    state = {k: v for k, v in kohya_state().items() if k.startswith("lora_unet_")}
    state = {
        k.replace("attentions_0", "attentions_1"): v for k, v in state.items()
    }  # layers_per_block=1: no attentions.1
    src, out = _bad(state, tmp_path), tmp_path / "merged"
    diffusers_file = tmp_path / "d.safetensors"
    convert(src, diffusers_file, to="diffusers")  # names resolved by the templates, not this base
    for adapter, message in ((src, "cannot place 2 kohya modules"), (diffusers_file, "base has no tensor")):
        run = _cli("merge", str(small), str(adapter), "-o", str(out))
        assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert message in run.stderr and not out.exists()


def test_push_and_pull_a_kohya_file_through_the_local_hub(kohya_file: Path, tmp_path: Path) -> None:
    """push detects the kohya layout like every other command: the hub gets a native file that remembers it."""
    import loraformat

    hub = tmp_path / "hub"
    loraformat.push(kohya_file, "org/civitai", hub=hub)
    loraformat.pull("org/civitai", tmp_path / "pulled", hub=hub)
    pulled = next((tmp_path / "pulled").glob("*.safetensors"))
    with open_adapter(pulled) as a, open_adapter(kohya_file) as k:
        assert a.source_format == Format.LORAFORMAT
        assert a.meta.provenance.source_format == Format.KOHYA
        assert a.meta.provenance.details["kohya_metadata"]["ss_num_epochs"] == "10"
        assert {m: a.scale(m) for m in a.modules} == {m: k.scale(m) for m in k.modules}
