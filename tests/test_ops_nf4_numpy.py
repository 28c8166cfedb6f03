"""loraformat.ops.nf4_numpy against the torch reference (loraformat.ops.nf4) and bitsandbytes itself: the round
trip dequant(quant(W)) must be bit-identical for every weight dtype, block size, quant type, with and without
double quantization, including partial last blocks, zeros, huge, tiny and non-finite values; and, for double
quantization, under every torch CPU capability (its offset and code depend on it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")

from loraformat.errors import InvalidInputError  # noqa: E402
from loraformat.merging.devices import torch_cpu_capability  # noqa: E402
from loraformat.ops import nf4, nf4_numpy  # noqa: E402
from tests import nf4_helpers as nh  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CAPABILITY = torch_cpu_capability()
pytestmark = pytest.mark.skipif(CAPABILITY is None, reason="torch's CPU capability is unknown here")


def elements(w: torch.Tensor) -> np.ndarray:
    """The weight as nf4_numpy takes it: flat, bfloat16 as its uint16 bit patterns."""
    flat = w.reshape(-1)
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.numpy()


def ours(w: torch.Tensor, out_dtype: type = np.float32, **kwargs: object) -> torch.Tensor:
    """nf4_numpy's round trip of ``w``, as a torch tensor of w's dtype (exact: it is rounded to it)."""
    out = np.full(w.numel(), np.nan, out_dtype)
    got = nf4_numpy.roundtrip_4bit(elements(w), str(w.dtype).removeprefix("torch."), out, **kwargs)
    assert got is out
    return torch.from_numpy(out).to(w.dtype).reshape(w.shape)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_tables_are_the_torch_references(quant_type: str) -> None:
    cells, reference = nf4_numpy.cells(quant_type), nf4._cells(quant_type)
    by_torch_cell = np.arange(1 << 16) ^ 0x8000  # nf4.py numbers cells by the signed high half + 32768
    assert np.array_equal(cells.bound[by_torch_cell], reference.bound.numpy(), equal_nan=True)
    slots = (2 * by_torch_cell[:, None] + np.arange(2)).reshape(-1)
    assert np.array_equal(cells.value[slots].view(np.uint32), reference.value.numpy().view(np.uint32))
    assert np.array_equal(nf4_numpy.code4(quant_type), nf4.code4(quant_type).numpy())
    assert np.array_equal(nf4_numpy.dynamic_map(CAPABILITY), nf4.dynamic_map().numpy())
    lut = nf4._lut8(tuple(nf4.dynamic_map().tolist())).numpy()
    assert np.array_equal(nf4_numpy._lut8(CAPABILITY), lut)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_fine_table_is_the_exact_search_on_every_cell(quant_type: str) -> None:
    """Each 20-bit cell the one-look-up table answers holds no midpoint (the exact search gives its value at
    both ends, and the bucket is monotone in between); the ones it leaves undecided are few: the cells of the
    midpoints and the +-inf / NaN ones."""
    cells = nf4_numpy.cells(quant_type)
    high = np.arange(1 << 20, dtype=np.uint32) << np.uint32(12)
    first, last = high.view(np.float32), (high | np.uint32(0xFFF)).view(np.float32)
    decided = ~np.isnan(cells.fine)
    for end in (first, last):
        assert np.array_equal(cells.exact(end[decided]), cells.fine[decided])
    special = np.isnan(last)
    bound = cells.bound[np.arange(1 << 20) >> 4]  # the midpoint in each sub-cell's 16-bit cell, if any
    holds_midpoint = (first <= bound) != (last <= bound)
    assert np.array_equal(~decided, special | holds_midpoint)
    assert (~decided & ~special).sum() <= 15


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("block_size", nf4_numpy.BLOCK_SIZES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", nh.DTYPES)
def test_roundtrip_is_bitsandbytes(quant_type: str, block_size: int, double_quant: bool, dtype: str) -> None:
    for seed, shape in enumerate([*nh.SHAPES, (7,), (1,), (2, 40001)]):
        w = nh.weight(shape, dtype, seed)
        packed, state = F.quantize_4bit(
            w, blocksize=block_size, compress_statistics=double_quant, quant_type=quant_type
        )
        expected = nh.bnb_reference_dequant(packed, state).reshape(w.shape)
        kwargs = dict(quant_type=quant_type, block_size=block_size, double_quant=double_quant)
        got = ours(w, capability=CAPABILITY, **kwargs)
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), shape
        reference = nf4.roundtrip_4bit(w, **kwargs)  # type: ignore[arg-type]
        assert torch.equal(got.view(torch.uint8), reference.view(torch.uint8)), shape
        assert torch.equal(ours(w, np.float64, capability=CAPABILITY, **kwargs), got)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", nh.DTYPES)
@pytest.mark.parametrize("numel", [1024, 3 * 65536 + 64 * 5 + 17])  # one chunk; several plus a partial block
@pytest.mark.parametrize("double_quant", [False, True])  # NaN / inf blocks: single quantization only
def test_adversarial_values(quant_type: str, dtype: str, numel: int, double_quant: bool) -> None:
    """Scaled values on each midpoint and an ulp either side, +-0, all-zero blocks, subnormals, NaN and inf."""
    w = nh.adversarial_weight(quant_type, dtype, numel, nonfinite=not double_quant)
    kwargs = dict(quant_type=quant_type, block_size=64, double_quant=double_quant)
    expected = nf4.roundtrip_4bit(w, **kwargs)  # type: ignore[arg-type]
    got = ours(w, capability=CAPABILITY, **kwargs)
    assert nh.same_bits(got, expected)
    assert torch.isnan(got).any() != double_quant


@pytest.mark.parametrize("dtype", nh.DTYPES)
@pytest.mark.parametrize("scale", [1e-6, 3e4, 1e30, 3e38])
def test_huge_and_tiny_weights(dtype: str, scale: float) -> None:
    """Magnitudes near the dtype's range ends: values overflowing it become inf (3e38 in bf16, anything past
    65504 in f16), tiny scales make subnormal products; the block statistics of a finite weight stay finite."""
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(96, 130, generator=g, dtype=torch.float64) * scale).to(getattr(torch, dtype))
    for double_quant in (False, True):
        kwargs = dict(block_size=64, double_quant=double_quant)
        if double_quant and not torch.isfinite(w).all():
            with pytest.raises(InvalidInputError, match="NaN or infinite"):
                ours(w, capability=CAPABILITY, **kwargs)
            continue
        assert nh.same_bits(ours(w, capability=CAPABILITY, **kwargs), nf4.roundtrip_4bit(w, **kwargs))  # type: ignore[arg-type]


def test_zeros_and_double_quant_of_non_finite_weights() -> None:
    for shape in [(64, 64), (3, 5)]:
        for dq in (False, True):
            w = torch.zeros(shape, dtype=torch.bfloat16)
            assert torch.equal(
                ours(w, double_quant=dq, capability=CAPABILITY).view(torch.int16), w.view(torch.int16)
            )
    for bad in (float("nan"), float("inf"), float("-inf")):
        w = nh.weight((64, 70), "float16", 1)
        w[5, 69] = bad  # in the partial last block
        with pytest.raises(InvalidInputError, match="NaN or infinite"):
            ours(w, double_quant=True, capability=CAPABILITY)


def test_bad_arguments_are_refused() -> None:
    w = np.zeros(64, np.float32)
    with pytest.raises(ValueError, match="block size"):
        nf4_numpy.roundtrip_4bit(w, "float32", np.empty(64, np.float32), block_size=48)
    with pytest.raises(ValueError, match="weights"):
        nf4_numpy.roundtrip_4bit(w, "float64", np.empty(64, np.float32))
    with pytest.raises(ValueError, match="capability"):
        nf4_numpy.roundtrip_4bit(w, "float32", np.empty(64, np.float32), double_quant=True)
    with pytest.raises(ValueError, match="contiguous"):
        nf4_numpy.roundtrip_4bit(w, "float32", np.empty(128, np.float32)[::2])
    with pytest.raises(ValueError, match="nf4 or fp4"):
        nf4_numpy.roundtrip_4bit(w, "float32", np.empty(64, np.float32), quant_type="int4")


TORCH_SIDE = """
import sys
import numpy as np
import torch
import bitsandbytes.functional as F
torch.set_num_threads(1)
w = torch.from_numpy(np.load(sys.argv[1]))
packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
out = F.dequantize_4bit(packed, state)
np.save(sys.argv[2], out.numpy())
print(torch.backends.cpu.get_cpu_capability())
"""


def test_double_quant_follows_torchs_cpu_capability(tmp_path: Path) -> None:
    """bitsandbytes builds its 8-bit code with torch.linspace, which the DEFAULT kernels round differently
    from the AVX2/AVX512 ones: the same weight round-trips to different bits (an fp32 one: a bf16 result hides
    most of these one-ulp differences of the block scales). Ours follows the capability."""
    w = nh.weight((512, 1024), "float32", 4).numpy()
    np.save(tmp_path / "w.npy", w)
    results = {}
    for capability in ("default", "avx2"):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
        target = tmp_path / f"{capability}.npy"
        done = subprocess.run(
            [sys.executable, "-c", TORCH_SIDE, str(tmp_path / "w.npy"), str(target)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert done.stdout.strip().lower() == capability
        results[capability] = np.load(target).reshape(-1)
        out = np.empty(w.size, np.float32)
        nf4_numpy.roundtrip_4bit(w.reshape(-1), "float32", out, double_quant=True, capability=capability)
        assert np.array_equal(out.view(np.uint32), results[capability].view(np.uint32))
    assert not np.array_equal(results["default"], results["avx2"])  # the premise


def test_f16_rounding_is_torchs() -> None:
    """round_f16_in_place against torch's float16 cast and back: random bit patterns, every tie at float16's
    subnormal and normal spacing, the overflow boundary (65504, 65520 ties to inf), +-0, inf and NaN."""
    rng = np.random.default_rng(9)
    k = np.arange(1 << 11, dtype=np.float32)
    ties = np.concatenate(
        [(k + np.float32(0.5)) * np.float32(2**-24), (1024 + k + np.float32(0.5)) * np.float32(2**-24)]
    )
    ties = np.concatenate(
        [ties, ties * np.float32(2**20), np.full(2, (2047 + np.float32(0.5)) * np.float32(2**5))]
    )
    edges = np.array(
        [65504, 65519.996, 65520, 65536, 2**-14, 2**-25, 0.0, -0.0, np.inf, -np.inf, np.nan, 3e38],
        np.float32,
    )
    x = np.concatenate(
        [
            rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32),
            ties,
            -ties,
            edges,
        ]
    )
    expected = torch.from_numpy(x.copy()).to(torch.float16).float().numpy()
    y = x.copy()
    scratch = (np.empty(x.size, np.uint32), np.empty(x.size, np.uint32), np.empty(x.size, bool))
    with np.errstate(invalid="ignore", over="ignore"):
        assert nf4_numpy.round_f16_in_place(y, scratch) is y
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(y), nan)
    assert np.array_equal(y[~nan].view(np.uint32), expected[~nan].view(np.uint32))
    assert np.isinf(expected).sum() > 1000 and (expected[~nan] == 0).sum() > 100
