"""convert --for ENGINE: each export, read by the engine's own rule, is exactly the adapter PEFT builds.

vLLM / PEFT layouts are checked with PEFT itself (the deltas it builds from our export equal the original's);
the GGUF is read back with gguf-py and llama.cpp's rule (scale = alpha / rank of lora_b) applied, the q/k row
permutation undone, and compared with PEFT's deltas. The real engines run in tests/engines/.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loraformat
from loraformat.errors import BaseMismatchError, EngineRefusedError, UsageError
from loraformat.ops.normalize import permute_rows
from tests.compose_helpers import peft_deltas, rel_err


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess (exit codes and the one-line error as a user sees them)."""
    code = "import sys; from loraformat.cli.main import main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)


@pytest.mark.parametrize("variant", ["plain", "rslora", "patterns"])
@pytest.mark.parametrize("uniform", [False, True])
def test_peft_layout_for_vllm_gives_peft_the_same_deltas(
    variant: str, uniform: bool, peft_adapters, deltas_of, llama32: Path, tmp_path: Path
) -> None:
    out = tmp_path / "for-vllm"
    result = loraformat.convert(peft_adapters[variant], out, engine="vllm", uniform=uniform)
    assert result.max_lora_rank == 8 and result.to == "peft"
    config = json.loads((out / "adapter_config.json").read_text())
    if uniform:  # one global rule: no patterns, no rsLoRA
        assert not config["rank_pattern"] and not config["alpha_pattern"] and not config["use_rslora"]
    want, got = deltas_of(peft_adapters[variant]), peft_deltas(out, llama32)
    assert sorted(got) == sorted(want)
    for module, delta in want.items():
        assert rel_err(got[module], delta) < 1e-6, module


def test_max_rank_is_the_optimal_truncation(peft_adapters, deltas_of, llama32: Path, tmp_path: Path) -> None:
    out = tmp_path / "r4"
    result = loraformat.convert(peft_adapters["plain"], out, engine="vllm", max_rank=4)
    want, got = deltas_of(peft_adapters["plain"]), peft_deltas(out, llama32)
    total = kept = 0.0
    for module, delta in want.items():
        S = torch.linalg.svdvals(delta)
        best = torch.linalg.svd(delta)  # Eckart-Young: the top-4 triplets of the dense delta
        optimal = best.U[:, :4] @ torch.diag(best.S[:4]) @ best.Vh[:4]
        assert rel_err(got[module], optimal) < 1e-5, module
        share = float(S[:4].square().sum() / S.square().sum())
        assert result.truncated[module]["energy_kept"] == pytest.approx(share, rel=1e-6)
        total += float(S.square().sum())
        kept += float(S[:4].square().sum())
    assert result.energy_kept == pytest.approx(kept / total, rel=1e-6)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


def _read_gguf(path: Path) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    return fields, tensors


@pytest.mark.parametrize("variant", ["plain", "rslora", "patterns"])
def test_gguf_under_llamacpp_rule_is_the_peft_delta(
    variant: str, peft_adapters, deltas_of, llama32: Path, tmp_path: Path
) -> None:
    import gguf

    out = tmp_path / "a.gguf"
    result = loraformat.convert(peft_adapters[variant], out, engine="llama.cpp", base=llama32)
    fields, tensors = _read_gguf(out)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    alpha = fields["adapter.lora.alpha"]
    assert alpha == result.alpha
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    want = deltas_of(peft_adapters[variant])
    assert len(tensors) == 2 * len(want)
    for module, delta in want.items():
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        A, B = tensors[name + ".lora_a"].double(), tensors[name + ".lora_b"].double()
        assert tensors[name + ".lora_b"].dtype == torch.float32
        ours = (alpha / B.shape[1]) * (B @ A)  # llama-adapter.h get_scale: alpha / rank of lora_b
        if module.endswith("q_proj"):
            delta = permute_rows(delta, 4, 4)
        elif module.endswith("k_proj"):
            delta = permute_rows(delta, 4, 2)
        assert rel_err(ours, delta) < 1e-6, module
    if variant == "plain":  # one alpha and rank: nothing folded, lora_b bit-exact
        assert result.folded == []


def test_refusals_name_the_modules_and_write_nothing(peft_adapters, llama32: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineRefusedError, match="DoRA"):
        loraformat.convert(peft_adapters["dora"], tmp_path / "d", engine="vllm")
    with pytest.raises(EngineRefusedError, match="modules_to_save"):
        loraformat.convert(
            peft_adapters["modules_to_save"], tmp_path / "m.gguf", engine="llama.cpp", base=llama32
        )
    with pytest.raises(UsageError, match="needs --base"):
        loraformat.convert(peft_adapters["plain"], tmp_path / "p.gguf", engine="llama.cpp")
    with pytest.raises(UsageError, match="unknown engine"):
        loraformat.convert(peft_adapters["plain"], tmp_path / "x", engine="tgi")
    with pytest.raises(UsageError, match="does not fit --for"):
        loraformat.convert(peft_adapters["plain"], tmp_path / "x", engine="vllm", to="gguf")
    assert list(tmp_path.iterdir()) == []


def test_gguf_base_of_another_architecture_is_refused(peft_adapters, tmp_path: Path) -> None:
    import gguf
    import numpy as np

    other = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(other, "gpt2")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(BaseMismatchError, match="'gpt2' is not supported"):
        loraformat.convert(peft_adapters["plain"], tmp_path / "a.gguf", engine="llama.cpp", base=other)
    assert not (tmp_path / "a.gguf").exists()


def test_cli_convert_for_engines(peft_adapters, llama32: Path, tmp_path: Path) -> None:
    done = run_cli(
        "convert",
        str(peft_adapters["patterns"]),
        "--for",
        "llama.cpp",
        "--base",
        str(llama32),
        "-o",
        str(tmp_path / "a.gguf"),
    )
    assert done.returncode == 0, done.stderr
    assert "scale folded into lora_B" in done.stdout
    done = run_cli(
        "convert",
        str(peft_adapters["plain"]),
        "--for",
        "vllm",
        "--max-rank",
        "4",
        "--json",
        "-o",
        str(tmp_path / "v"),
    )
    assert done.returncode == 0, done.stderr
    assert 0 < json.loads(done.stdout)["energy_kept"] < 1
    done = run_cli("convert", str(peft_adapters["lora_bias"]), "--for", "vllm", "-o", str(tmp_path / "b"))
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "lora_bias" in done.stderr
    assert not (tmp_path / "b").exists()
    done = run_cli("convert", str(peft_adapters["plain"]), "--for", "tgi", "-o", str(tmp_path / "t"))
    assert done.returncode == 2 and "unknown engine" in done.stderr
