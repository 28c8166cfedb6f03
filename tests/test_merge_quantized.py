"""Merges into quantized bases and QLoRA-faithful merges, against the real libraries: FP8 checkpoints written by
compressed-tensors (and the DeepSeek block layout), bitsandbytes 4-bit checkpoints saved by transformers; the
outputs are loaded back by transformers, compressed-tensors and bitsandbytes, and each value is checked against
an independent torch computation of the format's rule."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from loraformat.merging.api import merge  # noqa: E402
from tests.fixtures import LLAMA_TARGETS, make_peft_adapter  # noqa: E402
from tests.merge_helpers import max_ulp  # noqa: E402

EXE = shutil.which("loraformat") or "loraformat"
Q = "model.layers.0.self_attn.q_proj.weight"
GATE = "model.layers.1.mlp.gate_proj.weight"  # 192 x 64: a full and a partial 128-row tile
FP8_KINDS = ["fp8-block", "fp8-channel", "fp8-tensor", "fp8-ct-block"]


@pytest.fixture(scope="module")
def adapter(quantized_bases, tmp_path_factory) -> Path:
    return make_peft_adapter(
        quantized_bases["bf16"],
        tmp_path_factory.mktemp("qa") / "a",
        r=8,
        lora_alpha=16,
        target_modules=LLAMA_TARGETS,
    )


@pytest.fixture(scope="module")
def merged(quantized_bases, adapter, tmp_path_factory):
    """(kind, requantize) -> (output dir, MergeResult), merged once per module."""
    root = tmp_path_factory.mktemp("qmerged")
    cache: dict[tuple[str, str], tuple[Path, object]] = {}

    def get(kind: str, requantize: str = "keep"):
        if (kind, requantize) not in cache:
            out = root / f"{kind}-{requantize}"
            cache[(kind, requantize)] = (
                out,
                merge(quantized_bases[kind], [adapter], out, requantize=requantize),
            )
        return cache[(kind, requantize)]

    return get


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _raw(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    out = {}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            out[k] = (
                str(t.dtype),
                list(t.shape),
                t.contiguous().view(-1).view(torch.uint8).numpy().tobytes(),
            )
    return out


def _delta(adapter: Path, name: str) -> torch.Tensor:
    """s * B @ A from the PEFT adapter itself, in fp64: the exact delta the merge's fp32 one is compared with."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    t = load_file(str(adapter / "adapter_model.safetensors"))
    module = name[: -len(".weight")]
    a = t[f"base_model.model.{module}.lora_A.weight"].double()
    b = t[f"base_model.model.{module}.lora_B.weight"].double()
    return (b @ a) * (config["lora_alpha"] / config["r"])


def _plus(w: torch.Tensor, adapter: Path, name: str) -> torch.Tensor:
    """W + delta rounded once to fp32."""
    return (w.double() + _delta(adapter, name)).float()


def _scale_name(kind: str, name: str) -> str:
    return name[: -len("weight")] + ("weight_scale_inv" if kind == "fp8-block" else "weight_scale")


def _expand(scale: torch.Tensor, shape: tuple[int, ...], kind: str) -> torch.Tensor:
    rows, cols = shape
    if scale.numel() == 1:
        return scale.float().reshape(1, 1).expand(rows, cols)
    if kind in ("fp8-channel",):
        return scale.float().reshape(rows, 1).expand(rows, cols)
    return scale.float().repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]


