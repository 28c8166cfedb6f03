"""FP8 E4M3 weights with per-tensor, per-channel or block scales, as pure numpy math (no file or network I/O).

W = q * scale in fp32, q an E4M3 value (finite max 448). The three scale layouts of the checkpoints we merge into
(spec/interop/fp8.md; loraformat/io/fp8.py detects them):

- ``tensor``: one scale for the whole weight (compressed-tensors ``weight_scale`` of shape [] or [1]);
- ``channel``: one scale per output row (compressed-tensors ``weight_scale`` of shape [out, 1] or [out]);
- ``block``: one scale per (bo x bi) tile, ``weight_scale_inv`` of shape ceil(out/bo) x ceil(in/bi) with partial
  edge tiles (DeepSeek-V3, Qwen3 FP8: transformers' ``fp8`` quant method, weight_block_size [128, 128]).

Fresh scales are computed the way those formats define them: absmax / 448 over the tensor, row or tile, rounded
to the scale's stored dtype (an all-zero group gets the dtype's epsilon, as compressed-tensors does, so that no
scale is zero); q = E4M3(clip(W / scale, -448, 448)), round to nearest even. Block layouts are computed one
block-row (bo rows) at a time, so a merge can stream a tensor in whole block-rows.

The decode pass and the encode-and-measure pass run in C when the package was built with its extension
(loraformat/ops/_fp8kernel.c: one loop each instead of about 40 numpy passes, bit for bit the same codes and
values); the numpy code here is the reference and the fallback (``set_native(False)`` selects it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from loraformat.ops.bf16 import BF16_EPS, bf16_to_f32, f32_to_bf16, round_to_bf16

E4M3_MAX = 448.0
_TWO_120 = np.float32(2.0**120)
_SIGN_AND_VALUE_BITS = np.uint32(0x87F00000)  # bit 31 and bits 20-26 of a float32
_EXPONENT_SHIFT = np.uint32(120 << 23)  # float32's exponent bias (127) minus E4M3's (7), in place
_HALF_ULP_MINUS_ONE = np.uint32(0x7FFFF)  # below the 3 mantissa bits E4M3 keeps of float32's 23
_SMALLEST_NORMAL_BITS = np.uint32(0x3C800000)  # 2^-6, E4M3's smallest normal, as float32 bits
_MAGNITUDE = np.uint32(0x7FFFFFFF)
_NORMAL_SPAN = np.uint32(0x43E00000 - 0x3C800000)  # from 2^-6 to 448, E4M3's normal range, in float32 bits
#: safetensors dtypes a scale tensor may be stored in, and the numpy dtype of their stored elements
SCALE_DTYPES: dict[str, Any] = {"F32": np.float32, "BF16": np.uint16, "F16": np.float16}
_SCALE_EPS = {
    "F32": float(np.finfo(np.float32).eps),
    "BF16": BF16_EPS,
    "F16": float(np.finfo(np.float16).eps),
}


def _load_native() -> ModuleType | None:
    """The C passes, unless the extension was not built or ``LORAFORMAT_NATIVE=0`` asks for numpy."""
    if os.environ.get("LORAFORMAT_NATIVE", "1") == "0":
        return None
    try:
        from loraformat.ops import _fp8kernel
    except ImportError:
        return None
    return _fp8kernel


_native = _load_native()


def native() -> bool:
    """Whether the C passes are selected."""
    return _native is not None


def native_isa() -> str | None:
    """The instruction set the C passes run with (None: numpy passes)."""
    return None if _native is None else str(_native.current())


def set_native(enabled: bool) -> None:
    """Select the C passes (when built) or the numpy ones."""
    global _native
    _native = _load_native() if enabled else None


@dataclass(frozen=True)
class Fp8Layout:
    """How one weight of shape (rows, cols) is scaled."""

    kind: str  # tensor | channel | block
    block: tuple[int, int] = (128, 128)  # (rows, cols) of a tile, for kind == "block"
    scale_dtype: str = "F32"

    def scale_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        """The canonical scale shape for a (rows, cols) weight."""
        if self.kind == "tensor":
            return (1,)
        if self.kind == "channel":
            return (rows, 1)
        return (math.ceil(rows / self.block[0]), math.ceil(cols / self.block[1]))

    def accepts(self, scale_shape: tuple[int, ...], rows: int, cols: int) -> bool:
        """Whether a stored scale shape fits this layout (per-tensor [] or [1]; per-channel [out] or [out, 1])."""
        if self.kind == "tensor":
            return scale_shape in ((), (1,))
        if self.kind == "channel":
            return scale_shape in ((rows,), (rows, 1))
        return tuple(scale_shape) == self.scale_shape(rows, cols)

    @property
    def row_group(self) -> int:
        """Rows that share scales: a streaming merge hands the codec whole groups."""
        return self.block[0] if self.kind == "block" else 1


def scale_problem(scale: np.ndarray) -> str | None:
    """Why a stored scale cannot be decoded with (NaN, infinite, zero or negative), or None."""
    s = np.asarray(scale, dtype=np.float32)
    if not np.isfinite(s).all():
        return "holds NaN or infinite scales"
    if (s <= 0).any():
        return "holds zero or negative scales"
    return None


def _expand_cols(row_scales: np.ndarray, layout: Fp8Layout, cols: int) -> np.ndarray:
    """Scales of one block-row (shape (tiles,)) -> one scale per column."""
    return np.repeat(row_scales.astype(np.float32), layout.block[1])[:cols]


def _bits_times_2_pow_minus_120(q: np.ndarray, out: np.ndarray) -> None:
    """E4M3 bit patterns -> fp32 values times 2^-120, in two integer passes (a table lookup costs 4x more).

    The 7 value bits (4 exponent, 3 mantissa) placed at bits 20-26 of a float32 are a float32 whose exponent is
    E4M3's minus 120, subnormal E4M3 values included (they land on float32 subnormals with the same mantissa
    bits); the sign goes to bit 31 (shifting the sign-extended byte puts it at bits 27-31, the mask keeps 31)."""
    np.left_shift(q.view(np.int8), 20, out=out.view(np.int32), dtype=np.int32)
    np.bitwise_and(out.view(np.uint32), _SIGN_AND_VALUE_BITS, out=out.view(np.uint32))


def _times_scales(values: np.ndarray, scales: np.ndarray) -> None:
    """``values`` (E4M3 values times 2^-120) *= their ``scales``, restoring the 2^120 in the same multiply when
    scales * 2^120 is exact (every scale below 2^7), else in a multiply of its own; the result is fl(value *
    scale) either way. Only the scales of these rows are looked at."""
    if scales.size and float(scales.max()) < 2.0**7:
        values *= scales * _TWO_120
    else:
        values *= _TWO_120
        values *= scales


def decode_rows(
    q: np.ndarray, scale: np.ndarray, layout: Fp8Layout, row0: int = 0, out: np.ndarray | None = None
) -> np.ndarray:
    """E4M3 bit patterns ``q`` (uint8, rows [row0, row0 + len(q)) of the weight) -> fp32 values (into ``out``
    when given, a C-contiguous fp32 array of q's shape): fl(value * scale), exactly as a table lookup and a
    multiply give it.

    ``scale`` is the weight's whole scale tensor; for ``block``, ``row0`` must start a block-row."""
    if out is None or out.dtype != np.float32 or not out.flags.c_contiguous:
        out = np.empty(q.shape, np.float32)
    s = np.asarray(scale, dtype=np.float32)
    rows, cols = q.shape
    if layout.kind == "block" and row0 % layout.block[0]:
        raise ValueError(f"row {row0} does not start a block of {layout.block[0]} rows")
    if _native is not None:
        q = np.ascontiguousarray(q, np.uint8)
        for r0, r1, sc, rs, cs in _scale_runs(s, layout, row0, rows, cols):
            _native.decode(q[r0:r1], sc, rs, cs, r1 - r0, cols, out[r0:r1])
        return out
    _bits_times_2_pow_minus_120(q, out)
    if layout.kind == "tensor":
        _times_scales(out, s.reshape(-1)[:1])
    elif layout.kind == "channel":
        _times_scales(out, s.reshape(-1)[row0 : row0 + rows, None])
    else:  # one block-row at a time, by a row of per-column scales (long inner loops, unlike a 4-D broadcast)
        bo = layout.block[0]
        for r in range(0, rows, bo):
            _times_scales(out[r : r + bo], _expand_cols(s[(row0 + r) // bo], layout, cols))
    nan = np.bitwise_and(q, 0x7F) == 0x7F  # E4M3's NaNs: 0x7F and 0xFF
    if nan.any():
        out[nan] = np.nan
    return out


def _scale_runs(
    s: np.ndarray, layout: Fp8Layout, row0: int, rows: int, cols: int
) -> Iterator[tuple[int, int, np.ndarray, int, int]]:
    """(first row, end row, scales, row step, column step) runs covering ``rows`` rows starting at weight row
    ``row0``, in the C passes' addressing: scales[i * row step + j * column step] (contiguous fp32)."""
    flat = s.reshape(-1)
    if layout.kind == "tensor":
        yield 0, rows, np.ascontiguousarray(flat[:1], np.float32), 0, 0
    elif layout.kind == "channel":
        yield 0, rows, np.ascontiguousarray(flat[row0 : row0 + rows], np.float32), 1, 0
    else:
        bo = layout.block[0]
        for r in range(0, rows, bo):
            yield r, min(rows, r + bo), _expand_cols(s[(row0 + r) // bo], layout, cols), 0, 1


def scale_values(stored: np.ndarray, scale_dtype: str) -> np.ndarray:
    """Stored scale elements (``SCALE_DTYPES[scale_dtype]``; BF16 as bit patterns) -> fp32 values."""
    if scale_dtype == "BF16":
        return bf16_to_f32(np.asarray(stored, np.uint16))
    return np.asarray(stored).astype(np.float32)


def stored_scales(values: np.ndarray, scale_dtype: str) -> np.ndarray:
    """fp32 scales -> the elements stored for ``scale_dtype`` (rounded to nearest even; BF16 as bit patterns)."""
    if scale_dtype == "BF16":
        return f32_to_bf16(np.asarray(values, np.float32))
    return np.asarray(values, np.float32).astype(SCALE_DTYPES[scale_dtype])


def _round_scale(s: np.ndarray, scale_dtype: str) -> np.ndarray:
    """absmax / 448 rounded to the stored dtype; an all-zero group gets that dtype's epsilon (never 0)."""
    s = np.asarray(s, np.float32)
    if scale_dtype == "BF16":
        stored = round_to_bf16(s)
    else:
        stored = s.astype(SCALE_DTYPES[scale_dtype]).astype(np.float32)
    return np.where(stored == 0, np.float32(_SCALE_EPS[scale_dtype]), stored).astype(np.float32)


def f32_to_e4m3(y: np.ndarray) -> np.ndarray:
    """fp32 values within +-448 (or NaN) -> E4M3 bit patterns (uint8), rounded to nearest even as torch's cast
    does, in integer arithmetic (faster than ml_dtypes' cast, and no 0.6 s import).

    Normal E4M3 values (|y| >= 2^-6): float32's exponent re-biased in place, the mantissa rounded at bit 20 by
    adding 0x7FFFF plus the lowest kept bit (a carry moves into the exponent, as rounding up should); the sign
    then sits at bit 11 and the 7 value bits at 0-6. The few others -- subnormal E4M3 values, rint(|y| * 2^9),
    exact, and NaN -- are found in one unsigned comparison and set one by one."""
    y = np.ascontiguousarray(y, dtype=np.float32)
    bits = y.view(np.uint32)
    u = np.subtract(bits, _EXPONENT_SHIFT)
    t = np.right_shift(u, 20)
    np.bitwise_and(t, 1, out=t)
    np.add(u, t, out=u)
    np.add(u, _HALF_ULP_MINUS_ONE, out=u)
    np.right_shift(u, 20, out=u)
    np.right_shift(u, 4, out=t)
    np.bitwise_and(t, 0x80, out=t)
    np.bitwise_or(u, t, out=u)
    code = u.astype(np.uint8)
    # |y| below the smallest normal wraps around to above the range; NaN's magnitude is above it too
    np.bitwise_and(bits, _MAGNITUDE, out=u)
    np.subtract(u, _SMALLEST_NORMAL_BITS, out=u)
    special = np.flatnonzero(u > _NORMAL_SPAN)
    if special.size:
        code.reshape(-1)[special] = _special_codes(y.reshape(-1)[special])
    return code


def _special_codes(ys: np.ndarray) -> np.ndarray:
    """E4M3 codes of values below the smallest normal (rint(|y| * 2^9), ties to even) or NaN (0x7F, signed)."""
    sign = np.where(np.signbit(ys), 0x80, 0).astype(np.uint8)
    with np.errstate(invalid="ignore"):
        small = np.rint(np.abs(ys) * np.float32(512.0))
    return np.where(np.isnan(ys), 0x7F, np.nan_to_num(small)).astype(np.uint8) | sign


def fresh_scales(x: np.ndarray, layout: Fp8Layout, row0: int = 0) -> np.ndarray:
    """Scales for fp32 rows ``x``: per tensor a (1,) array, per channel (rows, 1), per block (tiles_r, tiles_c)."""
    rows, cols = x.shape
    if layout.kind == "tensor":
        amax = np.abs(x).max(initial=0.0).reshape(1)
    elif layout.kind == "channel":
        amax = np.abs(x).max(axis=1, initial=0.0).reshape(rows, 1)
    else:  # per block-row: column maxima and minima (two fast passes), then the maximum of each tile's columns
        bo, bi = layout.block
        tiles_r, tiles_c = math.ceil(rows / bo), math.ceil(cols / bi)
        amax = np.zeros((tiles_r, tiles_c), dtype=np.float32)
        cols_amax = np.zeros(tiles_c * bi, dtype=np.float32)  # padded: a partial edge tile adds zeros
        for tr in range(tiles_r):
            part = x[tr * bo : (tr + 1) * bo]
            if _native is not None and part.flags.c_contiguous and part.dtype == np.float32:
                _native.column_absmax(part, part.shape[0], cols, cols_amax)
            else:
                np.maximum(part.max(axis=0), -part.min(axis=0), out=cols_amax[:cols])
            amax[tr] = cols_amax.reshape(tiles_c, bi).max(axis=1)
    return _round_scale(amax.astype(np.float32) / np.float32(E4M3_MAX), layout.scale_dtype)


def encode_rows(x: np.ndarray, scale: np.ndarray, layout: Fp8Layout, row0: int = 0) -> np.ndarray:
    """fp32 rows -> E4M3 bit patterns (uint8) with the given scales (``fresh_scales`` of the same rows, or the
    whole weight's for tensor/channel with ``row0``)."""
    rows, cols = x.shape
    s = np.asarray(scale, dtype=np.float32)
    if layout.kind == "tensor":
        y = x / s.reshape(-1)[0]
    elif layout.kind == "channel":
        y = x / s.reshape(-1)[row0 : row0 + rows, None]
    else:
        bo = layout.block[0]
        y = np.empty_like(x)
        for r in range(0, rows, bo):
            np.divide(x[r : r + bo], _expand_cols(s[(row0 + r) // bo], layout, cols), out=y[r : r + bo])
    np.clip(y, -E4M3_MAX, E4M3_MAX, out=y)
    return f32_to_e4m3(y)


@dataclass
class EncodeSums:
    """What :func:`encode_measured` measured over its rows: max |e| and sum e^2 of the re-quantization error
    e = requant(x) - x, and max |d| and sum d^2 of the delta d = x - base."""

    max_error: float = 0.0
    sq_error: float = 0.0
    max_delta: float = 0.0
    sq_delta: float = 0.0

    @classmethod
    def of(cls, err: np.ndarray, delta: np.ndarray) -> EncodeSums:
        """The sums of an error and a delta array (fp32; NaN propagates through max and dot)."""
        e, d = err.reshape(-1), delta.reshape(-1)
        if e.size == 0:
            return cls()
        return cls(  # BLAS dots: one pass, no temporary
            max(float(e.max()), -float(e.min())),
            float(np.dot(e, e)),
            max(float(d.max()), -float(d.min())),
            float(np.dot(d, d)),
        )


def encode_measured(
    x: np.ndarray,
    scale: np.ndarray,
    layout: Fp8Layout,
    row0: int,
    base_q: np.ndarray,
    base_scale: np.ndarray,
    base_values: np.ndarray | None = None,
) -> tuple[np.ndarray, EncodeSums]:
    """fp32 rows ``x`` -> (E4M3 codes with ``scale``, as :func:`encode_rows`; what re-quantization cost), the delta
    measured against the stored base rows ``base_q`` with their scales ``base_scale`` (the weight's own).
    ``base_values``: those rows already decoded, if the caller kept them (the numpy passes then skip a decode;
    the C pass decodes them again on the fly, which is cheaper than keeping them)."""
    rows, cols = x.shape
    if _native is None:
        if base_values is None:
            base_values = decode_rows(base_q, base_scale, layout, row0=row0)
        return _encode_measured_numpy(x, scale, layout, row0, base_values)
    x = np.ascontiguousarray(x, np.float32)
    base_q = np.ascontiguousarray(base_q, np.uint8)
    codes = np.empty((rows, cols), np.uint8)
    sums = EncodeSums()
    runs = zip(
        _scale_runs(np.asarray(scale, np.float32), layout, row0, rows, cols),
        _scale_runs(np.asarray(base_scale, np.float32), layout, row0, rows, cols),
        strict=True,
    )
    for (r0, r1, sc, rs, cs), (_, _, bsc, brs, bcs) in runs:
        me, se, md, sd = _native.encode(
            x[r0:r1], sc, rs, cs, base_q[r0:r1], bsc, brs, bcs, r1 - r0, cols, codes[r0:r1]
        )
        sums.max_error, sums.max_delta = _nanmax(sums.max_error, me), _nanmax(sums.max_delta, md)
        sums.sq_error += se
        sums.sq_delta += sd
    return codes, sums


def _nanmax(a: float, b: float) -> float:
    return a if a != a or a >= b else b  # NaN wins, as a numpy max would


def _encode_measured_numpy(
    x: np.ndarray, scale: np.ndarray, layout: Fp8Layout, row0: int, base_values: np.ndarray
) -> tuple[np.ndarray, EncodeSums]:
    codes = encode_rows(x, scale, layout, row0=row0)
    err = decode_rows(codes, scale, layout, row0=row0)
    np.subtract(err, x, out=err)
    delta = np.subtract(x, base_values, out=base_values)  # the caller's copy: spent here
    return codes, EncodeSums.of(err, delta)


def quantize(x: np.ndarray, layout: Fp8Layout) -> tuple[np.ndarray, np.ndarray]:
    """A whole fp32 weight -> (E4M3 bit patterns, fresh scales in the layout's canonical shape)."""
    scale = fresh_scales(x, layout)
    return encode_rows(x, scale, layout), scale
