"""The streaming merge (loraformat.merge) against PEFT's merge_and_unload, on real files."""

from __future__ import annotations

import json
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch

import loraformat
from loraformat.adapter import open_adapter
from loraformat.constants import LayerKind
from loraformat.conversion import convert
from loraformat.errors import (
    BaseMismatchError,
    HashMismatchError,
    OutputExistsError,
    UnsupportedDtypeError,
    UsageError,
)
from loraformat.io.checkpoint import INDEX_NAME, open_checkpoint
from loraformat.merging import engine
from loraformat.merging.api import merge as merge_fn
from loraformat.ops.term import Term
from tests.fixtures import PEFT_VARIANTS, make_peft_adapter
from tests.merge_helpers import (
    assert_close_to,
    assert_within_bound,
    fp64_reference,
    load_dir,
    logits,
    max_ulp,
    peft_logits,
    peft_merged,
    raw_bytes,
)

MERGEABLE = [v for v in PEFT_VARIANTS if v != "lora_bias"]  # PEFT itself refuses lora_bias on bias-less Llama
#: CPU backends (merge(..., backend=)): numpy merges everything but DoRA, which stays on torch
BACKENDS = ["torch", "numpy"]
#: how each fixture is merged: the two kernels on the host, and the torch kernel through the staged device that
#: runs the CUDA orchestration (reader thread, staging buffers, copy-in/out, events) on CPU
MODES = {
    "torch": {"backend": "torch", "device": "cpu"},
    "numpy": {"backend": "numpy", "device": "cpu"},
    "staged": {"backend": "torch", "device": "cpu-staged"},
}
CASES = [(v, m) for v in MERGEABLE for m in MODES if not (m == "numpy" and v == "dora")]