def _fresh(x: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """absmax / 448 per tensor, row or 128x128 tile, rounded to the scale dtype (the rule, in torch)."""
    rows, cols = x.shape
    if kind == "fp8-tensor":
        amax = x.abs().amax().reshape(1)
    elif kind == "fp8-channel":
        amax = x.abs().amax(dim=1, keepdim=True)
    else:
        pad = torch.nn.functional.pad(x, (0, -cols % 128, 0, -rows % 128))
        amax = pad.abs().reshape(pad.shape[0] // 128, 128, -1, 128).amax(dim=(1, 3))
    return (amax / 448.0).to(dtype)


@pytest.mark.parametrize("kind", FP8_KINDS)
def test_fp8_merge_requantizes_with_fresh_scales(quantized_bases, adapter, merged, kind: str) -> None:
    out, result = merged(kind)
    base_raw, out_raw = _raw(quantized_bases[kind]), _raw(out)
    assert {k: v[:2] for k, v in out_raw.items()} == {k: v[:2] for k, v in base_raw.items()}  # same layout
    base_t, out_t = _tensors(quantized_bases[kind]), _tensors(out)
    for name in (Q, GATE):
        sname = _scale_name(kind, name)
        w = base_t[name].float() * _expand(base_t[sname], base_t[name].shape, kind)
        expected = _plus(w, adapter, name)
        # the merge's fp32 W + delta is within the kernel's bound of this fp64-exact one (ops/kernel.py): the
        # same fresh scales up to the scale dtype's last bit, the same E4M3 codes but on a rounding boundary
        scale = _fresh(expected, kind, base_t[sname].dtype).reshape(out_t[sname].shape)
        assert max_ulp(out_t[sname], scale) <= 1 and (out_t[sname] != scale).float().mean() < 0.05, name
        q = (expected / _expand(out_t[sname], expected.shape, kind)).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert (out_t[name].view(torch.uint8) != q.view(torch.uint8)).float().mean() < 1e-3, name
    for name in ("model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert out_raw[name] == base_raw[name]  # untargeted: byte for byte
    config = json.loads((out / "config.json").read_text())
    assert (
        config["quantization_config"]
        == json.loads((quantized_bases[kind] / "config.json").read_text())["quantization_config"]
    )
    err = result.requant_error
    assert err is not None and 0 < err["rms_rel"] < err["max_rel"] < 0.2
    # the reported error, recomputed over every target: requant(W + delta) - (W + delta) against delta
    e_max = d_max = e_sq = d_sq = 0.0
    for layer in range(2):
        for leaf in LLAMA_TARGETS:
            part = "self_attn" if leaf.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            name = f"model.layers.{layer}.{part}.{leaf}.weight"
            sname = _scale_name(kind, name)
            w = base_t[name].float() * _expand(base_t[sname], base_t[name].shape, kind)
            exact = _plus(w, adapter, name)
            got = out_t[name].float() * _expand(out_t[sname], out_t[name].shape, kind)
            e, d = (got - exact).double(), (exact - w).double()
            e_max, d_max = max(e_max, e.abs().max().item()), max(d_max, d.abs().max().item())
            e_sq, d_sq = e_sq + (e * e).sum().item(), d_sq + (d * d).sum().item()
    assert err["max_rel"] == pytest.approx(e_max / d_max, rel=1e-5)
    assert err["rms_rel"] == pytest.approx((e_sq / d_sq) ** 0.5, rel=1e-4)
    assert result.quantization["requantize"] == "keep" and not result.warnings


@pytest.mark.parametrize("kind", FP8_KINDS)
def test_fp8_requantize_none_writes_bf16(quantized_bases, adapter, merged, kind: str) -> None:
    out, result = merged(kind, "none")
    base_t, out_t = _tensors(quantized_bases[kind]), _tensors(out)
    assert not any(k.endswith(("weight_scale", "weight_scale_inv")) for k in out_t)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    for name in (Q, "model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        sname = _scale_name(kind, name)
        expected = base_t[name].float() * _expand(base_t[sname], base_t[name].shape, kind) + _delta(
            adapter, name
        )
        assert out_t[name].dtype == torch.bfloat16
        assert max_ulp(out_t[name], expected.to(torch.bfloat16)) <= 1, name
    assert result.requant_error is None


def _logits(path: Path, **kwargs: object) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.bfloat16, **kwargs)
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])).logits.float()


@pytest.mark.parametrize("kind", ["fp8-block", "fp8-channel", "fp8-tensor"])
def test_transformers_loads_fp8_outputs(quantized_bases, merged, kind: str) -> None:
    """transformers dequantizes on CPU; the re-quantized model's logits stay near the bf16 merge's, far closer
    than the adapter's own effect."""
    keep, _ = merged(kind)
    bf16, _ = merged(kind, "none")
    lk, lb, l0 = _logits(keep), _logits(bf16), _logits(quantized_bases[kind])
    gap, effect = (lk - lb).abs().max().item(), (lb - l0).abs().max().item()
    assert torch.isfinite(lk).all() and gap < 0.25 * effect, (gap, effect)


