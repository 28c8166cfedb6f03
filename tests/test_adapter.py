"""open_adapter on every layout, and Adapter.problems() on tensors that disagree with the metadata/config."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraformat.adapter import expected_shapes, open_adapter
from loraformat.constants import METADATA_KEY, PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS, SPEC_VERSION
from loraformat.conversion import adapter_tensors, convert
from loraformat.errors import AdapterError, InputNotFoundError, SchemaError, UnsupportedVersionError
from loraformat.io.native import write_native

Q0 = "model.layers.0.self_attn.q_proj"
PQ0 = PEFT_PREFIX + Q0


@pytest.fixture(scope="module")
def native(peft_adapters, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("native") / "plain.safetensors"
    convert(peft_adapters["plain"], out)
    return out


# --- layouts --------------------------------------------------------------------------------------------------


def test_open_every_layout(peft_adapters, native, tmp_path):
    src = peft_adapters["plain"]
    ref = open_adapter(src)
    assert ref.source_format == "peft" and ref.meta.name == "plain"
    by_file = open_adapter(src / PEFT_WEIGHTS)  # the weights file: its sibling config is used
    assert by_file.source_format == "peft" and by_file.meta.modules == ref.meta.modules

    nat = open_adapter(native)
    assert nat.source_format == "loraformat" and nat.meta.modules == ref.meta.modules

    bare = tmp_path / "bare.safetensors"
    shutil.copyfile(src / PEFT_WEIGHTS, bare)
    config = json.loads((src / PEFT_CONFIG).read_text())
    assert open_adapter(bare, config=config).meta.modules == ref.meta.modules
    assert open_adapter(bare, config=src / PEFT_CONFIG).meta.modules == ref.meta.modules

    convert(native, tmp_path / "ours", to="peft")  # a PEFT dir whose weights are a native file
    ours = open_adapter(tmp_path / "ours")
    assert ours.source_format == "loraformat" and ours.meta.modules == ref.meta.modules


def test_lazy_tensor_access(peft_adapters):
    src = peft_adapters["rslora"]
    raw = load_file(str(src / PEFT_WEIGHTS))
    with open_adapter(src) as adapter:
        keys = adapter.keys(Q0)
        assert (keys.A, keys.B) == (PQ0 + ".lora_A.weight", PQ0 + ".lora_B.weight")
        assert torch.equal(adapter.lora_A(Q0), raw[keys.A]) and torch.equal(adapter.lora_B(Q0), raw[keys.B])
        assert adapter.scale(Q0) == 16 / 8**0.5
        assert adapter.file_size == (src / PEFT_WEIGHTS).stat().st_size
    dora = open_adapter(peft_adapters["dora"])
    assert dora.keys(Q0).magnitude == PQ0 + ".lora_magnitude_vector"
    emb = open_adapter(peft_adapters["embedding"]).keys("model.embed_tokens")
    assert emb.A.endswith(".lora_embedding_A") and emb.B.endswith(".lora_embedding_B")


def test_open_errors_name_the_file(tmp_path, peft_adapters):
    with pytest.raises(InputNotFoundError) as err:
        open_adapter(tmp_path / "nope")
    assert str(err.value).startswith(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFoundError, match="not a PEFT adapter directory"):
        open_adapter(tmp_path / "empty")

    bad = tmp_path / "bad"
    shutil.copytree(peft_adapters["plain"], bad)
    (bad / PEFT_CONFIG).write_text("{not json")
    with pytest.raises(AdapterError) as err:
        open_adapter(bad)
    assert str(err.value).startswith(str(bad / PEFT_CONFIG)) and "not valid JSON" in str(err.value)
    (bad / PEFT_CONFIG).write_text("[1, 2]")
    with pytest.raises(AdapterError, match="not a JSON object"):
        open_adapter(bad)
    (bad / PEFT_CONFIG).unlink()
    with pytest.raises(AdapterError, match="no loraformat metadata"):
        open_adapter(bad)


# --- problems(): native files written without the write-time check -------------------------------------------


def _variant(native: Path):
    adapter = open_adapter(native)
    return copy.deepcopy(adapter.meta), dict(adapter_tensors(adapter))


def _problems(tmp_path: Path, meta, tensors) -> tuple[Path, list[tuple[str, str, str]]]:
    path = tmp_path / "broken.safetensors"
    write_native(path, meta, tensors, check=False, overwrite=True)
    return path, open_adapter(path, check=False).problems()


def _codes(problems) -> set[tuple[str, str]]:
    return {(code, where) for code, where, _ in problems}


def test_consistent_adapter_has_no_problems(native, peft_adapters):
    assert open_adapter(native).problems() == []
    for name, path in peft_adapters.items():
        assert open_adapter(path).problems() == [], name


def test_missing_b(native, tmp_path):
    meta, tensors = _variant(native)
    del tensors[PQ0 + ".lora_B.weight"]
    path, problems = _problems(tmp_path, meta, tensors)
    assert _codes(problems) == {("missing-tensor", Q0)}
    assert "lora_B" in problems[0][2]
    with pytest.raises(AdapterError) as err:
        open_adapter(path)
    assert str(err.value).startswith(str(path)) and "lora_B" in str(err.value)


def test_rank_mismatch_between_a_and_b(native, tmp_path):
    meta, tensors = _variant(native)
    tensors[PQ0 + ".lora_B.weight"] = torch.zeros(64, 4, dtype=torch.bfloat16)
    _, problems = _problems(tmp_path, meta, tensors)
    assert _codes(problems) == {("rank-mismatch", Q0)}
    assert "lora_A rank 8 != lora_B rank 4" in problems[0][2]


def test_metadata_rank_differs_from_tensors(native, tmp_path):
    meta, tensors = _variant(native)
    meta.modules[Q0].rank = 16
    _, problems = _problems(tmp_path, meta, tensors)
    assert _codes(problems) == {("metadata-rank", Q0)}
    assert "says rank 16 but the tensors have rank 8" in problems[0][2]


def test_config_rank_differs_from_tensors(peft_adapters, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(peft_adapters["plain"], src)
    config = json.loads((src / PEFT_CONFIG).read_text())
    config["rank_pattern"] = {"q_proj": 16}
    (src / PEFT_CONFIG).write_text(json.dumps(config))
    problems = open_adapter(src, check=False).problems()
    assert {c for c, _ in _codes(problems)} == {"metadata-rank"}
    assert len(problems) == 2 and "config says rank 16" in problems[0][2]
    with pytest.raises(AdapterError) as err:
        open_adapter(src)
    assert str(err.value).startswith(str(src)) and "(and 1 more)" in str(err.value)


def test_wrong_ndim(native, tmp_path):
    meta, tensors = _variant(native)
    tensors[PQ0 + ".lora_A.weight"] = tensors[PQ0 + ".lora_A.weight"].reshape(8, 64, 1)
    _, problems = _problems(tmp_path, meta, tensors)
    assert _codes(problems) == {("wrong-ndim", Q0)}


def test_shape_and_dtype_and_unexpected(native, tmp_path):
    meta, tensors = _variant(native)
    meta.modules[Q0].in_features = 32  # A is (8, 64)
    tensors["base_model.model.stray.weight"] = torch.zeros(3)
    tensors["not_peft_at_all"] = torch.zeros(2)
    k = "model.layers.0.self_attn.k_proj"
    tensors[PEFT_PREFIX + k + ".lora_A.weight"] = torch.zeros(8, 64, dtype=torch.int32)
    _, problems = _problems(tmp_path, meta, tensors)
    assert _codes(problems) == {
        ("shape-mismatch", Q0),
        ("bad-dtype", k),
        ("unexpected-tensor", "base_model.model.stray.weight"),
        ("unexpected-tensor", "not_peft_at_all"),
    }


def test_dora_and_lora_bias_vectors(peft_adapters, tmp_path):
    for variant, key, role in (
        ("dora", ".lora_magnitude_vector", "lora_magnitude_vector"),
        ("lora_bias", ".lora_B.bias", "lora_B.bias"),
    ):
        adapter = open_adapter(peft_adapters[variant])
        meta, tensors = copy.deepcopy(adapter.meta), dict(adapter_tensors(adapter))
        del tensors[PQ0 + key]
        _, problems = _problems(tmp_path, meta, tensors)
        assert _codes(problems) == {("missing-tensor", Q0)} and role in problems[0][2]
        tensors[PQ0 + key] = torch.zeros(63)
        _, problems = _problems(tmp_path, meta, tensors)
        assert _codes(problems) == {("shape-mismatch", Q0)}


def test_peft_file_with_missing_b_and_stray_keys(peft_adapters, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(peft_adapters["plain"], src)
    tensors = load_file(str(src / PEFT_WEIGHTS))
    del tensors[PQ0 + ".lora_B.weight"]
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_X.weight"] = torch.zeros(2)
    save_file(tensors, str(src / PEFT_WEIGHTS), metadata={"format": "pt"})
    problems = open_adapter(src, check=False).problems()
    assert ("missing-tensor", Q0) in _codes(problems)
    assert ("unexpected-tensor", "base_model.model.model.layers.0.mlp.up_proj.lora_X.weight") in _codes(
        problems
    )


def test_expected_shapes():
    from loraformat.metadata import ModuleEntry

    conv = ModuleEntry(
        kind="conv", rank=2, alpha=4, in_features=3, out_features=8, base_tensor="w", kernel_size=[3, 3]
    )
    assert expected_shapes(conv) == ((2, 3, 3, 3), (8, 2, 1, 1))
    lin = ModuleEntry(
        kind="linear", rank=4, alpha=8, in_features=64, out_features=192, base_tensor="w", fan_in_fan_out=True
    )
    assert expected_shapes(lin) == ((4, 64), (192, 4)) and lin.base_shape == (64, 192)


# --- native metadata: versioning and schema -------------------------------------------------------------------


def _rewrite_document(src: Path, dst: Path, edit) -> None:
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    document = json.loads(metadata[METADATA_KEY])
    edit(document)
    metadata[METADATA_KEY] = json.dumps(document)
    save_file(tensors, str(dst), metadata=metadata)


def test_newer_major_refused_newer_minor_read(native, tmp_path):
    newer = tmp_path / "v2.safetensors"
    _rewrite_document(native, newer, lambda d: d.update(spec_version="2.0"))
    with pytest.raises(UnsupportedVersionError) as err:
        open_adapter(newer)
    assert "2.0" in str(err.value) and SPEC_VERSION in str(err.value) and str(newer) in str(err.value)

    minor = tmp_path / "v1_9.safetensors"
    _rewrite_document(native, minor, lambda d: d.update(spec_version="1.9", future_field={"x": 1}))
    adapter = open_adapter(minor)
    assert adapter.meta.extra["future_field"] == {"x": 1}


def test_schema_violation(native, tmp_path):
    bad = tmp_path / "bad.safetensors"
    _rewrite_document(native, bad, lambda d: d["modules"][Q0].update(rank="eight"))
    with pytest.raises(SchemaError) as err:
        open_adapter(bad)
    assert str(err.value).startswith(str(bad)) and "rank" in str(err.value)
