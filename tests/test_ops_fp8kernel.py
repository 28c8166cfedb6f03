"""loraformat/ops/_fp8kernel.c, the C decode and encode-and-measure passes, against the numpy reference of
loraformat/ops/fp8.py and torch's float8 casts: the same codes and values bit for bit, for every instruction set
the CPU runs, and the same statistics to float precision."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from loraformat.ops import fp8
from tests.test_ops_fp8 import assert_decode_is_torch_widening

torch = pytest.importorskip("torch")
if (
    os.environ.get("LORAFORMAT_REQUIRE_NATIVE") == "1"
):  # CI builds with a compiler: a missing build fails here
    from loraformat.ops import _fp8kernel as native
else:
    native = pytest.importorskip("loraformat.ops._fp8kernel", reason="built without a C compiler")


@pytest.fixture(params=native.isas())
def isa(request):
    """Each compiled variant in turn (AVX-512, AVX2, baseline: whichever this CPU runs)."""
    before = native.current()
    native.use(request.param)
    fp8.set_native(True)
    yield request.param
    native.use(before)


def _both(fn):
    """fn() with the C passes, then with the numpy ones."""
    got = fn()
    fp8.set_native(False)
    try:
        return got, fn()
    finally:
        fp8.set_native(True)


def _candidates() -> np.ndarray:
    """fp32 values across E4M3's range: every code's value, the exact ties between neighbours and one ulp either
    side, random magnitudes from 2^-12 to 2^9, tiny values, both zeros, NaNs, values beyond the clip limits."""
    rng = np.random.default_rng(7)
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    finite = np.unique(codes[np.isfinite(codes)])
    ties = (finite[1:] + finite[:-1]) / 2
    near = np.concatenate([np.nextafter(ties, np.inf), np.nextafter(ties, -np.inf)])
    spread = rng.standard_normal(60_000).astype(np.float32) * np.float32(2.0) ** rng.integers(-12, 9, 60_000)
    tiny = rng.uniform(-(2.0**-6), 2.0**-6, 10_000).astype(np.float32)
    special = np.array(
        [0.0, -0.0, 448.0, -448.0, 460.0, -500.0, 2.0**-6, 2.0**-10, np.nan, -np.nan], np.float32
    )
    out = np.concatenate([finite, ties, near, spread, tiny, special]).astype(np.float32)
    return np.concatenate([out, np.zeros(-out.size % 256, np.float32)])


def test_encode_matches_torch_cast_bit_for_bit(isa: str) -> None:
    """With a per-tensor scale of 1 the encode pass is the cast itself: clip to +-448, nearest even."""
    y = _candidates().reshape(-1, 256)
    layout = fp8.Fp8Layout("tensor")
    one = np.ones(1, np.float32)
    codes, sums = fp8.encode_measured(y, one, layout, 0, np.zeros(y.shape, np.uint8), one)
    ref = torch.from_numpy(np.clip(y, -448, 448)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    nan = np.isnan(y)
    assert np.all((codes[nan] & 0x7F) == 0x7F) and np.array_equal(codes[nan] >> 7, np.signbit(y[nan]))
    assert np.array_equal(codes[~nan], ref[~nan])
    assert ((codes == 0x80) & (y == 0)).any()  # -0 keeps its sign
    assert np.isnan(sums.max_error) and np.isnan(sums.sq_delta)  # NaN is reported, never hidden


@pytest.mark.parametrize("kind", ["tensor", "channel", "block"])
@pytest.mark.parametrize("scale", [1e-30, 2.0**-126, 1.7e-3, 1.0, 127.9, 128.0, 3.5e5])
def test_decode_is_torch_widening_times_the_scale(isa: str, kind: str, scale: float) -> None:
    assert_decode_is_torch_widening(kind, scale)


@pytest.mark.parametrize("kind", ["tensor", "channel", "block"])
@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (5, 700), (130, 17)])
@pytest.mark.parametrize("scale_dtype", ["F32", "BF16"])
def test_merge_passes_equal_the_numpy_reference(isa: str, kind: str, shape, scale_dtype: str) -> None:
    """A merge's passes on one weight (partial edge tiles included): decode the stored codes, add a delta,
    fresh scales, encode and measure -- the same codes, values and scales, and the same statistics."""
    rows, cols = shape
    rng = np.random.default_rng(rows * cols)
    layout = fp8.Fp8Layout(kind, (128, 128), scale_dtype)
    base_q, base_scale = fp8.quantize((rng.standard_normal(shape) * 0.05).astype(np.float32), layout)
    base_q[0, :3] = [0x00, 0x80, 0x01]  # zeros and a subnormal in the stored weight
    delta = (rng.standard_normal(shape) * 0.002).astype(np.float32)
    w, w_ref = _both(lambda: fp8.decode_rows(base_q, base_scale, layout) + delta)
    assert np.array_equal(w.view(np.uint32), w_ref.view(np.uint32))
    fresh, fresh_ref = _both(lambda: fp8.fresh_scales(w, layout))
    assert np.array_equal(fresh, fresh_ref)
    (codes, sums), (codes_ref, sums_ref) = _both(
        lambda: fp8.encode_measured(w, fresh, layout, 0, base_q, base_scale)
    )
    assert np.array_equal(codes, codes_ref)
    assert np.array_equal(fp8.decode_rows(codes, fresh, layout), fp8.decode_rows(codes_ref, fresh, layout))
    for field in ("max_error", "max_delta"):
        assert getattr(sums, field) == pytest.approx(getattr(sums_ref, field), rel=1e-6)
    for field in ("sq_error", "sq_delta"):
        assert getattr(sums, field) == pytest.approx(getattr(sums_ref, field), rel=1e-4)
    assert sums.max_delta == pytest.approx(np.abs(delta).max(), rel=1e-2)


def test_a_nan_poisons_its_tile_scale_only(isa: str) -> None:
    layout = fp8.Fp8Layout("block")
    x = np.ones((256, 300), np.float32)
    x[130, 290] = np.nan
    x[5, 7] = -3.0
    fresh, fresh_ref = _both(lambda: fp8.fresh_scales(x, layout))
    assert np.isnan(fresh[1, 2]) and np.isnan(fresh_ref[1, 2])
    assert np.array_equal(np.isnan(fresh), np.isnan(fresh_ref)) and (np.isnan(fresh).sum() == 1)
    assert fresh[0, 0] == np.float32(3.0) / np.float32(448.0) and np.array_equal(
        fresh[~np.isnan(fresh)], fresh_ref[~np.isnan(fresh_ref)]
    )


def test_block_rows_streamed_one_block_row_at_a_time(isa: str) -> None:
    layout = fp8.Fp8Layout("block")
    x = (np.random.default_rng(3).standard_normal((300, 260)) * 0.1).astype(np.float32)
    q, scale = fp8.quantize(x, layout)
    whole, _ = fp8.encode_measured(x, scale, layout, 0, q, scale)
    parts = [
        fp8.encode_measured(x[r : r + 128], scale, layout, r, q[r : r + 128], scale)[0] for r in (0, 128, 256)
    ]
    assert np.array_equal(np.concatenate(parts), whole) and np.array_equal(whole, q)


@pytest.mark.parametrize(
    "args,message",
    [
        ((np.zeros(10, np.uint8), np.ones(1, np.float32), 0, 0, 4, 4, np.zeros(16, np.float32)), "smaller"),
        ((np.zeros(16, np.uint8), np.ones(1, np.float32), 0, 1, 4, 4, np.zeros(16, np.float32)), "scale"),
        ((np.zeros(16, np.uint8), np.ones(4, np.float32), 0, 2, 4, 4, np.zeros(16, np.float32)), "step"),
        ((np.zeros(16, np.uint8), np.ones(4, np.float32), -1, 0, 4, 4, np.zeros(16, np.float32)), "negative"),
        ((np.zeros(16, np.uint8), np.ones(4, np.float32), 2**62, 0, 4, 4, np.zeros(16, np.float32)), "scale"),
        ((np.zeros(16, np.uint8), np.ones(4, np.float32), 2, 0, 4, 4, np.zeros(16, np.float32)), "scale"),
    ],
)
def test_the_c_passes_check_their_buffers(args, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        native.decode(*args)
    with pytest.raises(TypeError):
        native.decode(
            np.zeros(16, np.uint8), np.ones(1, np.float32), 0, 0, 4, 4, np.zeros(16, np.float32)[::2]
        )


def test_numpy_is_selected_by_the_environment() -> None:
    code = "from loraformat.ops import fp8; print(fp8.native_isa())"
    env = {**os.environ, "LORAFORMAT_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


@pytest.mark.skipif(
    os.environ.get("LORAFORMAT_REQUIRE_NATIVE") != "1", reason="only where the build must have it"
)
def test_the_extension_is_built_and_runs_the_best_isa() -> None:
    """CI builds the package with a C compiler: the C passes must be there, on the best instruction set."""
    assert fp8.native_isa() == native.isas()[0]