@pytest.mark.parametrize("kind", ["fp8-channel", "fp8-tensor", "fp8-ct-block"])
def test_compressed_tensors_decompresses_the_output(merged, kind: str) -> None:
    from compressed_tensors.compressors import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    out, _ = merged(kind)
    qc = QuantizationConfig.model_validate(
        json.loads((out / "config.json").read_text())["quantization_config"]
    )
    scheme = next(iter(qc.config_groups.values()))
    t = _tensors(out)
    got = FloatQuantizationCompressor.decompress(
        {"weight": t[GATE], "weight_scale": t[_scale_name(kind, GATE)]}, scheme
    )
    ours = t[GATE].float() * _expand(t[_scale_name(kind, GATE)], t[GATE].shape, kind)
    assert torch.equal(got["weight"].float(), ours.to(got["weight"].dtype).float())


def _bnb_state(t: dict[str, torch.Tensor], name: str):
    from bitsandbytes.functional import QuantState

    qs = {k[len(name) + 1 :]: v for k, v in t.items() if k.startswith(name + ".")}
    return QuantState.from_dict(qs, device=torch.device("cpu"))


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_bnb4_checkpoint_merge_is_what_bitsandbytes_would_write(
    quantized_bases, adapter, merged, kind: str
) -> None:
    out, result = merged(kind)
    base_raw, out_raw = _raw(quantized_bases[kind]), _raw(out)
    assert {k: v[:2] for k, v in out_raw.items()} == {k: v[:2] for k, v in base_raw.items()}
    base_t, out_t = _tensors(quantized_bases[kind]), _tensors(out)
    for name in (Q, GATE):
        state = _bnb_state(base_t, name)
        w = F.dequantize_4bit(base_t[name], state)  # what the 4-bit model computes with
        expected = _plus(w.float(), adapter, name)
        packed, ref = F.quantize_4bit(
            expected, blocksize=state.blocksize, compress_statistics=state.nested, quant_type=state.quant_type
        )
        # the merge's fp32 W + delta is within the kernel's bound of this fp64-exact one (ops/kernel.py): the
        # same 4-bit codes but where a value lies on a code boundary, the same block statistics to the last bits
        # (bit-exactness against bitsandbytes quantizing our own fp32 merge is checked below)
        assert out_t[name].shape == packed.shape
        assert (out_t[name] != packed).float().mean() < 2e-3, name
        new = _bnb_state(out_t, name)
        if state.nested:  # 8-bit block statistics, themselves scaled by fp32 ones
            assert (new.absmax != ref.absmax).float().mean() < 2e-2, name
            torch.testing.assert_close(new.state2.absmax, ref.state2.absmax, rtol=1e-5, atol=0)
            assert float(new.offset) == pytest.approx(float(ref.offset), rel=1e-5)
        else:
            torch.testing.assert_close(new.absmax, ref.absmax, rtol=1e-5, atol=0)
    assert out_raw["model.norm.weight"] == base_raw["model.norm.weight"]
    assert result.requant_error is not None and result.requant_error["rms_rel"] < 0.5
    # transformers + bitsandbytes load it, hold exactly what they make of the fp32 merge quantized on load, and
    # run it on CPU
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=kind == "nf4"
    )
    fp32 = merge(
        quantized_bases[kind], [adapter], out.parent / f"{kind}-fp32", requantize="none", dtype="fp32"
    )
    assert fp32.quantization["requantize"] == "none"
    ours = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    theirs = AutoModelForCausalLM.from_pretrained(
        out.parent / f"{kind}-fp32", device_map="cpu", dtype=torch.float32, quantization_config=config
    )
    for get in (lambda m: m.model.layers[0].self_attn.q_proj, lambda m: m.model.layers[1].mlp.gate_proj):
        a, b = get(ours).weight, get(theirs).weight
        assert torch.equal(a.data, b.data) and torch.equal(a.quant_state.absmax, b.quant_state.absmax)
    with torch.no_grad():
        assert torch.isfinite(ours(torch.tensor([[1, 5, 9, 13]])).logits).all()


