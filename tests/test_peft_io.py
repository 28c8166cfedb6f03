"""PEFT interop with real PEFT as the oracle: PEFT dir -> native -> PEFT dir is lossless for every variant,
pattern resolution matches what PEFT's LoraLayers hold, bare PEFT .safetensors with a config, pickles."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import load_peft_weights, set_peft_model_state_dict

from loraformat.adapter import open_adapter
from loraformat.cli.main import cli
from loraformat.constants import PEFT_CONFIG, PEFT_WEIGHTS
from loraformat.conversion import convert
from loraformat.errors import AdapterError, PickleRefusedError
from loraformat.io.peft import metadata_from_peft, peft_config_from_metadata, resolve_pattern
from loraformat.io.tensors import SafetensorsSource
from tests.fixtures import (
    LLAMA_TARGETS,
    PEFT_VARIANTS,
    load_base,
    load_conv_base,
    make_conv_base,
    make_peft_adapter,
    peft_adapter_for_model,
)

LORA_FIELDS = {f.name for f in dataclasses.fields(LoraConfig)}


def _load_peft(model: Any, adapter_dir: Path) -> PeftModel:
    """PeftModel.from_pretrained, failing on any missing or unexpected adapter key."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, adapter_dir)
    bad = [
        str(w.message)
        for w in caught
        if "missing" in str(w.message).lower()
        or "unexpected" in str(w.message).lower()
        or "unknown" in str(w.message).lower()
    ]
    assert not bad, bad
    # from_pretrained only warns about missing keys; reload the same weights to see unexpected ones too
    result = set_peft_model_state_dict(peft_model, load_peft_weights(str(adapter_dir)))
    assert not result.unexpected_keys, result.unexpected_keys
    return peft_model


