"""compose / rescale / spectrum on real PEFT adapters, checked against the deltas PEFT itself builds (fp64)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraformat.adapter import open_adapter
from loraformat.composition import compose
from loraformat.conversion import convert
from loraformat.errors import ComposeError, UsageError
from loraformat.rescaling import rescale
from tests.compose_helpers import (
    VARIANTS,
    as_peft_dir,
    data_hash,
    listing,
    parents,
    peft_deltas,
    rel_err,
    weighted_sum,
)
from tests.fixtures import LLAMA_TARGETS, load_base, make_llama_base, make_peft_adapter

WEIGHTS = [1.0, -0.5, 2.0]  # a negative weight: task negation


# --- exact methods ---------------------------------------------------------------------------------------------


def test_cat_is_the_exact_weighted_sum(peft_adapters, deltas_of, tmp_path):
    out = tmp_path / "cat.safetensors"
    result = compose(parents(peft_adapters), out, method="cat", weights=WEIGHTS)
    expected = weighted_sum([deltas_of(p) for p in parents(peft_adapters)], WEIGHTS)
    got = deltas_of(as_peft_dir(out, tmp_path))
    assert set(got) == set(expected) == set(result.modules)  # modules only some adapters target included
    for module, delta in expected.items():
        assert rel_err(got[module], delta) < 1e-6, module
    meta = open_adapter(out).meta
    metas = [open_adapter(p).meta for p in parents(peft_adapters)]
    assert meta.scaling == "alpha/r"
    for module, entry in meta.modules.items():
        assert entry.rank == sum(m.modules[module].rank for m in metas if module in m.modules)
        assert entry.alpha == entry.rank  # scale exactly 1
    assert result.parameters == sum(t.numel() for t in load_file(out).values())


def test_linear_is_exact_and_never_wider_than_the_module(peft_adapters, deltas_of, tmp_path):
    names = ["plain"] * 9 + ["rslora"]  # stacked rank 80 > 64 = min(out, in) of every module
    weights = [0.1 * (i + 1) * (-1) ** i for i in range(10)]
    out = tmp_path / "linear.safetensors"
    result = compose([peft_adapters[n] for n in names], out, method="linear", weights=weights)
    expected = weighted_sum([deltas_of(peft_adapters[n]) for n in names], weights)
    got = deltas_of(as_peft_dir(out, tmp_path))
    for module, delta in expected.items():
        assert rel_err(got[module], delta) < 1e-6, module
    assert result.modules["model.layers.0.self_attn.q_proj"]["rank"] == 64  # compacted from 80, losslessly
    assert result.modules["model.layers.0.mlp.down_proj"]["rank"] == 64  # 64 x 160
    assert result.modules["model.layers.0.mlp.up_proj"]["rank"] == 64  # 160 x 64
    assert result.modules["model.layers.0.self_attn.k_proj"]["rank"] == 32  # 32 x 64, 9 x 8 stacked


@pytest.mark.parametrize("rank", [1, 4])
def test_svd_is_the_optimal_truncation_of_the_exact_sum(peft_adapters, deltas_of, tmp_path, rank):
    out = tmp_path / f"svd{rank}.safetensors"
    result = compose(parents(peft_adapters), out, method="svd", weights=WEIGHTS, rank=rank)
    expected = weighted_sum([deltas_of(p) for p in parents(peft_adapters)], WEIGHTS)
    got = deltas_of(as_peft_dir(out, tmp_path))
    for module, D in expected.items():
        S = torch.linalg.svdvals(D)
        optimal = float(S[rank:].square().sum().sqrt())
        error = float((got[module] - D).norm())
        assert abs(error - optimal) <= 1e-5 * float(D.norm()), module
        torch.testing.assert_close(torch.linalg.svdvals(got[module])[:rank], S[:rank], rtol=1e-5, atol=1e-7)
        kept = float(S[:rank].square().sum() / S.square().sum())
        assert result.modules[module]["energy_kept"] == pytest.approx(kept, rel=1e-6)
        assert result.modules[module]["rank"] == rank


def test_svd_auto_energy_picks_the_smallest_sufficient_rank(peft_adapters, deltas_of, tmp_path):
    out = tmp_path / "auto.safetensors"
    result = compose(parents(peft_adapters), out, method="svd", weights=WEIGHTS, rank="auto:0.9")
    expected = weighted_sum([deltas_of(p) for p in parents(peft_adapters)], WEIGHTS)
    meta = open_adapter(out).meta
    assert meta.provenance.rank == "auto:0.9"
    ranks = set()
    for module, D in expected.items():
        energy = torch.cumsum(torch.linalg.svdvals(D).square(), 0)
        energy = energy / energy[-1]
        want = int((energy < 0.9).sum()) + 1
        assert meta.modules[module].rank == want, module
        assert result.modules[module]["energy_kept"] == pytest.approx(float(energy[want - 1]), rel=1e-6)
        assert result.modules[module]["energy_kept"] >= 0.9
        ranks.add(want)
    assert meta.provenance.details["energy_kept"] == {m: r["energy_kept"] for m, r in result.modules.items()}


def test_peft_merges_the_composed_adapter_to_base_plus_the_exact_sum(
    peft_adapters, deltas_of, llama32, tmp_path
):
    from peft import PeftModel

    names, weights = ["plain", "rslora", "embedding"], [0.7, -1.3, 0.5]
    out = tmp_path / "mix.safetensors"
    compose([peft_adapters[n] for n in names], out, method="cat", weights=weights)
    expected = weighted_sum([deltas_of(peft_adapters[n]) for n in names], weights)
    merged = PeftModel.from_pretrained(load_base(llama32), as_peft_dir(out, tmp_path)).merge_and_unload()
    merged_sd = merged.state_dict()
    base_sd = load_base(llama32).state_dict()
    # the embedding adapter also saved its (bf16-valued) embedding base layer, which PEFT loads in place
    base_sd["model.embed_tokens.weight"] = load_file(
        peft_adapters["embedding"] / "adapter_model.safetensors"
    )["base_model.model.model.embed_tokens.base_layer.weight"].float()
    for module, delta in expected.items():
        key = f"{module}.weight"
        delta = delta.T if module.endswith("embed_tokens") else delta
        torch.testing.assert_close(
            merged_sd[key].double(), base_sd[key].double() + delta, rtol=1e-5, atol=1e-6
        )
    untouched = "model.layers.0.input_layernorm.weight"
    assert torch.equal(merged_sd[untouched], base_sd[untouched])


def test_gpt2_fan_in_fan_out_and_saved_biases(peft_adapters, gpt2_base, tmp_path):
    from peft import PeftModel

    names, weights = ["gpt2", "gpt2_bias_all"], [1.0, -0.5]
    out = tmp_path / "gpt2mix.safetensors"
    compose([peft_adapters[n] for n in names], out, method="cat", weights=weights)
    meta = open_adapter(out).meta
    assert meta.bias == "all" and all(e.fan_in_fan_out for e in meta.modules.values())
    deltas = weighted_sum([peft_deltas(peft_adapters[n], gpt2_base) for n in names], weights)
    merged = PeftModel.from_pretrained(load_base(gpt2_base), as_peft_dir(out, tmp_path)).merge_and_unload()
    merged_sd, base_sd = merged.state_dict(), load_base(gpt2_base).state_dict()
    for module, delta in deltas.items():
        key = f"{module}.weight"  # Conv1D stores (in, out)
        torch.testing.assert_close(
            merged_sd[key].double(), base_sd[key].double() + delta.T, rtol=1e-5, atol=1e-6
        )
    saved = load_file(peft_adapters["gpt2_bias_all"] / "adapter_model.safetensors")
    assert torch.equal(
        merged_sd["transformer.h.0.ln_1.bias"], saved["base_model.model.transformer.h.0.ln_1.bias"]
    )


def test_conv_modules_compose_exactly(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.lin = torch.nn.Linear(8, 4)

    dirs = []
    for i, kwargs in enumerate([dict(r=2, lora_alpha=4), dict(r=3, lora_alpha=5, use_rslora=True)]):
        torch.manual_seed(10 + i)
        model = get_peft_model(
            Net(), LoraConfig(target_modules=["conv", "lin"], init_lora_weights=False, **kwargs)
        )
        model.save_pretrained(tmp_path / f"conv{i}")
        dirs.append(tmp_path / f"conv{i}")
    out = tmp_path / "conv.safetensors"
    compose(dirs, out, method="cat", weights=[1.0, -2.0])
    entry = open_adapter(out).meta.modules["conv"]
    assert entry.kind == "conv" and entry.rank == 5 and entry.kernel_size == [3, 3]
    expected = weighted_sum([peft_deltas(d, None, model=Net()) for d in dirs], [1.0, -2.0])
    merged = PeftModel.from_pretrained(Net(), as_peft_dir(out, tmp_path)).merge_and_unload()
    torch.testing.assert_close(
        merged.conv.weight.double(),
        Net().conv.weight.double() + expected["conv"].reshape(8, 3, 3, 3),
        rtol=1e-5,
        atol=1e-6,
    )
    svd_out = tmp_path / "conv_svd.safetensors"
    compose(dirs, svd_out, method="svd", rank=2)
    a = load_file(svd_out)
    assert a["base_model.model.conv.lora_A.weight"].shape == (2, 3, 3, 3)
    assert a["base_model.model.conv.lora_B.weight"].shape == (8, 2, 1, 1)


# --- TIES / DARE -----------------------------------------------------------------------------------------------


def test_ties_at_full_rank_equals_peft_ties_of_the_dense_deltas(peft_adapters, deltas_of, tmp_path):
    from peft.utils import merge_utils

    names = ["plain", "rslora"]
    out = tmp_path / "ties.safetensors"
    compose(
        [peft_adapters[n] for n in names], out, method="ties", density=0.5, rank=64
    )  # 64 = full rank here
    got = deltas_of(as_peft_dir(out, tmp_path))
    ds = [deltas_of(peft_adapters[n]) for n in names]
    for module in got:
        tasks = [d.get(module, torch.zeros_like(got[module])) for d in ds]
        want = merge_utils.ties(tasks, torch.ones(len(tasks), dtype=torch.float64), 0.5)
        assert rel_err(got[module], want) < 1e-5, module


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_ties_and_dare_are_deterministic_under_a_seed(peft_adapters, tmp_path, method):
    run = {}
    for tag, seed in (("a", 3), ("b", 3), ("c", 4)):
        run[tag] = compose(
            parents(peft_adapters, ["plain", "patterns"]),
            tmp_path / f"{tag}.safetensors",
            method=method,
            density=0.4,
            seed=seed,
            rank=4,
        )
    assert run["a"].content_hash == run["b"].content_hash
    if method == "ties":  # no randomness: the seed changes nothing
        assert run["a"].content_hash == run["c"].content_hash
    else:
        assert run["a"].content_hash != run["c"].content_hash
        assert open_adapter(run["a"].output).meta.provenance.details["seed"] == 3


# --- provenance, bases, refusals -------------------------------------------------------------------------------


def test_provenance_lists_parents_method_rank_and_details(peft_adapters, tmp_path):
    out = tmp_path / "prov.safetensors"
    compose(
        parents(peft_adapters),
        out,
        method="dare_linear",
        weights=WEIGHTS,
        rank=4,
        density=0.7,
        seed=11,
        name="mixture",
    )
    meta = open_adapter(out).meta
    prov = meta.provenance
    assert meta.name == "mixture" and prov.method == "dare_linear" and prov.rank == 4
    assert [(p.name, p.weight) for p in prov.parents] == list(zip(VARIANTS, WEIGHTS, strict=True))
    assert [p.content_hash for p in prov.parents] == [
        data_hash(peft_adapters[v] / "adapter_model.safetensors") for v in VARIANTS
    ]
    assert prov.details["density"] == 0.7 and prov.details["seed"] == 11
    assert set(prov.details["energy_kept"]) == set(meta.modules)
    assert meta.content_hash == data_hash(out)


def _stamped(src: Path, dst: Path, **kwargs) -> Path:
    convert(src, dst, **kwargs)
    return dst


def test_base_identity_is_kept_when_parents_agree(peft_adapters, llama_base, tmp_path):
    a = _stamped(peft_adapters["plain"], tmp_path / "a.safetensors", base=llama_base, base_id="org/llama")
    b = _stamped(peft_adapters["rslora"], tmp_path / "b.safetensors", base=llama_base, base_id="org/llama")
    result = compose([a, b], tmp_path / "ab.safetensors", method="svd", rank=4)
    assert result.base_kept and not result.forced
    base, ref = open_adapter(result.output).meta.base_model, open_adapter(a).meta.base_model
    assert base.id == "org/llama" and base.content_hash == ref.content_hash
    assert base.structure_hash == ref.structure_hash and base.hash_algorithm == ref.hash_algorithm
    assert base.target_digests == ref.target_digests  # plain targets a superset of rslora's
    assert len(base.target_digests) == 2 * len(LLAMA_TARGETS)


def test_different_bases_are_refused_unless_forced(peft_adapters, tmp_path):
    a = _stamped(peft_adapters["plain"], tmp_path / "a.safetensors", base_id="org/one")
    b = _stamped(peft_adapters["rslora"], tmp_path / "b.safetensors", base_id="org/other")
    before = listing(tmp_path)
    with pytest.raises(ComposeError, match="different bases"):
        compose([a, b], tmp_path / "ab.safetensors", method="cat")
    assert listing(tmp_path) == before
    result = compose([a, b], tmp_path / "ab.safetensors", method="cat", force=True)
    meta = open_adapter(result.output).meta
    assert result.forced and not result.base_kept and meta.base_model.id is None
    assert meta.provenance.details["forced_different_bases"] is True


def test_dora_is_refused(peft_adapters, tmp_path):
    with pytest.raises(ComposeError, match="DoRA"):
        compose(parents(peft_adapters, ["plain", "dora"]), tmp_path / "x.safetensors", method="cat")
    with pytest.raises(ComposeError, match="DoRA"):
        rescale(peft_adapters["dora"], tmp_path / "x.safetensors", scale=2.0)
    assert listing(tmp_path) == []


def test_saved_tensors_pass_through_only_when_unambiguous(peft_adapters, llama_base, tmp_path):
    out = tmp_path / "mts.safetensors"
    compose(parents(peft_adapters, ["plain", "modules_to_save"]), out, method="cat")
    meta = open_adapter(out).meta
    assert meta.modules_to_save == ["lm_head"]
    key = "base_model.model.lm_head.weight"
    assert torch.equal(
        load_file(out)[key], load_file(peft_adapters["modules_to_save"] / "adapter_model.safetensors")[key]
    )
    other = make_peft_adapter(
        llama_base,
        tmp_path / "mts2",
        seed=2,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
        modules_to_save=["lm_head"],
    )
    with pytest.raises(ComposeError, match="saved tensors"):
        compose([peft_adapters["modules_to_save"], other], tmp_path / "bad.safetensors", method="cat")
    assert not (tmp_path / "bad.safetensors").exists()


def test_lora_biases_add_like_the_weights(peft_adapters, tmp_path):
    out = tmp_path / "bias.safetensors"
    compose(parents(peft_adapters, ["lora_bias", "plain"]), out, method="cat", weights=[2.0, 1.0])
    got = load_file(out)
    src = load_file(peft_adapters["lora_bias"] / "adapter_model.safetensors")
    config = json.loads((peft_adapters["lora_bias"] / "adapter_config.json").read_text())
    s = config["lora_alpha"] / config["r"]
    q = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"
    torch.testing.assert_close(got[q].double(), 2.0 * s * src[q].double(), rtol=1e-6, atol=1e-7)
    k = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.bias"  # only plain adapts k_proj: zero bias
    assert torch.equal(got[k], torch.zeros_like(got[k]))


def test_conflicting_shapes_are_refused(peft_adapters, tmp_path):
    small = make_llama_base(tmp_path / "small", hidden=32, intermediate=64)
    other = make_peft_adapter(small, tmp_path / "small_adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(ComposeError, match="q_proj"):
        compose([peft_adapters["plain"], other], tmp_path / "x.safetensors", method="cat", force=True)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="cat", weights=[1.0]), "weights"),
        (dict(method="svd", rank=0), "positive"),
        (dict(method="svd", rank="auto:1.5"), r"\(0, 1\]"),
        (dict(method="avg"), "unknown method"),
        (dict(method="cat", rank=4), "does not apply"),
        (dict(method="ties"), "density"),
        (dict(method="ties", density=0.0), "density"),
        (dict(method="svd", density=0.5), "density"),
        (dict(method="cat", device="tpu"), "device"),
        (dict(method="cat", weights=[1.0, float("nan")]), "finite"),
    ],
)
def test_bad_arguments_are_usage_errors_and_write_nothing(peft_adapters, tmp_path, kwargs, match):
    with pytest.raises(UsageError, match=match):
        compose(parents(peft_adapters, ["plain", "rslora"]), tmp_path / "x.safetensors", **kwargs)
    assert listing(tmp_path) == []


def test_output_may_not_be_an_input(peft_adapters, tmp_path):
    native = _stamped(peft_adapters["plain"], tmp_path / "a.safetensors")
    data = native.read_bytes()
    with pytest.raises(UsageError, match="input"):
        compose([native, peft_adapters["rslora"]], native, method="cat", overwrite=True)
    assert native.read_bytes() == data
