"""``inspect``: the facts it reports are the adapter's, computed from the header (checked against PEFT's own
parameter count), in JSON and in the human view."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraformat import spec
from loraformat.cli.main import main
from loraformat.conversion import convert
from loraformat.errors import AdapterError
from loraformat.inspection import format_text, inspect, reduction_text
from tests.spec_helpers import one_module_adapter, rewrite


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(["inspect", *args])
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def test_worked_example(tmp_path: Path) -> None:
    d = inspect(one_module_adapter(tmp_path / "ex.safetensors"))
    p = d["parameters"]
    assert (p["lora"], p["trainable"], p["full_fine_tuning"]) == (4_608, 4_608, 32_768)
    assert p["summary"] == "4,608 vs 32,768: 86% fewer"
    assert d["modules"]["model.layers.0.mlp.up_proj"]["parameters"] == 8 * 64 + 512 * 8
    assert d["ranks"] == [8] and d["alphas"] == [16] and d["scales"] == [2.0]


def test_reduction_text() -> None:
    assert reduction_text(4_608, 32_768) == "4,608 vs 32,768: 86% fewer"
    assert reduction_text(10, 0) == "10 trainable"
    assert reduction_text(200, 100) == "200 vs 100: 100% more"


def peft_trainable(path: Path, base: Path) -> int:
    from peft import PeftModel

    from tests.fixtures import load_base

    model = PeftModel.from_pretrained(load_base(base), str(path), is_trainable=True)
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)


@pytest.mark.parametrize("variant", ["patterns", "dora", "embedding", "gpt2"])
def test_parameters_match_peft(peft_adapters, base_of, variant: str) -> None:
    d = inspect(peft_adapters[variant])
    assert d["parameters"]["trainable"] == peft_trainable(peft_adapters[variant], base_of(variant))


def test_peft_directory_facts(peft_adapters) -> None:
    d = inspect(peft_adapters["patterns"])
    assert d["source_format"] == "peft" and d["spec_version"] is None
    assert d["ranks"] == [2, 4, 8] and d["alphas"] == [3, 5, 16]
    assert d["targets"] == {"linear": {"down_proj": 2, "q_proj": 2, "v_proj": 2}}
    assert d["modules"]["model.layers.0.self_attn.q_proj"]["scale"] == 3 / 4
    assert d["dtypes"] == {"F32": 12} and d["tensors"] == 12 and d["file_size"] > 0
    emb = inspect(peft_adapters["embedding"])
    assert emb["targets"] == {"embedding": {"embed_tokens": 1}, "linear": {"q_proj": 2}}
    rs = inspect(peft_adapters["rslora"])
    assert rs["scaling"] == "alpha/sqrt(r)" and rs["scales"] == [pytest.approx(16 / 8**0.5)]
    assert inspect(peft_adapters["dora"])["parameters"]["dora_and_bias"] > 0
    assert inspect(peft_adapters["gpt2"])["fan_in_fan_out"] is True
    assert inspect(peft_adapters["modules_to_save"])["parameters"]["saved_tensors"] == 256 * 64


def test_native_file_facts(peft_adapters, llama_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "plain.safetensors"
    convert(peft_adapters["plain"], out, base=llama_base, base_id="test/llama", license="apache-2.0")
    d = inspect(out)
    assert d["source_format"] == "loraformat" and d["spec_version"] == spec.SPEC_VERSION
    assert d["base_model"]["id"] == "test/llama" and d["base_model"]["target_digests"] == 14
    assert len(d["base_model"]["structure_hash"]) == 64 and len(d["content_hash"]) == 64
    assert d["license"] == "apache-2.0" and d["provenance"]["source_format"] == "peft"
    assert d["parameters"] == inspect(peft_adapters["plain"])["parameters"]
    text = format_text(d)
    for fragment in (
        f"format       loraformat (spec {spec.SPEC_VERSION})",
        "base         test/llama",
        "rank         8",
        "scaling      alpha/r = 2",
        "14 modules",
        "% fewer",
        "provenance   convert from peft",
    ):
        assert fragment in text


def test_cli(peft_adapters, tmp_path: Path, capsys) -> None:
    path = one_module_adapter(tmp_path / "ex.safetensors")
    code, out, _ = run_cli(capsys, str(path), "--json")
    assert code == 0 and json.loads(out)["parameters"]["summary"] == "4,608 vs 32,768: 86% fewer"
    code, out, _ = run_cli(capsys, str(path))
    assert code == 0 and "4,608 vs 32,768: 86% fewer" in out
    bad = rewrite(
        path,
        tmp_path / "bad.safetensors",
        tensors=lambda t: t.pop("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"),
    )
    code, _, err = run_cli(capsys, str(bad))
    assert code == 1 and err.startswith(f"error: {bad}: ") and "lora_B" in err
    code, _, err = run_cli(capsys, str(tmp_path / "nope"))
    assert code == 2
    with pytest.raises(AdapterError):
        inspect(bad)
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    assert "Examples:" in capsys.readouterr().out