def _outcome(model: Any, adapter_dir: Path) -> dict[str, Any]:
    """What PEFT makes of an adapter dir: per-layer r/scaling/fan_in_fan_out, the adapter state, and the merged
    weights (or, where PEFT refuses to merge, its output on a fixed input)."""
    peft_model = _load_peft(model, adapter_dir)
    layers = {
        name.removeprefix("base_model.model."): (
            m.r["default"],
            m.scaling["default"],
            getattr(m, "fan_in_fan_out", False),
        )
        for name, m in peft_model.named_modules()
        if isinstance(m, LoraLayer) and "default" in m.r
    }
    state = {k: v.clone() for k, v in peft_model.state_dict().items()}
    try:
        merged = peft_model.merge_and_unload().state_dict()
    except RuntimeError:  # e.g. lora_bias on a layer without bias: compare outputs instead
        with torch.no_grad():
            merged = {"output": peft_model(torch.arange(12).reshape(2, 6)).logits}
    return {"layers": layers, "state": state, "merged": merged}


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["layers"] == b["layers"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    assert a["merged"].keys() == b["merged"].keys()
    for k in a["merged"]:
        assert torch.equal(a["merged"][k], b["merged"][k]), k


@pytest.fixture(scope="module")
def reference(peft_adapters, base_of):
    """PEFT's own outcome for every original adapter, computed once."""
    cache: dict[str, dict[str, Any]] = {}

    def get(variant: str) -> dict[str, Any]:
        if variant not in cache:
            cache[variant] = _outcome(load_base(base_of(variant)), peft_adapters[variant])
        return cache[variant]

    return get


@pytest.mark.parametrize("with_base", [False, True], ids=["no-base", "base"])
@pytest.mark.parametrize("variant", sorted(PEFT_VARIANTS))
def test_roundtrip_is_lossless(variant, with_base, peft_adapters, base_of, reference, tmp_path):
    src = peft_adapters[variant]
    native = tmp_path / "a.safetensors"
    out = tmp_path / "peft"
    convert(src, native, base=base_of(variant) if with_base else None)
    convert(native, out, to="peft")

    config = json.loads((out / PEFT_CONFIG).read_text())
    assert set(config) <= LORA_FIELDS, set(config) - LORA_FIELDS  # older PEFT raises on unknown keys
    assert sorted(config["target_modules"]) == sorted(open_adapter(src).modules)
    _assert_same(reference(variant), _outcome(load_base(base_of(variant)), out))

    # the native file itself, as adapter_model.safetensors beside the generated config, loads unchanged
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copyfile(native, plain / PEFT_WEIGHTS)
    meta = open_adapter(native).meta
    (plain / PEFT_CONFIG).write_text(json.dumps(peft_config_from_metadata(meta)))
    _assert_same(reference(variant), _outcome(load_base(base_of(variant)), plain))
    assert (out / PEFT_WEIGHTS).read_bytes() == native.read_bytes()

    # and the loraformat metadata of the result equals the first conversion's
    assert open_adapter(out).meta.to_dict() == meta.to_dict()


def test_metadata_records_what_peft_does(peft_adapters):
    meta = open_adapter(peft_adapters["rslora"]).meta
    assert meta.scaling == "alpha/sqrt(r)"
    assert open_adapter(peft_adapters["dora"]).meta.dora
    assert open_adapter(peft_adapters["lora_bias"]).meta.lora_bias
    emb = open_adapter(peft_adapters["embedding"]).meta
    assert emb.modules["model.embed_tokens"].kind == "embedding"
    assert emb.modules["model.embed_tokens"].base_shape == (256, 64)
    assert emb.saved_tensors == {
        "base_model.model.model.embed_tokens.base_layer.weight": "model.embed_tokens.weight"
    }
    mts = open_adapter(peft_adapters["modules_to_save"]).meta
    assert mts.modules_to_save == ["lm_head"]
    assert mts.saved_tensors == {"base_model.model.lm_head.weight": "lm_head.weight"}
    bias_all = open_adapter(peft_adapters["gpt2_bias_all"]).meta
    assert bias_all.bias == "all"
    assert (
        bias_all.saved_tensors["base_model.model.transformer.h.0.attn.c_attn.base_layer.bias"]
        == "transformer.h.0.attn.c_attn.bias"
    )
    assert (
        bias_all.saved_tensors["base_model.model.transformer.h.1.mlp.c_fc.bias"]
        == "transformer.h.1.mlp.c_fc.bias"
    )
    layers = open_adapter(peft_adapters["layers"]).meta
    assert sorted(layers.modules) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    gpt2 = open_adapter(peft_adapters["gpt2"]).meta
    assert all(m.fan_in_fan_out for m in gpt2.modules.values())
    assert gpt2.modules["transformer.h.0.attn.c_attn"].base_shape == (64, 192)


# --- rank_pattern / alpha_pattern: compare with the r and scaling PEFT's LoraLayers hold ---------------------

TRICKY = {
    "first-match-wins": dict(
        target_modules=["q_proj", "v_proj"],
        r=8,
        lora_alpha=16,
        rank_pattern={"q_proj": 2, "layers.1.self_attn.q_proj": 6},
        alpha_pattern={"layers.1.self_attn.v_proj": 3, "v_proj": 5},
    ),
    "suffix": dict(
        target_modules=["down_proj", "up_proj"],
        r=4,
        lora_alpha=8,
        rank_pattern={"mlp.down_proj": 3},
        alpha_pattern={"1.mlp.up_proj": 12.5},
    ),
    "regex": dict(
        target_modules=LLAMA_TARGETS,
        r=4,
        lora_alpha=8,
        rank_pattern={r"layers\.[01]\.self_attn\.(k|v)_proj": 2, r".*\.1\..*_proj": 6},
        alpha_pattern={r".*\.1\..*": 7},
    ),
    "no-partial-name-match": dict(
        target_modules=["q_proj", "o_proj"],
        r=4,
        lora_alpha=8,
        rank_pattern={"proj": 2, "_proj": 3, "o_proj": 5},
    ),
    "rslora-patterns": dict(
        target_modules=["q_proj", "k_proj"],
        r=4,
        lora_alpha=8,
        use_rslora=True,
        rank_pattern={"k_proj": 9},
        alpha_pattern={"layers.0.self_attn.q_proj": 3},
    ),
}


@pytest.mark.parametrize("case", sorted(TRICKY))
def test_pattern_resolution_matches_peft(case, llama_base, tmp_path):
    kwargs = TRICKY[case]
    src = make_peft_adapter(llama_base, tmp_path / "src", **kwargs)
    # PEFT saves the config with sorted keys; put the patterns back in the order they were created with, so
    # that "first match wins" is exercised exactly as PEFT applied it
    config = json.loads((src / PEFT_CONFIG).read_text())
    config["rank_pattern"] = dict(kwargs.get("rank_pattern", {}))
    config["alpha_pattern"] = dict(kwargs.get("alpha_pattern", {}))
    (src / PEFT_CONFIG).write_text(json.dumps(config))

    peft_model = _load_peft(load_base(llama_base), src)
    meta = open_adapter(src).meta
    held = {
        n.removeprefix("base_model.model."): m
        for n, m in peft_model.named_modules()
        if isinstance(m, LoraLayer) and "default" in m.r
    }
    assert sorted(held) == sorted(meta.modules)
    for name, module in held.items():
        assert meta.modules[name].rank == module.r["default"], name
        assert meta.scale(name) == module.scaling["default"], name
    assert len({m.rank for m in meta.modules.values()}) > 1  # the case really has per-module values

    # our anchored patterns make PEFT rebuild the very same table
    out = tmp_path / "out"
    convert(src, tmp_path / "a.safetensors")
    convert(tmp_path / "a.safetensors", out, to="peft")
    again = _load_peft(load_base(llama_base), out)
    for name, module in again.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.r:
            key = name.removeprefix("base_model.model.")
            assert (module.r["default"], module.scaling["default"]) == (
                held[key].r["default"],
                held[key].scaling["default"],
            ), key


def test_resolve_pattern_rules():
    assert resolve_pattern({"q_proj": 2, "layers.0.q_proj": 3}, "model.layers.0.q_proj", 8) == 2
    assert resolve_pattern({"layers.0.q_proj": 3, "q_proj": 2}, "model.layers.0.q_proj", 8) == 3
    assert resolve_pattern({"proj": 2}, "model.layers.0.q_proj", 8) == 8
    assert resolve_pattern({"model.layers.0.q_proj": 5}, "model.layers.0.q_proj", 8) == 5
    assert resolve_pattern({r"layers\.\d+\.q_proj": 5}, "model.layers.17.q_proj", 8) == 5
    assert resolve_pattern({}, "x", 8) == 8


def test_anchored_patterns_do_not_leak_to_suffix_modules():
    """A module whose full path is a dotted suffix of another's must get a pattern matching only itself."""
    from loraformat.metadata import AdapterMetadata, ModuleEntry

    def entry(r: int) -> ModuleEntry:
        return ModuleEntry(kind="linear", rank=r, alpha=8, in_features=4, out_features=4, base_tensor="w")

    meta = AdapterMetadata(modules={"a.q": entry(4), "x.a.q": entry(8), "y.a.q": entry(8)})
    config = peft_config_from_metadata(meta)
    assert config["r"] == 8
    for name, m in meta.modules.items():
        assert resolve_pattern(config["rank_pattern"], name, config["r"]) == m.rank, name


# --- fan_in_fan_out: PEFT decides by layer type, convert --base by the base's weight layout ------------------


@pytest.mark.parametrize("variant,wrong,right", [("gpt2", False, True), ("plain", True, False)])
def test_fan_in_fan_out_corrected_from_base(
    variant, wrong, right, peft_adapters, base_of, reference, tmp_path
):
    src = tmp_path / "src"
    shutil.copytree(peft_adapters[variant], src)
    config = json.loads((src / PEFT_CONFIG).read_text())
    config["fan_in_fan_out"] = wrong  # PEFT corrects this per layer (Conv1D -> True, nn.Linear -> False)
    (src / PEFT_CONFIG).write_text(json.dumps(config))
    native = tmp_path / "a.safetensors"
    convert(src, native, base=base_of(variant))
    modules = open_adapter(native).modules
    assert {m.fan_in_fan_out for m in modules.values()} == {
        right
    }  # square ones included (attn.c_proj, q_proj)
    convert(native, tmp_path / "out", to="peft")
    _assert_same(reference(variant), _outcome(load_base(base_of(variant)), tmp_path / "out"))


# --- conv layers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra", [{}, {"use_dora": True}, {"lora_bias": True}], ids=["plain", "dora", "lora_bias"]
)
def test_conv_roundtrip(extra, tmp_path):
    base = make_conv_base(tmp_path / "base")
    src = peft_adapter_for_model(
        load_conv_base(base),
        tmp_path / "src",
        r=2,
        lora_alpha=4,
        target_modules=["conv", "pw", "seq", "head"],
        **extra,
    )
    meta = open_adapter(src).meta
    assert meta.modules["conv"].kind == "conv" and meta.modules["conv"].kernel_size == [3, 3]
    assert meta.modules["seq"].kernel_size == [3]
    assert meta.modules["conv"].base_shape == (8, 3, 3, 3)
    native = tmp_path / "a.safetensors"
    convert(src, native, base=base)
    convert(native, tmp_path / "out", to="peft")

    def outcome(d: Path) -> dict[str, torch.Tensor]:
        model = _load_peft(load_conv_base(base), d)
        return model.merge_and_unload().state_dict()

    ref, got = outcome(src), outcome(tmp_path / "out")
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