def _merge(base, adapters, out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return merge_fn(base, adapters, out, **kw)


def _nothing_under(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]


def _targets(adapter_path: Path) -> set[str]:
    """Base tensors that receive a delta: module weights, and their biases with lora_bias."""
    meta = open_adapter(adapter_path).meta
    names = {m.base_tensor for m in meta.modules.values()}
    if meta.lora_bias:
        names |= {m.base_tensor.removesuffix(".weight") + ".bias" for m in meta.modules.values()}
    return names


def _changed_by(adapter_path: Path) -> set[str]:
    return _targets(adapter_path) | set(open_adapter(adapter_path).meta.saved_tensors.values())


@pytest.fixture(scope="module")
def merged(tmp_path_factory, peft_adapters, base_of):
    """Each mergeable variant merged once per backend, with small blocks so that tensors span several blocks."""
    root = tmp_path_factory.mktemp("merged")
    mp = pytest.MonkeyPatch()
    mp.setattr(engine, "BLOCK_BYTES", 4096)
    mp.setattr(engine, "CPU_SUBBLOCK_ELEMS", 512)
    try:
        return {
            (v, m): (_merge(base_of(v), [peft_adapters[v]], root / f"{v}-{m}", **MODES[m]), root / f"{v}-{m}")
            for v, m in CASES
        }
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def peft_refs(peft_adapters, base_of):
    """PEFT's merge_and_unload per variant, computed once for both backends."""
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def ref(variant: str) -> dict[str, torch.Tensor]:
        if variant not in cache:
            cache[variant] = peft_merged(base_of(variant), [peft_adapters[variant]])
        return cache[variant]

    return ref


@pytest.mark.parametrize("variant, backend", CASES)
def test_matches_peft_merge_and_unload(variant, backend, merged, peft_refs, peft_adapters, base_of):
    result, out = merged[variant, backend]
    assert (result.backend, result.device) == (MODES[backend]["backend"], MODES[backend]["device"])
    ours = load_dir(out)
    ref = peft_refs(variant)
    base = load_dir(base_of(variant))
    changed = _changed_by(peft_adapters[variant])
    assert set(ours) == set(base)
    for name, tensor in ours.items():
        assert tensor.dtype == base[name].dtype, name
        if name not in ref:  # a tied weight PEFT's state dict does not list twice
            continue
        if name == "model.embed_tokens.weight" and variant == "embedding":
            # PEFT's Embedding.merge rounds the delta to bf16 before adding it (it rounds twice); we round once,
            # so compare with the exactly computed value and with PEFT within the delta's own rounding.
            adapter = open_adapter(peft_adapters[variant])
            module = "model.embed_tokens"
            key = next(k for k, v in adapter.meta.saved_tensors.items() if v == name)
            start = adapter.tensor(key)
            exact = (
                start.double()
                + adapter.scale(module)
                * (adapter.lora_B(module).double() @ adapter.lora_A(module).double()).T
            )
            assert max_ulp(tensor, exact.to(tensor.dtype)) <= 1
            dw = (ref[name].double() - start.double()).abs()
            one_ulp = ref[name].double().abs() * 2**-7  # bf16 keeps 8 significant bits
            assert ((tensor.double() - ref[name].double()).abs() <= one_ulp + dw * 2**-8 + 2**-30).all()
            continue
        assert_close_to(tensor, ref[name], f"{variant}:{name}")
    for name in set(base) - changed:  # untouched tensors: the very same bytes
        assert raw_bytes(out, name) == raw_bytes(base_of(variant), name), name
    assert result.tensors == len(base)
    assert result.tensors_merged == len(_targets(peft_adapters[variant]))
    assert (out / "config.json").read_bytes() == (base_of(variant) / "config.json").read_bytes()


@pytest.mark.parametrize("variant, mode", [(v, m) for v, m in CASES if m != "torch"])
def test_kernels_and_devices_agree(variant, mode, merged, peft_adapters):
    """Every fixture: the numpy kernel and the staged (CUDA-orchestration) device write the same files as the
    torch kernel on the host: every non-weight file, every safetensors header and every untouched tensor byte
    for byte; merged tensors differ at most by the BLAS summation order of the products (ops/kernel.py): one
    ulp of a 16-bit weight, the last bits of an fp32 one."""
    (_, a), (_, b) = merged[variant, "torch"], merged[variant, mode]
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if not name.endswith(".safetensors"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
            continue
        ha, hb = ((d / name).read_bytes() for d in (a, b))
        n = 8 + int.from_bytes(ha[:8], "little")
        assert ha[:n] == hb[:n], name
    changed = _changed_by(peft_adapters[variant])
    ta, tb = load_dir(a), load_dir(b)
    for name, tensor in ta.items():
        if name in changed:
            assert_close_to(tb[name], tensor, f"{variant}:{name}:{mode}")
        else:
            assert raw_bytes(b, name) == raw_bytes(a, name), name


def test_auto_backend_is_numpy_on_cpu_but_torch_for_dora(tmp_path, merged, peft_adapters, llama_base):
    assert _merge(llama_base, [peft_adapters["plain"]], tmp_path / "a").backend == "numpy"
    result = _merge(llama_base, [peft_adapters["dora"]], tmp_path / "d")
    assert result.backend == "torch"
    assert (tmp_path / "d" / "model.safetensors").read_bytes() == (
        merged["dora", "torch"][1] / "model.safetensors"
    ).read_bytes()
    with pytest.raises(UsageError, match="numpy backend cannot merge this: DoRA"):
        _merge(llama_base, [peft_adapters["dora"]], tmp_path / "n", backend="numpy")
    with pytest.raises(UsageError, match="backend must be"):
        _merge(llama_base, [peft_adapters["plain"]], tmp_path / "n", backend="jax")
    _nothing_under(tmp_path / "n")


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_memory_adapter_from_a_pickle(backend, tmp_path, llama_base, peft_adapters):
    """A pickled PEFT adapter (opened with allow_pickle) lives in memory: factors and the saved lm_head come from
    torch tensors, and the result is the same as from the safetensors file."""
    kind, kwargs = PEFT_VARIANTS["modules_to_save"]
    pickled = make_peft_adapter(llama_base, tmp_path / "pickled", safe_serialization=False, **kwargs)
    assert (pickled / "adapter_model.bin").exists()
    with open_adapter(pickled, allow_pickle=True) as adapter:
        result = _merge(llama_base, [adapter], tmp_path / "out", backend=backend)
    assert result.backend == backend and result.tensors_replaced == 1
    _merge(llama_base, [peft_adapters["modules_to_save"]], tmp_path / "ref", backend="torch")
    ours, ref = load_dir(tmp_path / "out"), load_dir(tmp_path / "ref")
    assert set(ours) == set(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)
    assert not torch.equal(ours["lm_head.weight"], load_dir(llama_base)["lm_head.weight"])


@pytest.mark.parametrize("variant", ["plain", "dora", "gpt2"])
def test_transformers_loads_output_with_peft_logits(variant, merged, peft_adapters, base_of):
    _, out = merged[variant, "numpy" if variant != "dora" else "torch"]
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    ours = logits(out, ids)
    theirs = peft_logits(base_of(variant), peft_adapters[variant], ids)
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)


def test_lora_bias_on_a_biasless_layer_is_refused_like_peft(tmp_path, peft_adapters, llama_base):
    with pytest.raises(BaseMismatchError, match="lora_bias needs a base bias"):
        _merge(llama_base, [peft_adapters["lora_bias"]], tmp_path / "out")
    _nothing_under(tmp_path / "out")


@pytest.fixture(scope="module")
def gpt2_dora(tmp_path_factory, gpt2_base):
    """DoRA on GPT-2's Conv1D: one magnitude per column of the stored (in, out) weight."""
    return make_peft_adapter(
        gpt2_base,
        tmp_path_factory.mktemp("gpt2x") / "dora",
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj"],
        fan_in_fan_out=True,
        use_dora=True,
    )


def test_gpt2_column_dora_is_merged_whole(tmp_path, gpt2_dora, gpt2_base, monkeypatch):
    monkeypatch.setattr(engine, "BLOCK_BYTES", 2048)  # smaller than any target: DoRA still sees all rows
    _merge(gpt2_base, [gpt2_dora], tmp_path / "out")
    ours, ref, base = load_dir(tmp_path / "out"), peft_merged(gpt2_base, [gpt2_dora]), load_dir(gpt2_base)
    changed = 0
    for name, tensor in ours.items():
        if name in ref:
            assert_close_to(tensor, ref[name], name)
            changed += not torch.equal(tensor, base[name])
    assert changed == 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_layers_merge_like_peft(backend, tmp_path):
    """A small custom model with Conv2d 1x1 and 3x3 layers, saved as safetensors, with a real PEFT adapter."""
    import torch.nn as nn
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    class ConvNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pw = nn.Conv2d(8, 16, 1)
            self.conv = nn.Conv2d(16, 12, 3, padding=1)
            self.head = nn.Linear(12, 4)

    torch.manual_seed(0)
    net = ConvNet().to(torch.bfloat16)
    base_dir = tmp_path / "convbase"
    base_dir.mkdir()
    base_state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    save_file(base_state, base_dir / "model.safetensors", metadata={"format": "pt"})
    (base_dir / "config.json").write_text("{}")
    peft_model = get_peft_model(
        net, LoraConfig(r=4, lora_alpha=6, target_modules=["pw", "conv"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "convadapter")
    assert _merge(base_dir, [tmp_path / "convadapter"], tmp_path / "out", backend=backend).backend == backend
    ours = load_dir(tmp_path / "out")
    theirs = {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}
    for name in ("pw.weight", "conv.weight"):
        assert not torch.equal(ours[name], base_state[name])
        assert_close_to(ours[name], theirs[name], name)
    for name in ("pw.bias", "conv.bias", "head.weight", "head.bias"):
        assert raw_bytes(tmp_path / "out", name) == raw_bytes(base_dir, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_adapter_is_the_exact_weighted_sum(backend, tmp_path, peft_adapters, llama_base):
    paths = [peft_adapters["plain"], peft_adapters["rslora"], peft_adapters["patterns"]]
    weights = [0.7, -0.3, 1.25]
    result = _merge(llama_base, paths, tmp_path / "out", weights=weights, backend=backend)
    ours = load_dir(tmp_path / "out")
    base = load_dir(llama_base)
    ref = fp64_reference(base, [open_adapter(p) for p in paths], weights)
    for name, tensor in ours.items():
        assert max_ulp(tensor, ref[name].to(tensor.dtype)) <= 1, name
    assert [a["weight"] for a in result.adapters] == weights


def test_sharded_base_keeps_layout_and_index(tmp_path, peft_adapters, llama_base_sharded, llama_base):
    _merge(llama_base_sharded, [peft_adapters["plain"]], tmp_path / "out")
    base_index = json.loads((llama_base_sharded / INDEX_NAME).read_text())
    out_index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert len(set(base_index["weight_map"].values())) > 1
    assert out_index["weight_map"] == base_index["weight_map"]
    ck = open_checkpoint(tmp_path / "out")
    assert out_index["metadata"]["total_size"] == sum(i.nbytes for _, i in ck.locations.values())
    for shard in ck.shards:
        assert shard.metadata["format"] == "pt"
    single = tmp_path / "single"
    _merge(llama_base, [peft_adapters["plain"]], single)
    a, b = load_dir(tmp_path / "out"), load_dir(single)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_max_shard_size_reshards(tmp_path, peft_adapters, llama_base, llama_base_sharded):
    result = _merge(llama_base, [peft_adapters["plain"]], tmp_path / "out", max_shard_size="60KB")
    assert len(result.shards) > 1
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(result.shards)
    ck = open_checkpoint(tmp_path / "out")
    for shard in ck.shards:
        assert shard.data_size <= 60_000 or len(shard.tensors) == 1
    ref = tmp_path / "ref"
    _merge(llama_base, [peft_adapters["plain"]], ref)
    a, b = load_dir(tmp_path / "out"), load_dir(ref)
    assert all(torch.equal(a[k], b[k]) for k in b)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    torch.testing.assert_close(logits(tmp_path / "out", ids), logits(ref, ids))
    # and a sharded base into one file
    result = _merge(llama_base_sharded, [peft_adapters["plain"]], tmp_path / "one", max_shard_size="1GB")
    assert result.shards == ["model.safetensors"] and not (tmp_path / "one" / INDEX_NAME).exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtype_conversion(backend, tmp_path, peft_adapters, gpt2_base, llama_base):
    # fp32 GPT-2 base -> bf16: merged values are the exact W + s (B A)^T rounded once, up to the fp32 error of
    # the product where W + dW nearly cancels (the bound of ops/kernel.py; PEFT's fp32 result is further off
    # there: 1e5 fp32 ulps), untouched ones rounded from the base
    _merge(gpt2_base, [peft_adapters["gpt2"]], tmp_path / "bf16", dtype="bf16", backend=backend)
    ours, base = load_dir(tmp_path / "bf16"), load_dir(gpt2_base)
    adapter = open_adapter(peft_adapters["gpt2"])
    terms = {
        entry.base_tensor: Term(
            LayerKind.LINEAR, adapter.lora_A(m), adapter.lora_B(m), adapter.scale(m), fan_in_fan_out=True
        )
        for m, entry in adapter.modules.items()  # Conv1D stores (in, out)
    }
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16
        if name in terms:
            assert_within_bound(tensor, base[name], [terms[name]])
        else:
            assert torch.equal(tensor, base[name].to(torch.bfloat16)), name
    assert json.loads((tmp_path / "bf16" / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
    # bf16 Llama -> fp32: untouched tensors are exact upcasts, merged ones unrounded fp32
    _merge(llama_base, [peft_adapters["plain"]], tmp_path / "fp32", dtype="fp32", backend=backend)
    ours, base = load_dir(tmp_path / "fp32"), load_dir(llama_base)
    exact = fp64_reference(base, [open_adapter(peft_adapters["plain"])], [1.0])
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, exact[name].float(), rtol=1e-6, atol=1e-7)
    assert torch.equal(ours["model.norm.weight"], base["model.norm.weight"].float())


@pytest.fixture()
def stamped(tmp_path, peft_adapters, llama_base):
    """A native adapter stamped with the base's hashes and target digests (convert --base)."""
    path = tmp_path / "stamped.safetensors"
    convert(peft_adapters["plain"], path, base=llama_base)
    return path


def test_stamped_adapter_is_verified_while_streaming(tmp_path, stamped, llama_base):
    result = _merge(llama_base, [stamped], tmp_path / "out")
    assert result.verified["tensors"] == 14 and result.verified["enabled"]
    assert result.verified["structure_hash_checked"]


def _copy_base_with(base: Path, dst: Path, name: str, flip_byte: bool = True) -> Path:
    shutil.copytree(base, dst)
    shard, info = open_checkpoint(dst).locations[name]
    with open(shard.path, "r+b") as f:
        f.seek(info.start + info.nbytes // 2)
        b = f.read(1)
        f.seek(info.start + info.nbytes // 2)
        f.write(bytes([b[0] ^ 0x01]))
    return dst


def test_base_changed_after_stamping_is_refused(tmp_path, stamped, llama_base):
    changed = _copy_base_with(llama_base, tmp_path / "changed", "model.layers.1.mlp.up_proj.weight")
    with pytest.raises(HashMismatchError, match="model.layers.1.mlp.up_proj.weight"):
        _merge(changed, [stamped], tmp_path / "out")
    _nothing_under(tmp_path / "out")
    # --no-verify merges it anyway, and says so
    with pytest.warns(UserWarning, match="no-verify"):
        result = merge_fn(changed, [stamped], tmp_path / "out", verify=False)
    assert result.verified == {**result.verified, "enabled": False, "tensors": 0}


def test_structure_hash_mismatch_is_refused_before_reading(tmp_path, stamped, llama_base):
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(llama_base, other)
    state = load_file(other / "model.safetensors")
    state["extra.buffer"] = torch.zeros(3)
    save_file(state, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BaseMismatchError, match="structure hash"):
        _merge(other, [stamped], tmp_path / "out")
    _nothing_under(tmp_path / "out")


def test_wrong_base_is_refused(tmp_path, peft_adapters, gpt2_base):
    with pytest.raises(BaseMismatchError, match="base has no tensor"):
        _merge(gpt2_base, [peft_adapters["plain"]], tmp_path / "out")
    _nothing_under(tmp_path / "out")


def test_fp8_target_is_refused(tmp_path, peft_adapters, llama_base):
    from safetensors.torch import load_file, save_file

    fp8 = tmp_path / "fp8"
    shutil.copytree(llama_base, fp8)
    state = load_file(fp8 / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    state[name] = state[name].float().to(torch.float8_e4m3fn)
    save_file(state, fp8 / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedDtypeError, match="F8_E4M3"):
        _merge(fp8, [peft_adapters["plain"]], tmp_path / "out")
    _nothing_under(tmp_path / "out")
    # an fp8 tensor nobody targets is copied as it is, even with --dtype
    _merge(fp8, [peft_adapters["layers"]], tmp_path / "ok", dtype="fp32")
    assert raw_bytes(tmp_path / "ok", name) == raw_bytes(fp8, name)


def test_outputs_and_inputs_are_protected(tmp_path, peft_adapters, llama_base):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        _merge(llama_base, [peft_adapters["plain"]], out)
    assert (out / "keep.txt").exists()
    result = _merge(llama_base, [peft_adapters["plain"]], out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert result.output == str(out)
    for bad in (llama_base, llama_base / "merged", llama_base.parent, peft_adapters["plain"]):
        with pytest.raises(UsageError, match="inputs are never modified"):
            _merge(llama_base, [peft_adapters["plain"]], bad, overwrite=True)


def test_usage_errors(tmp_path, peft_adapters, llama_base):
    with pytest.raises(UsageError, match="weight"):
        _merge(llama_base, [peft_adapters["plain"]], tmp_path / "o", weights=[1.0, 2.0])
    with pytest.raises(UsageError, match="dtype"):
        _merge(llama_base, [peft_adapters["plain"]], tmp_path / "o", dtype="int8")
    with pytest.raises(UsageError, match="device"):
        _merge(llama_base, [peft_adapters["plain"]], tmp_path / "o", device="tpu")
    with pytest.raises(UsageError, match="DoRA"):
        _merge(llama_base, [peft_adapters["dora"]], tmp_path / "o", weights=[0.5])
    with pytest.raises(UsageError, match="both replace"):
        _merge(llama_base, [peft_adapters["modules_to_save"]] * 2, tmp_path / "o")
    with pytest.raises(UsageError):
        _merge(llama_base, [], tmp_path / "o")
    _nothing_under(tmp_path / "o")


def test_api_accepts_adapter_objects_reports_progress_and_is_callable(tmp_path, peft_adapters, llama_base):
    seen = {"bytes": 0, "tensors": 0}

    def progress(nbytes: int, tensors: int) -> None:
        seen["bytes"] += nbytes
        seen["tensors"] += tensors

    with open_adapter(peft_adapters["modules_to_save"]) as adapter:
        result = loraformat.merge(llama_base, [adapter], tmp_path / "out", progress=progress)
    ck = open_checkpoint(tmp_path / "out")
    assert seen["tensors"] == result.tensors == len(ck.locations)
    assert seen["bytes"] == sum(s.data_size for s in ck.shards)
    assert result.tensors_replaced == 1
    data = result.to_json()
    assert json.loads(json.dumps(data)) == data
    for key in (
        "tensors_merged",
        "bytes_read",
        "bytes_written",
        "seconds",
        "gb_per_s",
        "peak_rss_bytes",
        "peak_gpu_bytes",
        "verified",
    ):
        assert key in data
    header_len = struct.unpack("<Q", (tmp_path / "out" / "model.safetensors").read_bytes()[:8])[0]
    assert header_len % 8 == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestCuda:
    @pytest.mark.parametrize("variant", ["plain", "dora", "embedding", "gpt2", "modules_to_save"])
    def test_cuda_matches_cpu(self, variant, tmp_path, peft_adapters, base_of, monkeypatch):
        monkeypatch.setattr(engine, "BLOCK_BYTES", 4096)
        cpu = _merge(base_of(variant), [peft_adapters[variant]], tmp_path / "cpu", device="cpu")
        gpu = _merge(base_of(variant), [peft_adapters[variant]], tmp_path / "gpu", device="cuda")
        assert gpu.device.startswith("cuda") and gpu.peak_gpu_bytes > 0 and cpu.device == "cpu"
        a, b = load_dir(tmp_path / "cpu"), load_dir(tmp_path / "gpu")
        for name in a:
            assert_close_to(b[name], a[name], name)

    def test_auto_picks_cuda(self, tmp_path, peft_adapters, llama_base):
        assert _merge(llama_base, [peft_adapters["plain"]], tmp_path / "o").device.startswith("cuda")


def test_write_shards_writes_any_subset_of_the_output_shards(tmp_path, peft_adapters, llama_base):
    """The per-shard unit a split merge's worker runs (write_shards on Plan.subset): each output shard written on
    its own is byte-identical to the same shard of a whole merge."""
    from loraformat.merging.devices import open_device
    from loraformat.merging.engine import write_shards
    from loraformat.merging.plan import build_plan

    full = _merge(llama_base, [peft_adapters["plain"]], tmp_path / "full", max_shard_size="60KB")
    assert len(full.shards) >= 2
    with open_adapter(peft_adapters["plain"]) as adapter:
        ck = open_checkpoint(llama_base)
        plan = build_plan(ck, [adapter], [1.0], out_dtype=None, max_shard_size="60KB", verify=True)
        for i, shard in enumerate(plan.shards):
            part = tmp_path / f"part{i}"
            part.mkdir()
            sub = plan.subset([i])
            stats = write_shards(sub, part, part, open_device("cpu", "auto", sub))
            assert [p.name for p in part.iterdir()] == [shard.name]
            assert (part / shard.name).read_bytes() == (tmp_path / "full" / shard.name).read_bytes()
            assert stats.bytes_written == shard.size