def test_bnb4_requantize_none(quantized_bases, adapter, merged) -> None:
    out, _ = merged("nf4", "none")
    base_t, out_t = _tensors(quantized_bases["nf4"]), _tensors(out)
    assert not any(".quant_state." in k or k.endswith(".absmax") for k in out_t)
    w = F.dequantize_4bit(base_t[Q], _bnb_state(base_t, Q))
    assert out_t[Q].shape == (64, 64) and out_t[Q].dtype == torch.bfloat16
    assert max_ulp(out_t[Q], _plus(w.float(), adapter, Q).to(torch.bfloat16)) <= 1


def _convert(src: Path, out: Path, *args: str) -> Path:
    from loraformat.conversion import convert

    convert(src, out, base_quantization=args[0] if args else None)
    return out


def test_qlora_faithful_merge(quantized_bases, adapter, tmp_path: Path) -> None:
    """An adapter recording an NF4 (double-quantized) training base merges into dequant(quant(W)) by default,
    bit for bit bitsandbytes' round trip, and into W with --dequantize-as none."""
    qlora = _convert(adapter, tmp_path / "qlora.safetensors", "bnb-nf4,block_size=64,double_quant=true")
    base = quantized_bases["bf16"]
    faithful = merge(base, [qlora], tmp_path / "faithful")
    assert faithful.quantization == {"base": None, "requantize": None, "dequantize_as": "nf4"}
    plain = merge(base, [qlora], tmp_path / "plain", dequantize_as="none")
    assert plain.quantization is None
    base_t, f_t, p_t = _tensors(base), _tensors(tmp_path / "faithful"), _tensors(tmp_path / "plain")
    for name in (Q, GATE):
        packed, state = F.quantize_4bit(
            base_t[name], blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        rt = F.dequantize_4bit(packed, state)
        assert max_ulp(f_t[name], _plus(rt.float(), adapter, name).to(torch.bfloat16)) <= 1
        assert max_ulp(p_t[name], _plus(base_t[name].float(), adapter, name).to(torch.bfloat16)) <= 1
        assert not torch.equal(f_t[name], p_t[name])
    assert torch.equal(f_t["model.norm.weight"], base_t["model.norm.weight"])


def test_round_trip_weights_are_read_whole_and_merged_in_row_groups(
    quantized_bases, adapter, tmp_path
) -> None:
    """A round-trip weight is read as one block (its statistics span it), then merged a cache-sized run of whole
    4-bit blocks at a time, as a plain weight is, not in one pass over the whole tensor."""
    from loraformat.merging.api import planned
    from loraformat.merging.blocks import row_blocks, sub_rows
    from loraformat.ops.term import rows_cols

    qlora = _convert(adapter, tmp_path / "qlora.safetensors", "bnb-nf4,block_size=64,double_quant=true")
    with planned(quantized_bases["bf16"], [qlora], tmp_path / "out", [1.0], None, None, True, False) as (
        plan,
        _,
    ):
        trips = [t for t in plan.tasks if t.quant is not None]
        assert trips and all(t.quant.streamed and t.whole for t in trips)
        for task in trips:
            rows, cols = rows_cols(task.logical_shape)
            assert [b[:2] for b in row_blocks(task, 1 << 10)] == [(0, rows)]
            step = sub_rows(task, cols, 1 << 10)
            assert 0 < step < rows and step * cols % 64 == 0, task.name


#: the CLI, reporting on exit whether torch was imported
_TRACKED_CLI = (
    "import atexit, sys; "
    "atexit.register(lambda: print('torch imported:', 'torch' in sys.modules, file=sys.stderr)); "
    "from loraformat.cli.main import main; main()"
)


def test_qlora_faithful_merge_never_imports_torch(quantized_bases, adapter, tmp_path: Path) -> None:
    """The numpy kernel's round trip is numpy's own (its import alone would cost more than the merge), and
    writes the bytes of the torch round trip, which the merge falls back to where it cannot tell torch's CPU
    capability (an ATEN_CPU_CAPABILITY value torch ignores)."""
    qlora = _convert(adapter, tmp_path / "qlora.safetensors", "bnb-nf4,block_size=64,double_quant=true")
    base = quantized_bases["bf16"]
    outs = {}
    for value in (None, "bogus"):
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        if value is not None:
            env["ATEN_CPU_CAPABILITY"] = value
        outs[value] = tmp_path / f"out-{value}"
        args = ["merge", str(base), str(qlora), "-o", str(outs[value]), "--dequantize-as", "nf4"]
        res = subprocess.run(
            [sys.executable, "-c", _TRACKED_CLI, *args], env=env, capture_output=True, text=True
        )
        assert res.returncode == 0, res.stderr
        assert f"torch imported: {value is not None}" in res.stderr, res.stderr
        assert "(numpy)" in res.stdout + res.stderr
    names = sorted(p.name for p in outs[None].iterdir())
    assert names == sorted(p.name for p in outs["bogus"].iterdir())
    for name in names:
        assert (outs[None] / name).read_bytes() == (outs["bogus"] / name).read_bytes(), name
    plain = merge(base, [qlora], tmp_path / "plain", dequantize_as="none")
    assert (
        _tensors(tmp_path / "plain")[Q].view(torch.int16).ne(_tensors(outs[None])[Q].view(torch.int16)).any()
    )
    assert plain.quantization is None


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True)


