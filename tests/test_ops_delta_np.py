"""The numpy merge math (loraformat.ops.delta_np) against torch: bit-exact dtype conversions, and the same
factorisation and row-block merge as loraformat.ops.delta."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loraformat.ops import delta, delta_np


def _bits32(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.uint32)


def _interesting_f32() -> np.ndarray:
    """Random bit patterns (every exponent: subnormals, huge, inf, NaN) plus hand-picked edge cases."""
    rng = np.random.default_rng(0)
    random_bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    normal = rng.standard_normal(50_000).astype(np.float32).view(np.uint32)
    hi = rng.integers(0, 2**16, size=20_000, dtype=np.uint32) << 16
    ties = np.concatenate([hi | 0x8000, hi | 0x7FFF, hi | 0x8001, hi])  # exact ties (odd and even), near ties
    edges = _bits32(
        [
            0x00000000,
            0x80000000,  # +-0
            0x00000001,
            0x00008000,
            0x00018000,
            0x0000FFFF,
            0x007FFFFF,
            0x807FFFFF,  # subnormals, ties among them
            0x3F808000,
            0x3F818000,
            0x3F80FFFF,
            0x3F807FFF,  # ties to even / odd, just above and below
            0x7F7FFFFF,
            0xFF7FFFFF,
            0x7F7F8000,
            0x7F7F7FFF,  # max finite rounds to inf, a tie below it
            0x7F800000,
            0xFF800000,  # inf
            0x7F800001,
            0x7FC00000,
            0x7FFFFFFF,
            0xFFFFFFFF,
            0xFF800001,
            0x7FBFFFFF,  # NaNs (signalling, quiet, sign)
        ]
    )
    return np.concatenate([random_bits, normal, ties, edges]).view(np.float32)


def test_f32_to_bf16_matches_torch_bit_for_bit():
    x = _interesting_f32()
    ours = delta_np.f32_to_bf16(x)
    theirs = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    assert nan.sum() > 1000 and np.isinf(x).sum() >= 2
    assert np.array_equal(ours[~nan], theirs[~nan])
    # NaN stays NaN (the payload bits differ between torch's kernels, so only NaN-ness is compared)
    assert np.isnan(delta_np.bf16_to_f32(ours[nan])).all()
    # the out= form gives the same bits
    out = np.empty(x.shape, np.uint16)
    assert delta_np.f32_to_bf16(x, out) is out and np.array_equal(out, ours)


def test_bf16_to_f32_is_exact_for_every_pattern():
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    ours = delta_np.bf16_to_f32(bits)
    theirs = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    finite = ~np.isnan(ours)
    assert np.array_equal(delta_np.f32_to_bf16(ours)[finite], bits[finite])  # round trip


@pytest.mark.parametrize("out_dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("work_dtype", [np.float32, np.float64])
def test_encode_matches_torch_conversions(out_dtype, work_dtype):
    x = _interesting_f32()
    x = x[~np.isnan(x)].astype(work_dtype)
    if work_dtype == np.float64:  # values between the fp32 grid points, and beyond the fp32 range
        x = np.concatenate([x * (1 + 2**-30), x * 3.3e20, x * 1e-30])
    tdt = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[out_dtype]
    theirs = torch.from_numpy(x.copy()).to(tdt)
    ours = delta_np.encode(x, out_dtype, np.empty(x.shape, delta_np.STORAGE[out_dtype]))
    if out_dtype == "BF16":
        theirs_bits = theirs.view(torch.int16).numpy().view(np.uint16)
    else:
        theirs_bits = theirs.numpy().view(np.uint16 if out_dtype == "F16" else np.uint32)
        ours = ours.view(theirs_bits.dtype)
    assert np.array_equal(ours, theirs_bits)


@pytest.mark.parametrize("st", ["BF16", "F16", "F32", "F64"])
def test_decode_widens_exactly(st):
    rng = np.random.default_rng(1)
    t = torch.from_numpy(rng.standard_normal((7, 5))).to(
        {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}[st]
    )
    stored = t.view(torch.int16).numpy().view(np.uint16) if st == "BF16" else t.numpy()
    for cd, tcd in ((np.float32, torch.float32), (np.float64, torch.float64)):
        if st == "F64" and cd == np.float32:
            continue
        got = delta_np.decode(stored, st, np.empty((7, 5), cd))
        assert np.array_equal(got, t.to(tcd).numpy())
        assert np.array_equal(delta_np.to_compute(stored, st, cd), got)
    assert (
        delta_np.compute_dtype("BF16", "F64") is np.float64
        and delta_np.compute_dtype("BF16", "F16") is np.float32
    )


CASES = {  # kind, fan_in_fan_out, A shape, B shape, stored weight shape
    "linear": ("linear", False, (4, 12), (10, 4), (10, 12)),
    "conv1d": ("linear", True, (4, 12), (10, 4), (12, 10)),
    "embedding": ("embedding", False, (4, 30), (8, 4), (30, 8)),
    "conv1x1": ("conv", False, (4, 6, 1, 1), (9, 4, 1, 1), (9, 6, 1, 1)),
    "conv3x3": ("conv", False, (4, 6, 3, 3), (9, 4, 1, 1), (9, 6, 3, 3)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("cd", [np.float32, np.float64])
def test_factors_and_row_blocks_match_delta(case, cd):
    kind, fifo, a_shape, b_shape, w_shape = CASES[case]
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(a_shape, generator=g), torch.randn(b_shape, generator=g)
    W = torch.randn(w_shape, generator=g)
    tcd = torch.float64 if cd == np.float64 else torch.float32
    scale = 0.37
    ref_term = delta.lora_term(A, B, scale, kind, fan_in_fan_out=fifo, dtype=tcd)
    term = delta_np.lora_term_np(A.numpy(), B.numpy(), scale, kind, fan_in_fan_out=fifo, dtype=cd)
    assert term.L.flags.c_contiguous and term.R.flags.c_contiguous and term.L.dtype == cd
    assert np.array_equal(term.L, ref_term.L.numpy())
    assert np.array_equal(term.R, ref_term.R.numpy()) and term.scale == scale
    exact = delta_np.lora_term_np(A.numpy(), B.numpy(), 0.25, kind, fan_in_fan_out=fifo, dtype=cd)
    assert exact.scale == 1.0 and np.array_equal(
        exact.R, ref_term.R.numpy() * cd(0.25)
    )  # a power of two folds
    rows, cols = delta.rows_cols(w_shape)
    whole = (W.to(tcd) + delta.delta_weight(A, B, scale, kind, fan_in_fan_out=fifo, dtype=tcd)).reshape(
        rows, cols
    )
    work = W.to(tcd).reshape(rows, cols).numpy().copy()
    scratch = np.empty(work.size, cd)
    for start in range(0, rows, 3):  # row blocks, as the engine streams them
        stop = min(rows, start + 3)
        delta_np.merge_rows_np_(work[start:stop], [term], start, stop, scratch)
    tol = 1e-12 if cd == np.float64 else 1e-5
    np.testing.assert_allclose(work, whole.numpy(), rtol=tol, atol=tol)


def test_bias_terms_and_several_adapters_apply_in_turn():
    rng = np.random.default_rng(4)
    bias = rng.standard_normal(6).astype(np.float32)
    lb = rng.standard_normal(6).astype(np.float32)
    A1, B1 = rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal((6, 2)).astype(np.float32)
    W = rng.standard_normal((6, 3)).astype(np.float32)
    t_bias = delta_np.bias_term_np(lb, 0.5)
    assert t_bias.R is None and np.array_equal(t_bias.L, lb) and t_bias.scale == 0.5
    got = delta_np.merge_rows_np_(bias.reshape(6, 1).copy(), [t_bias], 0, 6)
    ref = delta.merge_rows_(
        torch.from_numpy(bias.reshape(6, 1).copy()), [delta.bias_term(torch.from_numpy(lb), 0.5)], 0, 6
    )
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-6)
    terms = [delta_np.lora_term_np(A1, B1, 2.0), delta_np.lora_term_np(A1 * 2, B1, -0.25)]
    got = delta_np.merge_rows_np_(W.copy(), terms, 0, 6)  # no scratch: allocated
    np.testing.assert_allclose(got, W + 2.0 * (B1 @ A1) - 0.25 * (B1 @ (A1 * 2)), rtol=1e-5, atol=1e-6)
    assert delta_np.merge_rows_np_(W.copy(), terms, 3, 3).tolist() == W.tolist()  # empty block: untouched
    with pytest.raises(ValueError, match="unknown layer kind"):
        delta_np.lora_factors(A1, B1, "lstm")
