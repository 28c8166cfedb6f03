"""``loraformat.extract`` on real checkpoints: round trips through merge, PEFT as the oracle of the output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import loraformat
from loraformat.adapter import open_adapter
from loraformat.errors import BaseMismatchError, UsageError
from loraformat.hashing import hash_base
from tests.compose_helpers import as_peft_dir
from tests.extract_helpers import LINEAR, load_state, make_tuned, save_model
from tests.fixtures import make_llama_base
from tests.merge_helpers import load_dir


@pytest.fixture(scope="module")
def tuned32(tmp_path_factory: pytest.TempPathFactory, llama32: Path) -> Path:
    """llama32 fine-tuned: every linear weight moved by a decaying-spectrum delta, one norm changed."""

    def bump_norm(state: dict[str, torch.Tensor]) -> None:
        state["model.norm.weight"] = state["model.norm.weight"] + 0.125

    return make_tuned(llama32, tmp_path_factory.mktemp("tuned") / "tuned32", extra=bump_norm)


def deltas(base: Path, tuned: Path) -> dict[str, torch.Tensor]:
    b, t = load_state(base), load_state(tuned)
    return {k: t[k].double() - b[k].double() for k in b}


def extracted_deltas(path: Path) -> dict[str, torch.Tensor]:
    with open_adapter(path) as a:
        return {
            e.base_tensor: a.scale(m) * (a.lora_B(m).double() @ a.lora_A(m).double())
            for m, e in a.modules.items()
        }


def test_round_trip_through_merge_reproduces_the_adapter_delta(tmp_path, llama_base, peft_adapters):
    """extract(base, merge(base, a)) at a's rank gives back a's delta, up to the bf16 rounding of the merge."""
    adapter = peft_adapters["plain"]  # r=8 on all seven projections
    merged = tmp_path / "merged"
    loraformat.merge(llama_base, [adapter], merged)
    result = loraformat.extract(llama_base, merged, tmp_path / "x.safetensors", rank=8, dtype="fp32")
    assert len(result.modules) == 14 and {m["rank"] for m in result.modules.values()} == {8}
    with open_adapter(adapter) as a:
        truth = {
            e.base_tensor: a.scale(m) * (a.lora_B(m).double() @ a.lora_A(m).double())
            for m, e in a.modules.items()
        }
    ours, seen = extracted_deltas(tmp_path / "x.safetensors"), deltas(llama_base, merged)
    for name, d in truth.items():
        rounding = float((seen[name] - d).norm())  # what bf16 storage of the merge did to the delta
        err = float((ours[name] - d).norm())
        assert err <= 2 * rounding + 1e-6, name  # the best rank-8 fit of d + N is within 2 ||N|| of d
        assert err / float(d.norm()) < 0.02, name


def test_round_trip_in_fp32_is_exact_to_rounding(tmp_path, llama32, peft_adapters):
    merged = tmp_path / "merged32"
    loraformat.merge(llama32, [peft_adapters["plain"]], merged)
    result = loraformat.extract(llama32, merged, tmp_path / "x.safetensors", rank=8)
    assert result.max_relative_error < 1e-4
    with open_adapter(peft_adapters["plain"]) as a:
        for m, e in a.modules.items():
            d = a.scale(m) * (a.lora_B(m).double() @ a.lora_A(m).double())
            ours = extracted_deltas(tmp_path / "x.safetensors")[e.base_tensor]
            assert float((ours - d).norm() / d.norm()) < 1e-4, m


def test_peft_loads_the_adapter_and_its_merge_matches_tuned_within_the_reported_error(
    tmp_path, llama32, tuned32
):
    from peft import PeftModel

    from tests.fixtures import load_base

    out = tmp_path / "x.safetensors"
    result = loraformat.extract(llama32, tuned32, out, rank=4, dtype="fp32")
    merged = PeftModel.from_pretrained(load_base(llama32), as_peft_dir(out, tmp_path)).merge_and_unload()
    got = {k: v.detach().double() for k, v in merged.state_dict().items()}
    base, tuned = load_state(llama32), load_state(tuned32)
    for module, row in result.modules.items():
        name = module + ".weight"
        d = tuned[name].double() - base[name].double()
        err = float((got[name] - tuned[name].double()).norm() / d.norm())
        assert err <= row["relative_error"] * (1 + 1e-4) + 1e-6, module
        assert 0.12 < row["relative_error"] < 0.14  # rank 4 of a 0.6**i spectrum: sqrt(0.36**4) = 0.1296
        best = torch.linalg.svdvals(d)  # Eckart-Young: the optimum at rank 4
        assert row["relative_error"] <= 1.01 * float(
            best[4:].square().sum().sqrt() / best.square().sum().sqrt()
        )


def test_energy_selection_picks_the_documented_rank(tmp_path, llama32, tuned32):
    result = loraformat.extract(llama32, tuned32, tmp_path / "x.safetensors", rank="auto:0.9")
    seen = deltas(llama32, tuned32)
    for module, row in result.modules.items():
        S2 = torch.linalg.svdvals(seen[module + ".weight"]).square()
        cum = torch.cumsum(S2, 0) / S2.sum()
        assert row["rank"] == int(torch.nonzero(cum >= 0.9)[0]) + 1, module  # smallest rank keeping 90%
        assert row["energy_kept"] >= 0.9 - 1e-6
    capped = loraformat.extract(
        llama32, tuned32, tmp_path / "y.safetensors", rank="auto:0.999", max_rank=2, min_rank=1
    )
    assert {m["rank"] for m in capped.modules.values()} == {2}
    assert any("--max-rank" in w for w in capped.warnings)


def test_identical_tensors_produce_no_module(tmp_path, llama_base, peft_adapters):
    merged = tmp_path / "merged"
    loraformat.merge(llama_base, [peft_adapters["rslora"]], merged)  # q_proj and v_proj only
    result = loraformat.extract(llama_base, merged, tmp_path / "x.safetensors", rank=8)
    assert sorted(result.modules) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    )
    assert result.changed == [] and result.identical == len(load_state(llama_base)) - 4
    with pytest.raises(UsageError, match="does not differ"):
        loraformat.extract(llama_base, llama_base, tmp_path / "y.safetensors", rank=8)
    assert not (tmp_path / "y.safetensors").exists()


def test_mismatched_shapes_are_refused_before_any_data_is_read(tmp_path, llama_base):
    other = make_llama_base(tmp_path / "other", vocab=300)  # resized embeddings and lm_head
    state = load_state(other)
    state["model.layers.0.self_attn.q_proj.weight"][0, 0] = math.nan  # reading data would fail differently
    save_model(other, state, other)
    cache = tmp_path / ".lfcache"  # conftest points the hash cache here
    with pytest.raises(BaseMismatchError, match="lm_head.weight.*and 1 more") as info:
        loraformat.extract(llama_base, other, tmp_path / "x.safetensors", rank=4)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "x.safetensors").exists()
    assert not any(cache.rglob("*.json"))  # nothing was hashed: no tensor data was read


def test_changed_non_targets_are_listed_or_saved_whole(tmp_path, llama32, tuned32):
    listed = loraformat.extract(llama32, tuned32, tmp_path / "x.safetensors", rank=2)
    assert [(c["name"], c["saved"]) for c in listed.changed] == [("model.norm.weight", False)]
    assert any("model.norm.weight" in w for w in listed.warnings)
    out = tmp_path / "saved.safetensors"
    saved = loraformat.extract(llama32, tuned32, out, rank=2, save_changed=True)
    assert saved.changed[0]["saved"]
    with open_adapter(out) as a:
        assert a.meta.modules_to_save == ["model.norm"]
        assert a.meta.saved_tensors == {"base_model.model.model.norm.weight": "model.norm.weight"}
    merged = tmp_path / "merged"
    loraformat.merge(llama32, [out], merged)
    assert torch.equal(load_dir(merged)["model.norm.weight"], load_state(tuned32)["model.norm.weight"])


def test_output_is_stamped_with_hashes_and_provenance(tmp_path, llama32, tuned32):
    out = tmp_path / "x.safetensors"
    result = loraformat.extract(llama32, tuned32, out, rank=3, targets="q_proj,v_proj")
    assert {m.rsplit(".", 1)[1] for m in result.modules} == {"q_proj", "v_proj"}
    assert sum(c["name"].endswith("proj.weight") for c in result.changed) == 10  # other projections, listed
    report = loraformat.validate(out, base=llama32, level="base")
    assert report.ok(), report.findings
    with open_adapter(out) as a:
        meta = a.meta
    base_h, tuned_h = hash_base(llama32), hash_base(tuned32)
    assert meta.base_model.content_hash == base_h.content_hash
    assert set(meta.base_model.target_digests) == {m + ".weight" for m in result.modules}
    prov = meta.provenance
    assert prov is not None and prov.method == "extract" and prov.rank == 3
    assert prov.details["tuned_model"]["content_hash"] == tuned_h.content_hash
    assert prov.details["ranks"] == {m: 3 for m in result.modules}
    assert set(prov.details["energy_kept"]) == set(result.modules)
    assert all(e.alpha == e.rank == 3 and meta.scale(m) == 1.0 for m, e in meta.modules.items())
    assert json.loads(json.dumps(result.to_json()))["max_relative_error"] == result.max_relative_error


def test_shards_and_layout_may_differ(tmp_path, llama_base, llama_base_sharded, peft_adapters):
    """Tensors are matched by name: a sharded base and a single-file fine-tune give the same adapter data."""
    merged = tmp_path / "merged"
    loraformat.merge(llama_base, [peft_adapters["plain"]], merged)
    a = loraformat.extract(llama_base, merged, tmp_path / "a.safetensors", rank=8)
    b = loraformat.extract(llama_base_sharded, merged, tmp_path / "b.safetensors", rank=8)
    assert a.content_hash == b.content_hash


def test_randomized_path_on_wider_modules_is_near_optimal(tmp_path):
    base = make_llama_base(tmp_path / "wide", dtype="float32", layers=1, hidden=384, intermediate=1024)
    tuned = make_tuned(base, tmp_path / "wide-tuned", rate=0.9, scale=0.2, modules=LINEAR)
    result = loraformat.extract(base, tuned, tmp_path / "x.safetensors", rank=8)
    seen = deltas(base, tuned)
    assert {m["method"] for m in result.modules.values()} == {"randomized"}
    for module, row in result.modules.items():
        S2 = torch.linalg.svdvals(seen[module + ".weight"]).square()
        optimum = float((S2[8:].sum() / S2.sum()).sqrt())
        assert row["relative_error"] <= 1.01 * optimum, module


def test_schema_requires_the_extract_details(tmp_path, llama32, tuned32):
    from loraformat.errors import SchemaError
    from loraformat.schema import validate_document

    out = tmp_path / "x.safetensors"
    loraformat.extract(llama32, tuned32, out, rank=2, targets="q_proj")
    with open_adapter(out) as a:
        document = a.meta.to_dict()
    validate_document(document)
    for key in ("tuned_model", "ranks", "energy_kept", "relative_error"):
        broken = json.loads(json.dumps(document))
        del broken["provenance"]["details"][key]
        with pytest.raises(SchemaError):
            validate_document(broken)
    broken = json.loads(json.dumps(document))
    broken["provenance"]["details"]["energy_kept"]["model.layers.0.self_attn.q_proj"] = 1.5
    with pytest.raises(SchemaError):
        validate_document(broken)