# --- a bare PEFT .safetensors with its config; pickles -------------------------------------------------------


def test_bare_safetensors_with_config(peft_adapters, tmp_path):
    src = peft_adapters["patterns"]
    bare = tmp_path / "weights.safetensors"
    shutil.copyfile(src / PEFT_WEIGHTS, bare)
    with pytest.raises(AdapterError, match="--config"):
        open_adapter(bare)
    adapter = open_adapter(bare, config=src / PEFT_CONFIG)
    assert adapter.source_format == "peft"
    assert adapter.meta.modules == open_adapter(src).meta.modules

    from click.testing import CliRunner

    out = tmp_path / "a.safetensors"
    res = CliRunner().invoke(cli, ["convert", str(bare), "--config", str(src / PEFT_CONFIG), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert open_adapter(out).meta.modules == adapter.meta.modules


@pytest.fixture(scope="module")
def pickle_pair(llama_base, tmp_path_factory):
    """The same adapter (same seed) saved as a pickle and as safetensors."""
    root = tmp_path_factory.mktemp("pickle")
    kwargs = PEFT_VARIANTS["patterns"][1]
    return (
        make_peft_adapter(llama_base, root / "pkl", safe_serialization=False, **kwargs),
        make_peft_adapter(llama_base, root / "st", **kwargs),
    )


def test_pickle_refused_with_instructions(pickle_pair, tmp_path):
    pkl, _ = pickle_pair
    assert (pkl / "adapter_model.bin").exists() and not (pkl / PEFT_WEIGHTS).exists()
    with pytest.raises(PickleRefusedError) as err:
        open_adapter(pkl)
    message = str(err.value)
    assert "adapter_model.bin" in message and "--allow-pickle" in message and "loraformat convert" in message
    with pytest.raises(PickleRefusedError):
        open_adapter(pkl / "adapter_model.bin")

    import subprocess

    proc = subprocess.run(
        [shutil.which("loraformat"), "convert", str(pkl), "-o", str(tmp_path / "x.safetensors")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert (
        proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "--allow-pickle" in proc.stderr
    )
    assert not (tmp_path / "x.safetensors").exists()


def test_pickle_converts_with_allow_pickle(pickle_pair, tmp_path):
    pkl, st = pickle_pair
    res = convert(pkl, tmp_path / "from-pkl.safetensors", allow_pickle=True)
    ref = convert(st, tmp_path / "from-st.safetensors")
    assert res.source_format == "peft-pickle"
    assert res.content_hash == ref.content_hash  # the very same tensors
    a, b = open_adapter(tmp_path / "from-pkl.safetensors"), open_adapter(tmp_path / "from-st.safetensors")
    assert a.meta.modules == b.meta.modules
    assert a.meta.provenance.source_format == "peft-pickle"


def test_malicious_pickle_never_runs(tmp_path, peft_adapters):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    d = tmp_path / "evil"
    d.mkdir()
    shutil.copyfile(peft_adapters["plain"] / PEFT_CONFIG, d / PEFT_CONFIG)
    torch.save({"base_model.model.x.lora_A.weight": Evil()}, d / "adapter_model.bin")
    with pytest.raises(AdapterError, match="weights_only=True"):
        open_adapter(d, allow_pickle=True)
    assert not marker.exists()


# --- config strictness ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("target_parameters", ["mlp.experts.down_proj"], "target_parameters"),
        ("alora_invocation_tokens", [1, 2], "aLoRA"),
        ("layer_replication", [[0, 2]], "layer_replication"),
        ("peft_type", "IA3", "not LORA"),
        ("r", "8", "r must be int"),
        ("lora_alpha", True, "lora_alpha must be"),
        ("rank_pattern", {"q_proj(": 4}, "not a valid regex"),
        ("rank_pattern", {"q_proj": 2.5}, "positive integer"),
        ("bias", "some", "bias 'some'"),
        ("use_dora", "yes", "use_dora must be bool"),
    ],
)
def test_bad_configs_rejected(key, value, message, peft_adapters):
    src = peft_adapters["plain"]
    config = json.loads((src / PEFT_CONFIG).read_text())
    config[key] = value
    infos = SafetensorsSource(src / PEFT_WEIGHTS).infos
    with pytest.raises(AdapterError, match=message):
        metadata_from_peft(config, infos, name="x", path=str(src))
