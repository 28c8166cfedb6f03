"""numpy twin of the streaming form of :mod:`loraformat.ops.delta`, so that a CPU merge never imports torch.

``import torch`` costs seconds of one core, about as long as copying a small model; on CPU the merge itself is
a few elementwise passes and one thin matrix product per block, which numpy does as well. Same math as
:func:`loraformat.ops.delta.merge_rows_`: decode to fp32 (fp64 when the base or the output is fp64), add
``scale * L[start:stop] @ R`` per term, round once to the output dtype. DoRA is not handled here (it stays on
torch). Pure functions of arrays: no file or network I/O.

numpy has no bfloat16 of its own: bf16 tensors are held as uint16 bit patterns and converted through ml_dtypes'
bfloat16 (one C pass each way, rounding to nearest even exactly as torch does; about 4x faster than the same
conversion written as numpy bit operations).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from loraformat.constants import LayerKind

#: safetensors dtype -> numpy dtype of its stored elements (BF16 as raw uint16 bit patterns)
STORAGE: dict[str, type[np.generic]] = {
    "BF16": np.uint16,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
}
_BF16 = np.dtype(ml_dtypes.bfloat16)


def compute_dtype(*st_dtypes: str) -> type[np.floating[Any]]:
    """fp64 when any input or output is F64, else fp32 (as :func:`loraformat.ops.delta.compute_dtype`)."""
    return np.float64 if "F64" in st_dtypes else np.float32


def nonfinite(stored: np.ndarray, st_dtype: str) -> np.ndarray:
    """Mask of inf/NaN elements of stored values (bf16 is held as uint16 bits: exponent all ones)."""
    if st_dtype == "BF16":
        return (stored & 0x7F80) == 0x7F80
    return ~np.isfinite(stored)


def introduces_nonfinite(out: np.ndarray, out_dtype: str, src: np.ndarray, src_dtype: str) -> bool:
    """Does ``out`` hold inf/NaN where ``src`` (the same rows before merging) was finite?"""
    bad = nonfinite(out, out_dtype)
    return bool(bad.any()) and bool((bad & ~nonfinite(src, src_dtype)).any())


def lora_factors(A: Any, B: Any, kind: str, fan_in_fan_out: bool = False) -> tuple[Any, Any]:
    """(L, R) with dW = L @ R over the stored weight viewed (rows, cols); works on torch tensors and arrays.

    linear (out, in): L = B, R = A. Conv1D (in, out) and embedding (num, dim): dW = A^T B^T, so L = A^T,
    R = B^T. conv (out, in, k...): L = B (out, r), R = A (r, in*k...) -- PEFT's conv of A^T with the 1x1 kernel
    B is exactly this product.
    """
    r = A.shape[0]
    if kind == LayerKind.LINEAR and not fan_in_fan_out:
        return B, A
    if kind in (LayerKind.LINEAR, LayerKind.EMBEDDING):
        return A.T, B.T
    if kind == LayerKind.CONV:
        return B.reshape(B.shape[0], r), A.reshape(r, -1)
    raise ValueError(f"unknown layer kind {kind!r}")


# --- dtype conversion ---------------------------------------------------------------------------------------


def bf16_to_f32(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly (the upper half of a float32)."""
    if out is None:
        return bits.view(_BF16).astype(np.float32)
    np.copyto(out, bits.view(_BF16), casting="unsafe")
    return out


def f32_to_bf16(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even; NaN stays NaN."""
    if out is None:
        return x.astype(_BF16).view(np.uint16)
    np.copyto(out.view(_BF16), x, casting="unsafe")
    return out


def decode(src: np.ndarray, st_dtype: str, out: np.ndarray) -> np.ndarray:
    """Stored elements (``STORAGE[st_dtype]``) -> ``out`` in the compute dtype, exactly (only widening)."""
    np.copyto(out, src.view(_BF16) if st_dtype == "BF16" else src, casting="unsafe")
    return out


def encode(work: np.ndarray, st_dtype: str, out: np.ndarray) -> np.ndarray:
    """``work`` (fp32 or fp64) -> ``out`` (``STORAGE[st_dtype]``), rounded once to nearest even.

    fp64 goes through fp32 on its way to BF16 and F16, as torch's conversions do, so that both backends agree.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # out of range rounds to inf, as in torch
        if st_dtype in ("BF16", "F16") and work.dtype == np.float64:
            work = work.astype(np.float32)
        if st_dtype == "BF16":
            return f32_to_bf16(work, out)
        np.copyto(out, work, casting="same_kind")
    return out


def to_compute(stored: np.ndarray, st_dtype: str, dtype: type[np.floating[Any]]) -> np.ndarray:
    """A whole stored tensor (e.g. an adapter factor) as a new array in the compute dtype."""
    out = np.empty(stored.shape, dtype)
    return decode(stored, st_dtype, out)


# --- terms and row blocks -----------------------------------------------------------------------------------


@dataclass
class NpTerm:
    """One adapter's contribution to one base tensor: rows of dW (stored layout viewed 2-D) = scale * L @ R;
    for a lora_bias term ``L`` is the bias vector (rows,) and ``R`` is None. The scale multiplies the product,
    as PEFT's ``(B @ A) * scaling`` does (folding it into a factor rounds differently: up to 2 bf16 ulps from
    PEFT where W + dW nearly cancels)."""

    L: np.ndarray
    R: np.ndarray | None
    scale: float


def lora_term_np(
    A: np.ndarray,
    B: np.ndarray,
    scale: float,
    kind: str = LayerKind.LINEAR,
    *,
    fan_in_fan_out: bool = False,
    dtype: type[np.floating[Any]] = np.float32,
) -> NpTerm:
    """As :func:`loraformat.ops.delta.lora_term` (without DoRA): factors made contiguous once, in ``dtype``."""
    L, R = lora_factors(A, B, kind, fan_in_fan_out)
    L, R = np.ascontiguousarray(L, dtype=dtype), np.ascontiguousarray(R, dtype=dtype)
    if math.frexp(scale)[0] == 0.5 and np.isfinite(R * dtype(scale)).all():
        # a power of two (alpha = 2r, alpha = r, ...) scales every product and sum exactly: fold it into R
        # and save a pass per block, with the very same result
        R, scale = R * dtype(scale), 1.0
    return NpTerm(L, R, float(scale))


def bias_term_np(bias_B: np.ndarray, scale: float, *, dtype: type[np.floating[Any]] = np.float32) -> NpTerm:
    """A lora_bias contribution to a base bias of shape (out,)."""
    return NpTerm(np.ascontiguousarray(bias_B.reshape(-1), dtype=dtype), None, float(scale))


def merge_rows_np_(
    work: np.ndarray, terms: Sequence[NpTerm], start: int, stop: int, scratch: np.ndarray | None = None
) -> np.ndarray:
    """Merge rows [start, stop) in place: ``work`` holds those rows in the compute dtype, viewed
    (stop - start, cols); terms apply in turn. ``scratch``: at least work.size elements of work's dtype for the
    products (allocated when None). Returns ``work``.
    """
    n = stop - start
    if n <= 0 or not terms:
        return work
    for t in terms:
        scale = work.dtype.type(t.scale)
        if t.R is None:
            work += (t.L[start:stop] * scale)[:, None]
            continue
        prod = None if scratch is None else scratch[: work.size].reshape(work.shape)
        prod = np.matmul(t.L[start:stop], t.R, out=prod)
        if t.scale != 1.0:
            prod *= scale
        work += prod
    return work