def _edited(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    t = load_file(str(dst / "model.safetensors"))
    edit(t)
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    "case,word",
    [
        ("missing-scale", "has no scale tensor"),
        ("wrong-shape", "scales of a"),
        ("nan-scale", "NaN"),
        ("zero-scale", "zero"),
        ("no-config", "quantization_config in config.json"),
        ("gptq", "gptq"),
    ],
)
def test_bad_quantized_bases_are_refused(
    quantized_bases, adapter, tmp_path: Path, case: str, word: str
) -> None:
    base = quantized_bases["fp8-block"]
    sname = _scale_name("fp8-block", Q)
    edits = {
        "missing-scale": lambda t: t.pop(sname),
        "wrong-shape": lambda t: t.__setitem__(sname, torch.ones(2, 2)),
        "nan-scale": lambda t: t[sname].fill_(float("nan")),
        "zero-scale": lambda t: t[sname].fill_(0.0),
        "no-config": lambda t: None,
        "gptq": lambda t: None,
    }
    bad = _edited(base, tmp_path / "bad", edits[case])
    config = json.loads((bad / "config.json").read_text())
    if case == "no-config":
        config.pop("quantization_config")
    if case == "gptq":
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (bad / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    res = _cli("merge", str(bad), str(adapter), "-o", str(out))
    assert res.returncode == 1, res.stderr
    assert word in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not out.exists() and not list(tmp_path.glob(".tmp*"))


def test_lost_delta_warns_and_reports(quantized_bases, adapter, tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    res = _cli(
        "merge", str(quantized_bases["fp8-channel"]), str(adapter), "--weight", "0.001", "-o", str(out)
    )
    assert res.returncode == 0, res.stderr
    assert "lost most of the adapter" in res.stderr
    assert "re-quantization error max" in res.stdout + res.stderr
    res = _cli(
        "merge",
        str(quantized_bases["fp8-channel"]),
        str(adapter),
        "--weight",
        "0.001",
        "-o",
        str(tmp_path / "j"),
        "--json",
    )
    data = json.loads(res.stdout)
    assert data["requant_error"]["rms_rel"] > 0.5 and data["warnings"]


def test_digests_are_verified_on_the_stored_bytes(quantized_bases, adapter, tmp_path: Path) -> None:
    base = quantized_bases["fp8-block"]
    stamped = tmp_path / "stamped.safetensors"
    from loraformat.conversion import convert

    convert(adapter, stamped, base=base)
    result = merge(base, [stamped], tmp_path / "ok")
    assert result.verified["tensors"] == 14
    tampered = _edited(base, tmp_path / "tampered", lambda t: t[Q].view(torch.uint8).__setitem__((0, 0), 1))
    res = _cli("merge", str(tampered), str(stamped), "-o", str(tmp_path / "out"))
    assert res.returncode == 1 and "differs from the digest" in res.stderr


@pytest.mark.parametrize("kind", ["fp8-block", "nf4"])
def test_dora_on_a_quantized_base_is_refused_in_one_line(quantized_bases, tmp_path: Path, kind: str) -> None:
    """DoRA renormalises whole rows of the merged weight; the quantized merge path does not do that yet, so it
    refuses (exit 1, one line, nothing written) instead of failing inside the kernel."""
    if kind not in quantized_bases:
        pytest.skip(f"no {kind} base")
    dora = make_peft_adapter(
        quantized_bases["bf16"],
        tmp_path / "dora",
        r=4,
        lora_alpha=8,
        use_dora=True,
        target_modules=["q_proj"],
    )
    out = tmp_path / "out"
    done = subprocess.run(
        [EXE, "merge", str(quantized_bases[kind]), str(dora), "-o", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 1, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "DoRA" in done.stderr, done.stderr
    assert not out.exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_faithful_merge_refuses_a_non_finite_weight_in_one_line(
    quantized_bases, adapter, tmp_path: Path, value: float
) -> None:
    """bitsandbytes' double quantization of a weight holding NaN or inf is undefined (our port used to crash
    with an IndexError traceback): the faithful merge refuses it, naming the tensor, and writes nothing."""
    qlora = _convert(adapter, tmp_path / "qlora.safetensors", "bnb-nf4,block_size=64,double_quant=true")
    bad = _edited(quantized_bases["bf16"], tmp_path / "bad", lambda t: t[Q].view(-1).__setitem__(7, value))
    out = tmp_path / "out"
    res = _cli("merge", str(bad), str(qlora), "-o", str(out))
    assert res.returncode == 1, res.stderr
    assert Q in res.stderr and "NaN or infinite" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.tmp*"))
    plain = _cli("merge", str(bad), str(qlora), "-o", str(tmp_path / "plain"), "--dequantize-as", "none")
    assert plain.returncode == 0, (
        plain.stderr
    )  # W + delta keeps the base's own NaN/inf, as a plain merge does


@pytest.mark.parametrize("kind, requantize", [("fp8-block", "keep"), ("nf4", "keep"), ("fp8-block", "none")])
def test_split_merge_of_a_quantized_base_is_byte_identical(
    quantized_bases, adapter, tmp_path: Path, kind: str, requantize: str
) -> None:
    """Three `--shard i/3` workers and `--assemble 3` write the bytes of a one-machine merge, with shards small
    enough that a weight and its fresh scales (or 4-bit state) would fall apart: the shard plan keeps each
    re-quantized weight and its side tensors in one shard (a worker writes them together). Workers and the
    assembler honour --requantize (they used to plan with the default and write FP8 regardless)."""
    base, opts = quantized_bases[kind], ["--max-shard-size", "10KB", "--requantize", requantize]
    whole = tmp_path / "whole"
    res = _cli("merge", str(base), str(adapter), "-o", str(whole), *opts)
    assert res.returncode == 0, res.stderr
    assert len(list(whole.glob("*.safetensors"))) > 5
    out = tmp_path / "split"
    for i in range(3):
        res = _cli("merge", str(base), str(adapter), "-o", str(out), *opts, "--shard", f"{i}/3")
        assert res.returncode == 0, res.stderr
    res = _cli("merge", str(base), str(adapter), "-o", str(out), *opts, "--assemble", "3")
    assert res.returncode == 0, res.stderr
    config = json.loads((out / "config.json").read_text())
    assert ("quantization_config" in config) == (requantize == "keep")
    names = sorted(p.name for p in whole.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    for name in names:
        assert (whole / name).read_bytes() == (out / name).read_bytes(), name


@pytest.mark.parametrize("kind", FP8_KINDS)
def test_fp8_merge_in_c_writes_the_bytes_of_the_numpy_passes(
    quantized_bases, adapter, merged, kind: str
) -> None:
    """The C passes (loraformat/ops/_fp8kernel.c) and the numpy reference write the same checkpoint, byte for
    byte, and report the same re-quantization error."""
    from loraformat.ops import fp8

    if fp8.native_isa() is None:
        pytest.skip("built without the C passes")
    out_c, res_c = merged(kind)
    fp8.set_native(False)
    try:
        res_np = merge(quantized_bases[kind], [adapter], out_c.with_name(out_c.name + "-numpy"))
    finally:
        fp8.set_native(True)
    for f in sorted(p.name for p in out_c.iterdir()):
        assert (out_c / f).read_bytes() == (out_c.with_name(out_c.name + "-numpy") / f).read_bytes(), f
    for key in ("max_rel", "rms_rel", "max_abs", "rms_abs"):
        assert res_c.requant_error[key] == pytest.approx(res_np.requant_error[key], rel=1e-5), key
