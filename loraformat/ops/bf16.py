"""bfloat16 <-> float32 in integer arithmetic on numpy arrays: numpy has no bfloat16, and ml_dtypes' (which
has one) costs 0.6 s to import, more than merging a small model. Pure functions, no I/O.

bfloat16 is the upper half of a float32: widening is a 16-bit shift, exact; narrowing rounds to nearest even by
adding 0x7FFF plus the lowest kept bit and dropping the low half (a finite value past bfloat16's largest carries
into the exponent and becomes inf, as torch's cast makes it). NaN would carry anywhere, even into the sign, so
NaN elements are set afterwards to a quiet NaN of the same sign. tests/test_ops_kernel.py checks every class of
bit pattern against torch.
"""

from __future__ import annotations

import numpy as np

#: the largest finite bfloat16 (0x7F7F)
BF16_MAX = 3.3895313892515355e38
#: the distance from 1 to the next bfloat16 (7 mantissa bits)
BF16_EPS = 2.0**-7
_MAGNITUDE = np.uint32(0x7FFFFFFF)
_INF_BITS = np.uint32(0x7F800000)


def bf16_to_f32(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (or into ``out``, which may be fp64 or strided), exactly."""
    if out is not None and out.dtype == np.float32 and out.flags.c_contiguous:
        np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)
        return out
    wide = np.left_shift(bits, 16, dtype=np.uint32).view(np.float32)
    if out is None:
        return wide
    np.copyto(out, wide, casting="unsafe")
    return out


def f32_to_bf16(
    x: np.ndarray, out: np.ndarray | None = None, *, finite: bool = False, scratch: np.ndarray | None = None
) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even; NaN stays NaN.

    ``finite``: the caller checked every element is finite (the NaN pass is skipped). ``scratch``: a uint32
    buffer of at least x.size elements reused for the rounding (a merge calls this on every block)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if out is None:
        out = np.empty(x.shape, np.uint16)
    bits = x.view(np.uint32)
    tmp = (
        np.empty(x.shape, np.uint32)
        if scratch is None
        else scratch.view(np.uint32)[: x.size].reshape(x.shape)
    )
    np.right_shift(bits, 16, out=tmp)
    np.bitwise_and(tmp, 1, out=tmp)
    np.add(tmp, 0x7FFF, out=tmp)
    np.add(tmp, bits, out=tmp)
    np.right_shift(tmp, 16, out=tmp)
    np.copyto(out, tmp, casting="unsafe")
    if not finite:
        nan = np.bitwise_and(bits, _MAGNITUDE) > _INF_BITS
        if nan.any():
            out[nan] = (bits[nan] >> 16).astype(np.uint16) | 0x7FC0
    return out


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16, as float32 (a scale stored in BF16)."""
    return bf16_to_f32(f32_to_bf16(x)).reshape(np.shape(x))


def round_bf16_in_place(x: np.ndarray, scratch: np.ndarray, *, finite: bool = False) -> np.ndarray:
    """Round contiguous float32 ``x`` to the nearest bfloat16 (even on ties) and leave it widened, in place: the
    bits of :func:`f32_to_bf16` without the uint16 copy and the widening back. ``scratch``: a uint32 buffer of
    x.size elements. ``finite``: the caller knows there is no NaN (NaN stays a quiet NaN of its sign)."""
    bits = x.view(np.uint32)
    tmp = scratch[: x.size].reshape(x.shape)
    np.right_shift(bits, 16, out=tmp)
    np.bitwise_and(tmp, 1, out=tmp)
    np.add(tmp, 0x7FFF, out=tmp)
    np.add(tmp, bits, out=tmp)
    nan = None if finite else np.isnan(x)
    kept = bits[nan] if nan is not None and nan.any() else None
    np.bitwise_and(tmp, np.uint32(0xFFFF0000), out=bits)
    if kept is not None:
        bits[nan] = ((kept >> 16) | 0x7FC0) << 16
    return x
