"""rescale / spectrum on real PEFT adapters, checked against the deltas PEFT itself builds (fp64)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from loraformat.adapter import open_adapter
from loraformat.errors import UsageError
from loraformat.rescaling import rescale, spectrum
from tests.compose_helpers import as_peft_dir, listing, rel_err

# --- rescale ---------------------------------------------------------------------------------------------------


def test_rescale_scale_is_exact_and_keeps_factors(peft_adapters, deltas_of, tmp_path):
    out = tmp_path / "neg.safetensors"
    rescale(peft_adapters["patterns"], out, scale=-0.5)
    want = {m: -0.5 * d for m, d in deltas_of(peft_adapters["patterns"]).items()}
    got = deltas_of(as_peft_dir(out, tmp_path))
    for module, delta in want.items():
        assert rel_err(got[module], delta) < 1e-7
    src, dst = load_file(peft_adapters["patterns"] / "adapter_model.safetensors"), load_file(out)
    for key, t in src.items():
        assert torch.equal(dst[key], -t if ".lora_B." in key else t)
    before, after = open_adapter(peft_adapters["patterns"]).meta, open_adapter(out).meta
    for module, entry in after.modules.items():
        assert (
            entry.alpha == pytest.approx(0.5 * before.modules[module].alpha)
            and entry.rank == before.modules[module].rank
        )
    assert after.provenance.method == "rescale" and after.provenance.parents[0].weight == -0.5


def test_rescale_alpha_changes_only_the_scale(peft_adapters, deltas_of, tmp_path):
    out = tmp_path / "alpha.safetensors"
    rescale(peft_adapters["rslora"], out, alpha=4)
    got = deltas_of(as_peft_dir(out, tmp_path))
    for module, delta in deltas_of(peft_adapters["rslora"]).items():
        assert rel_err(got[module], delta * 4 / 16) < 1e-7  # rsLoRA: alpha/sqrt(r), r unchanged
    src, dst = load_file(peft_adapters["rslora"] / "adapter_model.safetensors"), load_file(out)
    assert all(torch.equal(dst[k], t) for k, t in src.items())
    assert open_adapter(out).meta.scaling == "alpha/sqrt(r)"


@pytest.mark.parametrize("variant", ["plain", "rslora"])
def test_rescale_rank_truncation_is_optimal(peft_adapters, deltas_of, tmp_path, variant):
    out = tmp_path / "r4.safetensors"
    result = rescale(peft_adapters[variant], out, rank=4, scale=2.0)
    got = deltas_of(as_peft_dir(out, tmp_path))
    for module, delta in deltas_of(peft_adapters[variant]).items():
        D = 2.0 * delta
        S = torch.linalg.svdvals(D)
        error, optimal = float((got[module] - D).norm()), float(S[4:].square().sum().sqrt())
        assert abs(error - optimal) <= 1e-5 * float(D.norm()), module
        assert result.modules[module] == {
            "rank_before": 8,
            "rank_after": 4,
            "energy_kept": pytest.approx(float(S[:4].square().sum() / S.square().sum())),
        }
    assert result.parameters_after * 2 == result.parameters_before
    assert result.file_size_after < result.file_size_before
    assert result.file_size_after == out.stat().st_size


def test_rescale_only_lowers_ranks(peft_adapters, deltas_of, tmp_path):
    out = tmp_path / "p.safetensors"
    result = rescale(peft_adapters["patterns"], out, rank=4, scale=-1.5)
    after = {m: r["rank_after"] for m, r in result.modules.items()}
    before = {m: r["rank_before"] for m, r in result.modules.items()}
    assert {before[m]: after[m] for m in after} == {8: 4, 4: 4, 2: 2}
    # written like compose output (scale 1 everywhere); modules already at or under the rank stay exact
    meta = open_adapter(out).meta
    assert meta.scaling == "alpha/r" and all(e.alpha == e.rank for e in meta.modules.values())
    got = deltas_of(as_peft_dir(out, tmp_path))
    for module, delta in deltas_of(peft_adapters["patterns"]).items():
        if before[module] <= 4:
            assert rel_err(got[module], -1.5 * delta) < 1e-6, module
    with pytest.raises(UsageError, match="only lowers"):
        rescale(peft_adapters["patterns"], tmp_path / "up.safetensors", rank=16)
    assert not (tmp_path / "up.safetensors").exists()


def test_rescale_auto_energy(peft_adapters, deltas_of, tmp_path):
    result = rescale(peft_adapters["plain"], tmp_path / "auto.safetensors", rank="auto:0.8")
    for module, delta in deltas_of(peft_adapters["plain"]).items():
        energy = torch.cumsum(torch.linalg.svdvals(delta).square(), 0)
        want = min(8, int((energy / energy[-1] < 0.8).sum()) + 1)
        assert result.modules[module]["rank_after"] == want
        assert result.modules[module]["energy_kept"] >= 0.8


def test_rescale_truncation_scales_lora_bias(peft_adapters, tmp_path):
    out = tmp_path / "b.safetensors"
    rescale(peft_adapters["lora_bias"], out, rank=2, scale=3.0)
    src, dst = open_adapter(peft_adapters["lora_bias"]), open_adapter(out)
    for module in src.modules:
        key = src.keys(module).bias
        torch.testing.assert_close(
            dst.tensor(key).double() * dst.scale(module),
            3.0 * src.tensor(key).double() * src.scale(module),
            rtol=1e-6,
            atol=1e-7,
        )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(scale=2.0, alpha=4.0), "exclusive"),
        (dict(), "nothing to do"),
        (dict(scale=0.0), "non-zero"),
        (dict(alpha=-1.0), "positive"),
        (dict(rank="auto:0"), r"\(0, 1\]"),
        (dict(rank=0), "positive"),
    ],
)
def test_rescale_bad_arguments(peft_adapters, tmp_path, kwargs, match):
    with pytest.raises(UsageError, match=match):
        rescale(peft_adapters["plain"], tmp_path / "x.safetensors", **kwargs)
    assert listing(tmp_path) == []


# --- spectrum --------------------------------------------------------------------------------------------------


def test_spectrum_matches_the_dense_singular_values(peft_adapters, deltas_of):
    report = spectrum(peft_adapters["patterns"], ranks=(1, 2, 4))
    for module, delta in deltas_of(peft_adapters["patterns"]).items():
        S = torch.linalg.svdvals(delta)
        m = report.modules[module]
        torch.testing.assert_close(
            torch.tensor(m.singular_values, dtype=torch.float64), S[: m.rank], rtol=1e-6, atol=1e-9
        )
        for r in (1, 2, 4):
            assert m.energy[r] == pytest.approx(float(S[:r].square().sum() / S.square().sum()), rel=1e-6)
    doc = json.loads(json.dumps(report.to_json()))
    assert set(doc["modules"]) == set(report.modules) and set(doc["mean_energy"]) == {"1", "2", "4"}
    text = report.format_text()
    assert all(module in text for module in report.modules) and "E@4" in text
