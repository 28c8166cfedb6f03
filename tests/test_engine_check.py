"""validate --for ENGINE: the findings each engine's reading rule predicts, header-only and fast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import loraformat
from loraformat.engine_check import validate_for


def codes(path: Path, engine: str, **kw) -> dict[str, set[str]]:
    (report,) = validate_for([path], engine, **kw)
    out: dict[str, set[str]] = {}
    for f in report.findings:
        out.setdefault(f.code, set()).add(f.location)
    return out


def test_vllm_findings(peft_adapters, llama_base: Path) -> None:
    assert codes(peft_adapters["patterns"], "vllm") == {}  # vLLM 0.32 honours rank/alpha patterns
    assert "dora" in codes(peft_adapters["dora"], "vllm")["unsupported-feature"]
    assert "modules_to_save" in codes(peft_adapters["modules_to_save"], "vllm")["unsupported-feature"]
    assert "bias" in codes(peft_adapters["lora_bias"], "vllm")["unsupported-feature"]
    over = codes(peft_adapters["plain"], "vllm", max_lora_rank=1)
    assert "rank-above-cap" in over
    (report,) = validate_for([peft_adapters["plain"]], "vllm", max_lora_rank=1)
    assert "--max-lora-rank 8" in report.errors[0].message and report.facts["max_lora_rank"] == 8
    assert codes(peft_adapters["plain"], "vllm", max_lora_rank=8) == {}
    # GPT-2's c_attn is not a module vLLM expects on a Llama base, and it is not in this base at all
    found = codes(peft_adapters["gpt2"], "vllm", base=llama_base)
    assert {"unsupported-target", "unmatched-module"} <= set(found)


def test_llamacpp_findings_flag_the_scales_its_converter_gets_wrong(peft_adapters) -> None:
    assert codes(peft_adapters["plain"], "llama.cpp") == {}
    rs = codes(peft_adapters["rslora"], "llama.cpp")["flattened-scale"]
    assert len(rs) == 4  # every rsLoRA module: alpha/r instead of alpha/sqrt(r)
    pat = codes(peft_adapters["patterns"], "llama.cpp")["flattened-scale"]
    # alpha_pattern modules only (rank_pattern modules keep alpha/r with their own rank)
    assert pat == {
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.v_proj",
    }
    (report,) = validate_for([peft_adapters["rslora"]], "llama.cpp")
    assert "gives scale 2 instead of 5.65685" in report.errors[0].message


def test_our_llamacpp_gguf_and_zero_delta(peft_adapters, llama_base: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from tests.fixtures import load_base

    zero = tmp_path / "zero"
    get_peft_model(load_base(llama_base), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(zero)
    found = codes(zero, "peft")
    assert found == {"zero-delta": {""}}
    (report,) = validate_for([zero], "peft")
    assert report.ok() and not report.ok(strict=True)


def test_unknown_engine_and_cli_exit_codes(peft_adapters, llama_base: Path) -> None:
    code = "import sys; from loraformat.cli.main import main; main(sys.argv[1:])"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)

    done = cli("validate", str(peft_adapters["plain"]), "--for", "sglang")
    assert done.returncode == 2 and done.stderr.startswith("error: unknown engine")
    done = cli("validate", str(peft_adapters["dora"]), str(peft_adapters["plain"]), "--for", "vllm", "--json")
    assert done.returncode == 1
    doc = json.loads(done.stdout)
    assert [r["ok"] for r in doc["reports"]] == [False, True]
    assert doc["reports"][1]["facts"]["max_lora_rank"] == 8
    done = cli("validate", str(peft_adapters["plain"]), "--for", "vllm", "--base", str(llama_base))
    assert done.returncode == 0 and "needs max_lora_rank 8" in done.stdout
    done = cli("inspect", str(peft_adapters["patterns"]), "--json")
    assert json.loads(done.stdout)["vllm_max_lora_rank"] == 8


def test_header_only_fast_and_torch_free(peft_adapters, llama_base: Path) -> None:
    """CPU time (not wall: the shared CI machine's load varies), best of three (the first run also compiles the
    clone's .pyc files): loraformat's own work under 0.3 s once numpy and gguf are loaded (their import alone
    costs ~0.2 s of CPU on this machine), and the whole call, every import included, under 0.6 s; torch never."""
    script = (
        "import sys, time; t0 = time.process_time(); import numpy, gguf; t1 = time.process_time();"
        "from loraformat.engine_check import validate_for;"
        f"r = validate_for([{str(peft_adapters['patterns'])!r}], 'llama.cpp', base={str(llama_base)!r});"
        "t2 = time.process_time(); assert 'torch' not in sys.modules, 'torch imported'; print(t2 - t1, t2 - t0)"
    )
    ours, total = [], []
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        a, b = done.stdout.split()
        ours.append(float(a))
        total.append(float(b))
    assert min(ours) < 0.3 and min(total) < 0.6, (ours, total)


def test_push_for_vllm_and_plain_push_warns(peft_adapters, tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    plain = loraformat.push(peft_adapters["lora_bias"], "acme/biased", hub=str(hub))
    assert any("vLLM would refuse it" in w and "lora_bias" in w for w in plain.warnings)
    from loraformat.errors import EngineRefusedError

    with pytest.raises(EngineRefusedError):
        loraformat.push(peft_adapters["lora_bias"], "acme/biased2", hub=str(hub), engine="vllm")
    pushed = loraformat.push(peft_adapters["patterns"], "acme/patterns", hub=str(hub), engine="vllm")
    assert not any("vLLM" in w for w in pushed.warnings)
