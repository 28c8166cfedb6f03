"""Weights and bitsandbytes oracles shared by the NF4 tests (tests/test_ops_nf4.py, tests/test_ops_nf4_numpy.py)."""

from __future__ import annotations

import math

import torch
from bitsandbytes import functional as F

SHAPES = [(64, 64), (96, 40), (33, 7), (48, 130)]
DTYPES = ["bfloat16", "float16", "float32"]


def weight(shape: tuple[int, ...], dtype: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(getattr(torch, dtype))


def bnb_reference_dequant(packed: torch.Tensor, state: object) -> torch.Tensor:
    """bitsandbytes' own pure-torch dequantize kernel (the one it uses on CPU for odd shapes), for the cases where
    its AVX-512 kernel is wrong (a block longer than a row, e.g. 64x64 with block 128: spec/interop/nf4.md)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    absmax = (
        F.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    )
    return fn(packed.reshape(-1), absmax, state.code, state.blocksize, state.shape, state.dtype)


def adversarial_weight(quant_type: str, dtype: str, numel: int, nonfinite: bool) -> torch.Tensor:
    """Blocks of 64 whose scaled values sit exactly on each midpoint and one ulp either side (absmax 1 keeps
    them exact), +-0, +-absmax, all-zero, NaN and inf blocks (``nonfinite``), subnormals, then random values."""
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    mids, _ = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
    near = torch.cat([mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    block = torch.zeros(64)
    block[: near.numel()] = near
    block[near.numel() :][:6] = torch.tensor([1.0, -1.0, 0.0, -0.0, 0.5, -0.25])
    special = torch.zeros(4, 64)
    if nonfinite:
        special[1, 3], special[2, 5], special[2, 6] = math.nan, math.inf, 0.3
    special[3] = torch.linspace(-1, 1, 64) * 1e-40
    g = torch.Generator().manual_seed(11)
    head = torch.cat([block, -block, block * 3.5, special.reshape(-1)])
    rest = torch.randn(numel - head.numel(), generator=g) * 0.02
    return torch.cat([head, rest]).to(getattr(torch, dtype))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where NaN (its payload aside), and the sign of zero kept."""
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    a, b = a.masked_fill(nan, 0), b.masked_fill(nan, 0)
    return torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))
