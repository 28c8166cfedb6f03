"""``loraformat.unmerge``: the inverse of merge, through the same streaming engine, with what can be verified."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import loraformat
from loraformat.errors import BaseMismatchError, ComposeError
from tests.merge_helpers import load_dir, raw_bytes


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |x| (fp32)."""
    a = x.abs().to(torch.bfloat16).contiguous()
    return (a.view(torch.int16) + 1).view(torch.bfloat16).float() - a.float()


@pytest.fixture(scope="module")
def stamped(tmp_path_factory: pytest.TempPathFactory, llama_base: Path, peft_adapters) -> dict[str, Path]:
    """Native, base-stamped copies of a few PEFT adapters (digests and content hashes recorded)."""
    root = tmp_path_factory.mktemp("stamped")
    out = {}
    for name in ("plain", "rslora", "dora", "modules_to_save"):
        out[name] = root / f"{name}.safetensors"
        loraformat.convert(peft_adapters[name], out[name], base=llama_base)
    return out


def test_unmerge_of_merge_is_the_base_within_one_rounding(tmp_path, llama_base, stamped):
    merged, back = tmp_path / "merged", tmp_path / "back"
    loraformat.merge(llama_base, [stamped["plain"]], merged)
    result = loraformat.unmerge(merged, [stamped["plain"]], back)
    base, m, r = load_dir(llama_base), load_dir(merged), load_dir(back)
    targets = {k for k in base if k.endswith("proj.weight")}
    for name in base:
        if name not in targets:  # untouched: copied byte for byte
            assert raw_bytes(back, name) == raw_bytes(llama_base, name), name
            continue
        # W' = rnd(W + d) lost everything below half an ulp of W'; rnd(W' - d) adds half an ulp of the result
        err = (r[name].float() - base[name].float()).abs()
        bound = 0.5 * bf16_ulp(m[name].float()) + 0.5 * bf16_ulp(r[name].float())
        assert bool((err <= bound).all()), name
        assert float((r[name].float() - m[name].float()).norm()) > 0  # the delta was really subtracted
    assert result.tensors_merged == len(targets)
    v = result.verified
    assert v["merge_record"] == "present" and v["adapters_confirmed"] == 1
    assert v["recovered_digests"]["checked"] == len(targets)


def test_unmerge_in_fp32_is_close_and_weights_follow_the_merge(tmp_path, llama32, peft_adapters):
    a, b = peft_adapters["plain"], peft_adapters["rslora"]
    merged, back = tmp_path / "merged", tmp_path / "back"
    loraformat.merge(llama32, [a, b], merged, weights=[0.7, -0.3])
    loraformat.unmerge(merged, [a, b], back, weights=[0.7, -0.3])
    base, r = load_dir(llama32), load_dir(back)
    for name in base:
        torch.testing.assert_close(r[name], base[name], rtol=0, atol=4e-7)


def test_an_exact_recovery_matches_the_recorded_digests(tmp_path, llama_base, stamped):
    """A merge whose delta vanishes in rounding (weight 1e-9) is undone bit for bit: the digests prove it."""
    merged, back = tmp_path / "merged", tmp_path / "back"
    loraformat.merge(llama_base, [stamped["plain"]], merged, weights=[1e-9])
    result = loraformat.unmerge(merged, [stamped["plain"]], back, weights=[1e-9])
    rec = result.verified["recovered_digests"]
    assert rec["checked"] == 14 and rec["identical"] == 14 and rec["differing"] == []
    assert result.warnings == []


def test_an_adapter_the_merge_record_does_not_list_is_refused(tmp_path, llama_base, stamped):
    merged = tmp_path / "merged"
    loraformat.merge(llama_base, [stamped["plain"]], merged)
    with pytest.raises(BaseMismatchError, match="records that it was merged with"):
        loraformat.unmerge(merged, [stamped["rslora"]], tmp_path / "x")
    with pytest.raises(BaseMismatchError, match="weight 0.5"):
        loraformat.unmerge(merged, [stamped["plain"]], tmp_path / "x", weights=[0.5])
    assert not (tmp_path / "x").exists()
    result = loraformat.unmerge(merged, [stamped["rslora"]], tmp_path / "x", verify=False)
    assert result.verified["merge_record"] == "not checked"


@pytest.mark.parametrize("variant", ["dora", "modules_to_save"])
def test_non_additive_adapters_are_refused(tmp_path, llama_base, stamped, variant):
    merged = tmp_path / "merged"
    loraformat.merge(llama_base, [stamped[variant]], merged)
    with pytest.raises(ComposeError, match="DoRA|replaces base tensors"):
        loraformat.unmerge(merged, [stamped[variant]], tmp_path / "x")
    assert not (tmp_path / "x").exists()
