"""Checks on stored floating-point bits: NaN/Inf counts and all-zero tests without decoding a value.

``validate --level data`` reads every tensor of an adapter, and a merge checks each block it wrote; testing the
exponent bits of the raw elements is one cheap pass and needs neither torch (whose import alone costs more than the whole check of a 25 MB adapter) nor a
conversion to fp32. Pure functions of numpy arrays.
"""

from __future__ import annotations

import numpy as np

#: safetensors dtype -> (unsigned storage, exponent mask, mantissa mask)
_LAYOUT: dict[str, tuple[type[np.unsignedinteger], int, int]] = {
    "BF16": (np.uint16, 0x7F80, 0x007F),
    "F16": (np.uint16, 0x7C00, 0x03FF),
    "F32": (np.uint32, 0x7F800000, 0x007FFFFF),
    "F64": (np.uint64, 0x7FF0000000000000, 0x000FFFFFFFFFFFFF),
}


def checkable(st_dtype: str) -> bool:
    return st_dtype in _LAYOUT


def nonfinite_mask(raw: np.ndarray, st_dtype: str) -> np.ndarray:
    """True where an element stored in ``raw`` is inf or NaN (its exponent bits are all ones)."""
    storage, exp, _ = _LAYOUT[st_dtype]
    e = storage(exp)
    return (raw.view(storage) & e) == e


def non_finite(raw: np.ndarray, st_dtype: str) -> tuple[int, int]:
    """(NaN count, Inf count) of the elements stored in the uint8 array ``raw``."""
    storage, _, mant = _LAYOUT[st_dtype]
    bad = nonfinite_mask(raw, st_dtype)
    if not bad.any():
        return 0, 0
    special = raw.view(storage)[bad]
    nan = int(np.count_nonzero(special & storage(mant)))
    return nan, int(special.size) - nan


def all_zero(raw: np.ndarray, st_dtype: str) -> bool:
    """Every element is +0 or -0."""
    storage, exp, mant = _LAYOUT[st_dtype]
    return not bool(np.any(raw.view(storage) & storage(exp | mant)))
