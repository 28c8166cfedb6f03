"""loraformat.ops.fp8 against compressed-tensors (per-tensor, per-channel: its own quantize/dequantize are the
oracle) and against the DeepSeek-V3 block rule (128x128 tiles, partial edges, W = q * scale_inv)."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ct_forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
from compressed_tensors.quantization import QuantizationArgs  # noqa: E402

from loraformat.ops import fp8  # noqa: E402


def _ct_args(strategy: str) -> QuantizationArgs:
    return QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=False)


def _weight(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.05).astype(np.float32)


@pytest.mark.parametrize("strategy,kind", [("tensor", "tensor"), ("channel", "channel")])
def test_tensor_and_channel_scales_match_compressed_tensors(strategy: str, kind: str) -> None:
    x = _weight(96, 80)
    x[5] = 0.0  # an all-zero row: compressed-tensors gives it epsilon, never a zero scale
    layout = fp8.Fp8Layout(kind)
    q, scale = fp8.quantize(x, layout)
    xt = torch.from_numpy(x)
    amax = xt.abs().amax() if kind == "tensor" else xt.abs().amax(dim=1, keepdim=True)
    from compressed_tensors.quantization.utils import calculate_qparams

    ref_scale, zp = calculate_qparams(-amax, amax, _ct_args(strategy))
    assert np.array_equal(scale.reshape(-1), ref_scale.reshape(-1).numpy())
    ref_q = ct_forward.quantize(xt, ref_scale, zp, _ct_args(strategy), dtype=torch.float8_e4m3fn)
    assert np.array_equal(q, ref_q.view(torch.uint8).numpy())
    ref_w = ct_forward.dequantize(ref_q, ref_scale, zp, _ct_args(strategy), dtype=torch.float32)
    assert np.array_equal(fp8.decode_rows(q, scale, layout), ref_w.numpy())


@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (128, 128), (5, 700)])
def test_block_scales_follow_the_deepseek_rule(shape: tuple[int, int]) -> None:
    rows, cols = shape
    x = _weight(rows, cols, 1)
    layout = fp8.Fp8Layout("block", (128, 128))
    q, scale = fp8.quantize(x, layout)
    assert scale.shape == (math.ceil(rows / 128), math.ceil(cols / 128))
    for i in range(scale.shape[0]):  # absmax / 448 per tile, edge tiles partial
        for j in range(scale.shape[1]):
            tile = x[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            assert scale[i, j] == np.float32(np.abs(tile).max()) / np.float32(448.0)
    expanded = np.repeat(np.repeat(scale, 128, 0), 128, 1)[:rows, :cols]
    ref = torch.from_numpy(x / expanded).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert np.array_equal(q, ref.view(torch.uint8).numpy())
    decoded = fp8.decode_rows(q, scale, layout)
    assert np.array_equal(decoded, ref.float().numpy() * expanded)
    assert np.abs(decoded - x).max() <= np.abs(x).max() / 16  # within one E4M3 step of the tile


def test_block_rows_stream_like_the_whole_tensor() -> None:
    x = _weight(300, 200, 2)
    layout = fp8.Fp8Layout("block", (128, 128))
    q, scale = fp8.quantize(x, layout)
    parts = [fp8.decode_rows(q[r : r + 128], scale, layout, row0=r) for r in range(0, 300, 128)]
    assert np.array_equal(np.concatenate(parts), fp8.decode_rows(q, scale, layout))
    with pytest.raises(ValueError, match="block"):
        fp8.decode_rows(q[3:10], scale, layout, row0=3)


def test_bf16_scales_are_rounded_before_use() -> None:
    x = _weight(64, 64, 3)
    layout = fp8.Fp8Layout("channel", scale_dtype="BF16")
    q, scale = fp8.quantize(x, layout)
    assert np.array_equal(scale, fp8.scale_values(fp8.stored_scales(scale, "BF16"), "BF16"))
    assert np.abs(fp8.decode_rows(q, scale, layout) - x).max() < np.abs(x).max() / 8


@pytest.mark.parametrize(
    "scale,problem",
    [(np.array([np.nan], np.float32), "NaN"), (np.array([0.0], np.float32), "zero"), (np.ones(3), None)],
)
def test_scale_problems(scale: np.ndarray, problem: str | None) -> None:
    found = fp8.scale_problem(scale)
    assert (found is None) if problem is None else (problem in (found or ""))


def test_layout_scale_shapes() -> None:
    assert fp8.Fp8Layout("block").accepts((3, 2), 300, 200)
    assert not fp8.Fp8Layout("block").accepts((2, 2), 300, 200)
    assert fp8.Fp8Layout("channel").accepts((300,), 300, 200)
    assert fp8.Fp8Layout("tensor").accepts((), 300, 200)


@pytest.mark.parametrize("kind", ["tensor", "channel", "block"])
@pytest.mark.parametrize("scale", [1e-30, 2.0**-126, 1.7e-3, 1.0, 3.0, 127.9, 128.0, 3.5e5])
def test_decode_is_exact_for_every_code_and_scale(kind: str, scale: float) -> None:
    """Every E4M3 code (subnormals, both zeros, both NaNs) times scales on both sides of the folded-multiply
    limit (2^7) and down to float32's smallest normal: bit for bit torch's float8 widening times the scale."""
    assert_decode_is_torch_widening(kind, scale)


def assert_decode_is_torch_widening(kind: str, scale: float) -> None:
    """fp8.decode_rows of every code twice over, with ``scale`` everywhere, against torch (also run for each
    compiled variant of the C passes by tests/test_ops_fp8kernel.py)."""
    codes = np.tile(np.arange(256, dtype=np.uint8), 2).reshape(4, 128)
    layout = fp8.Fp8Layout(kind, block=(2, 64))
    s = np.full(layout.scale_shape(4, 128), scale, np.float32)
    ours = fp8.decode_rows(codes, s, layout)
    ref = (
        torch.from_numpy(codes).view(torch.float8_e4m3fn).float() * torch.tensor(np.float32(scale))
    ).numpy()
    nan = np.isnan(ref)
    assert nan.sum() == 4 and np.isnan(ours[nan]).all()
    assert np.array_equal(ours[~nan].view(np.uint32), ref[~nan].view(np.uint32))


def _e4m3_candidates() -> np.ndarray:
    """fp32 values across E4M3's whole range: random, every code's value, the exact ties between neighbouring
    codes (normal and subnormal), one float32 ulp either side of each, both zeros, NaNs, the clip limits."""
    rng = np.random.default_rng(1)
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    finite = np.unique(codes[np.isfinite(codes)])
    ties = (finite[1:] + finite[:-1]) / 2  # exact in fp32: neighbours differ by one E4M3 step
    near = np.concatenate([np.nextafter(ties, np.inf), np.nextafter(ties, -np.inf)])
    spread = rng.standard_normal(100_000).astype(np.float32) * np.float32(2.0) ** rng.integers(
        -12, 9, 100_000
    )
    tiny = rng.uniform(-(2.0**-6), 2.0**-6, 20_000).astype(np.float32)
    special = np.array([0.0, -0.0, 448.0, -448.0, 2.0**-6, -(2.0**-6), 2.0**-10, np.nan, -np.nan], np.float32)
    return np.concatenate([finite, ties, near, spread, tiny, special]).astype(np.float32)


def test_e4m3_encode_matches_torch_cast_bit_for_bit() -> None:
    y = np.clip(_e4m3_candidates(), -448.0, 448.0)
    ours = fp8.f32_to_e4m3(y)
    theirs = torch.from_numpy(y.copy()).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    nan = np.isnan(y)
    assert nan.sum() == 2 and np.all((ours[nan] & 0x7F) == 0x7F)
    assert np.array_equal(ours[~nan], theirs[~nan])
    assert (y[~nan] == 0).sum() >= 2 and ((ours == 0x80) & (y == 0)).any()  # -0 keeps its sign
