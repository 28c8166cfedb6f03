"""spec 1.1 base_model.quantization: read from real configs (transformers' BitsAndBytesConfig, compressed-tensors'
QuantizationConfig, a PEFT card), set by hand, shown by inspect, checked by validate; 1.0 files stay valid."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from loraformat import spec
from loraformat.cli.main import cli
from loraformat.errors import UnsupportedQuantizationError, UsageError
from loraformat.metadata import BaseQuantization
from loraformat.quantization import (
    CARD_PREFIX,
    from_peft_card,
    from_quantization_config,
    parse_user_spec,
    problems,
)
from loraformat.validation import validate
from tests.spec_helpers import document, one_module_adapter, rewrite

EXE = shutil.which("loraformat") or "loraformat"


def _bnb_config(**kw: object) -> dict:
    import torch
    from transformers import BitsAndBytesConfig

    return json.loads(
        BitsAndBytesConfig(**kw, bnb_4bit_compute_dtype=torch.bfloat16).to_json_string(use_diff=False)
    )


def test_bitsandbytes_config_as_transformers_writes_it() -> None:
    q = from_quantization_config(
        _bnb_config(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    )
    assert q is not None
    assert q.to_dict() == {
        "method": "bnb-nf4",
        "block_size": 64,
        "double_quant": True,
        "compute_dtype": "bfloat16",
        "scale_layout": None,
        "source": "config",
    }
    fp4 = from_quantization_config(_bnb_config(load_in_4bit=True))
    assert fp4 is not None and (fp4.method, fp4.double_quant) == ("bnb-fp4", False)  # bitsandbytes' defaults
    int8 = from_quantization_config(_bnb_config(load_in_8bit=True))
    assert int8 is not None and int8.method == "bnb-int8"


def _compressed_tensors_config(scheme: str) -> dict:
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    qc = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(scheme, ["Linear"])})
    qc.format = "float-quantized"
    return {"quant_method": "compressed-tensors", **qc.model_dump()}


@pytest.mark.parametrize(
    "scheme,layout,block",
    [("FP8", "tensor", None), ("FP8_DYNAMIC", "channel", None), ("FP8_BLOCK", "block", [128, 128])],
)
def test_compressed_tensors_fp8_configs(scheme: str, layout: str, block: list[int] | None) -> None:
    q = from_quantization_config(_compressed_tensors_config(scheme))
    assert q is not None and (q.method, q.scale_layout, q.block_size) == ("fp8-e4m3", layout, block)


def test_deepseek_fp8_config() -> None:
    qc = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    q = from_quantization_config(qc)
    assert q is not None and (q.scale_layout, q.block_size) == ("block", [128, 128])


@pytest.mark.parametrize(
    "qc,word",
    [
        ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "gptq"),
        ({"quant_method": "awq", "bits": 4}, "awq"),
        ({"quant_method": "fp8", "fmt": "e5m2"}, "e5m2"),
        ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size"),
    ],
)
def test_unsupported_configs_are_refused_by_name(qc: dict, word: str) -> None:
    with pytest.raises(UnsupportedQuantizationError, match=word):
        from_quantization_config(qc)


def test_compressed_tensors_int4_is_refused() -> None:
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    qc = QuantizationConfig(config_groups={"g": preset_name_to_scheme("W4A16", ["Linear"])})
    qc.format = "pack-quantized"
    with pytest.raises(UnsupportedQuantizationError, match="pack-quantized"):
        from_quantization_config({"quant_method": "compressed-tensors", **qc.model_dump()})


def test_peft_card_lines() -> None:
    card = (
        "## Training procedure\n\n\n"
        f"{CARD_PREFIX}\n- load_in_8bit: False\n- load_in_4bit: True\n- llm_int8_threshold: 6.0\n"
        "- bnb_4bit_quant_type: nf4\n- bnb_4bit_use_double_quant: True\n- bnb_4bit_compute_dtype: bfloat16\n\n"
        "### Framework versions\n\n- PEFT 0.6.2\n"
    )
    q = from_peft_card(card)
    assert q is not None
    assert (q.method, q.double_quant, q.compute_dtype, q.source) == ("bnb-nf4", True, "bfloat16", "peft-card")
    assert from_peft_card("# An adapter\n") is None


def test_user_spec() -> None:
    q = parse_user_spec("bnb-nf4,block_size=128,double_quant=true,compute_dtype=bf16")
    assert q is not None and (q.block_size, q.double_quant, q.compute_dtype) == (128, True, "bfloat16")
    fp8 = parse_user_spec("fp8-e4m3,block_size=128x128")
    assert fp8 is not None and (fp8.scale_layout, fp8.block_size) == ("block", [128, 128])
    assert parse_user_spec("none") is None
    for bad in ("bnb-nf4,block_size=48", "bnb-nf4,colour=red", "fp8-e4m3,scale_layout=block", "gptq", ""):
        with pytest.raises(UsageError):
            parse_user_spec(bad)


def test_consistency_rules() -> None:
    assert problems(BaseQuantization("bnb-nf4", block_size=64, double_quant=True)) == []
    assert problems(BaseQuantization("fp8-e4m3", scale_layout="channel")) == []
    bad = [
        BaseQuantization("bnb-nf4", block_size=100),
        BaseQuantization("bnb-fp4", block_size=64, scale_layout="block"),
        BaseQuantization("fp8-e4m3"),
        BaseQuantization("fp8-e4m3", scale_layout="block"),
        BaseQuantization("fp8-e4m3", scale_layout="tensor", block_size=[128, 128]),
        BaseQuantization("bnb-int8", double_quant=True),
        BaseQuantization("bnb-nf4", block_size=64, compute_dtype="int8"),
    ]
    for q in bad:
        assert problems(q), q


def _convert(*args: str) -> object:
    return CliRunner().invoke(cli, ["convert", *args], catch_exceptions=False)


def test_convert_records_and_inspect_shows(peft_adapters, tmp_path: Path) -> None:
    out = tmp_path / "a.safetensors"
    res = _convert(
        str(peft_adapters["plain"]), "-o", str(out), "--base-quantization", "bnb-nf4,double_quant=true"
    )
    assert res.exit_code == 0, res.output
    doc = document(out)
    assert doc["spec_version"] == spec.SPEC_VERSION == "1.1"
    assert doc["base_model"]["quantization"]["method"] == "bnb-nf4"
    shown = CliRunner().invoke(cli, ["inspect", str(out)])
    assert "trained on bnb-nf4 (block 64, double quant; from user)" in shown.output
    data = json.loads(CliRunner().invoke(cli, ["inspect", str(out), "--json"]).output)
    assert data["base_model"]["quantization"]["double_quant"] is True
    assert validate(out).ok(strict=True)


def test_convert_reads_the_peft_card(peft_adapters, tmp_path: Path) -> None:
    src = tmp_path / "qlora"
    shutil.copytree(peft_adapters["plain"], src)
    (src / "README.md").write_text(
        f"## Training procedure\n\n{CARD_PREFIX}\n- load_in_4bit: True\n- bnb_4bit_quant_type: nf4\n"
        "- bnb_4bit_use_double_quant: False\n- bnb_4bit_compute_dtype: float16\n"
    )
    out = tmp_path / "a.safetensors"
    assert _convert(str(src), "-o", str(out)).exit_code == 0
    q = document(out)["base_model"]["quantization"]
    assert (q["method"], q["compute_dtype"], q["source"]) == ("bnb-nf4", "float16", "peft-card")
    # --base-quantization overrides what the card says
    out2 = tmp_path / "b.safetensors"
    assert _convert(str(src), "-o", str(out2), "--base-quantization", "none").exit_code == 0
    assert document(out2)["base_model"]["quantization"] is None


def test_convert_base_config_gptq_is_refused(peft_adapters, llama_base: Path, tmp_path: Path) -> None:
    base = tmp_path / "gptq-base"
    shutil.copytree(llama_base, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (base / "config.json").write_text(json.dumps(config))
    out = tmp_path / "a.safetensors"
    res = subprocess.run(
        [EXE, "convert", str(peft_adapters["plain"]), "-o", str(out), "--base", str(base)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1
    assert "gptq" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_validate_reports_inconsistent_and_unknown(tmp_path: Path) -> None:
    src = one_module_adapter(tmp_path / "a.safetensors")

    def set_q(q: BaseQuantization):
        return lambda m: setattr(m.base_model, "quantization", q)

    bad = rewrite(src, tmp_path / "bad.safetensors", meta=set_q(BaseQuantization("bnb-nf4", block_size=48)))
    report = validate(bad)
    assert [f.code for f in report.errors] == ["quantization"]
    newer = rewrite(src, tmp_path / "new.safetensors", meta=set_q(BaseQuantization("mxfp4")))
    report = validate(newer)
    assert report.ok() and [f.code for f in report.warnings] == ["quantization"]


def test_a_1_0_file_stays_valid(tmp_path: Path) -> None:
    src = one_module_adapter(tmp_path / "a.safetensors")

    def as_1_0(m) -> None:
        m.spec_version = "1.0"

    old = rewrite(src, tmp_path / "old.safetensors", meta=as_1_0)
    doc = document(old)
    doc["base_model"].pop("quantization")  # a 1.0 writer never wrote it
    from loraformat.schema import violations

    assert not violations(doc)
    assert validate(old).ok(strict=True)


@pytest.mark.parametrize("kind", ["nf4", "fp8-block", "fp8-channel"])
def test_convert_stamps_against_a_quantized_base(quantized_bases, kind: str, tmp_path: Path) -> None:
    """The quantized checkpoint's config fills base_model.quantization; packed 4-bit targets have their logical
    shapes; the digests cover the stored (quantized) bytes."""
    from loraformat.hashing import hash_base
    from loraformat.io.checkpoint import open_checkpoint
    from tests.fixtures import LLAMA_TARGETS, make_peft_adapter

    adapter = make_peft_adapter(quantized_bases["bf16"], tmp_path / "peft", r=4, target_modules=LLAMA_TARGETS)
    out = tmp_path / "a.safetensors"
    res = _convert(str(adapter), "-o", str(out), "--base", str(quantized_bases[kind]))
    assert res.exit_code == 0, res.output
    doc = document(out)
    q = doc["base_model"]["quantization"]
    assert q["source"] == "config"
    assert q["method"] == ("bnb-nf4" if kind == "nf4" else "fp8-e4m3")
    hashes = hash_base(open_checkpoint(quantized_bases[kind]))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert doc["base_model"]["target_digests"][name] == hashes.tensor_digests[name]
    assert validate(out, base=quantized_bases[kind]).ok(strict=True)
