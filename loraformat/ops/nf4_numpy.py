"""bitsandbytes' 4-bit round trip dequant(quant(W)) of a 16-bit weight (NF4/FP4, optional double quantization) in
numpy: the weight a QLoRA adapter trained against, for the numpy merge kernel, which never imports torch (its
import alone costs more than merging a small model).

Bit for bit loraformat/ops/nf4.py's ``roundtrip_4bit`` (the torch reference, itself bit-identical to
bitsandbytes: tests/test_ops_nf4_numpy.py checks all three), step for step: block absmax (the partial last
block's clamped to 1e-38), ``x * (1 / absmax)`` (the partial block: ``x / absmax``), the bucket's code value
from a table over the high 20 bits of the fp32 value (nf4.py's 16-bit table and one exact comparison in the few
cells holding a midpoint), code value times the block scale in fp32, one rounding to the weight's dtype. Every one of these is a single IEEE operation per element in both libraries.
Double quantization is not: its offset is torch's float32 mean and its code is built with torch.linspace, both
reproduced by loraformat/ops/aten_cpu.py for a given torch CPU capability (``capability``).

bfloat16 weights are uint16 bit patterns (numpy has no bfloat16); results are rounded as torch rounds
(loraformat/ops/bf16.py). NaN comes out as NaN where torch's does, its payload aside. No file or network I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from loraformat.errors import InvalidInputError
from loraformat.ops import aten_cpu
from loraformat.ops.bf16 import bf16_to_f32, round_bf16_in_place

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCK_SIZE = 256  # bitsandbytes quantizes the absmax vector in blocks of 256
#: the weight dtypes bitsandbytes quantizes as they are (others go through float32), as torch names them
DTYPES = ("bfloat16", "float16", "float32")
#: elements per pass: the temporaries of a pass stay in L2, and it is a multiple of every block size
_CHUNK = 1 << 16
_LUT_SIZE = 65536
_F32 = np.float32
#: bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1), sorted
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
#: get_4bit_type("fp4") before normalisation: sign, 2 exponent bits, 1 mantissa bit, in bit-pattern order; index 8
#: is +0.0, not -0.0: bitsandbytes writes it as the integer ``-0`` (dequantized zeros keep bitsandbytes' sign)
FP4_VALUES = (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


def code4(quant_type: str) -> np.ndarray:
    """The 16 code values of ``quant_type`` (fp32, normalised to max |code| = 1), by stored 4-bit index."""
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"4-bit quant type must be nf4 or fp4, not {quant_type!r}")
    data = np.array(NF4_VALUES if quant_type == "nf4" else FP4_VALUES, _F32)
    return data / np.abs(data).max()


@dataclass(frozen=True)
class Cells:
    """The bucket search of nf4.py's ``_Cells``, indexed by the unsigned high 16 bits ``u`` of the fp32 value:
    at most one midpoint lies in the 65536 floats sharing them, so ``x <= bound[u]`` (+inf where there is none,
    false for NaN) finishes the search, and ``value[2 * u + (x <= bound[u])]`` is the bucket's code value.

    ``fine`` answers most elements with one look-up: the code value by the high 20 bits, the same for all 4096
    floats of such a cell unless a midpoint lies inside it (15 of the 2**20 cells) or it is +-inf / NaN; those
    hold NaN, and their few elements take the two-step search."""

    bound: np.ndarray  # fp32 [65536]
    value: np.ndarray  # fp32 [2 * 65536]
    fine: np.ndarray  # fp32 [2**20]

    def exact(self, x: np.ndarray) -> np.ndarray:
        """The code values of a few fp32 elements, by the two-step search."""
        u = (x.view(np.uint32) >> np.uint32(16)).astype(np.intp)
        return self.value[2 * u + (x <= self.bound[u])]


@cache
def cells(quant_type: str) -> Cells:
    ordered = np.sort(code4(quant_type))
    mids = (ordered[:-1] + ordered[1:]) / _F32(2)
    high = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    ends = np.stack([high, high | np.uint32(0xFFFF)]).view(_F32)  # each cell's first and last float
    bucket = np.searchsorted(mids, ends, side="left")  # torch.bucketize's rule; NaN past every midpoint
    lo, hi = bucket.min(axis=0), bucket.max(axis=0)
    special = np.isnan(ends[1])  # exponent all ones: +-inf then NaN, or NaN only
    if np.any((hi - lo > 1) & ~special):
        raise AssertionError(f"two {quant_type} midpoints share a cell")
    beyond = np.append(mids, _F32(np.inf))
    bound = np.where(special, ends[0], np.where(hi > lo, beyond[lo], _F32(np.inf))).astype(_F32)
    if_le = np.where(special, bucket[0], lo)
    if_gt = np.where(special, bucket[1], hi)
    value = np.ascontiguousarray(ordered[np.stack([if_gt, if_le], axis=1).reshape(-1)], _F32)
    return Cells(bound, value, _fine(bound, value, special))


def _fine(bound: np.ndarray, value: np.ndarray, special: np.ndarray) -> np.ndarray:
    """Cells.fine: the 16 sub-cells of a 16-bit cell share its value, but around a midpoint (checked at both
    ends of each sub-cell) and in the +-inf / NaN cells."""
    fine = np.repeat(value[1::2], 16)
    fine[np.repeat(special, 16)] = np.nan
    for cell in np.flatnonzero(np.isfinite(bound)):
        sub = (np.uint32(cell) << np.uint32(4)) + np.arange(16, dtype=np.uint32)
        first, last = (
            (sub << np.uint32(12)).view(_F32),
            ((sub << np.uint32(12)) | np.uint32(0xFFF)).view(_F32),
        )
        split = (first <= bound[cell]) != (last <= bound[cell])
        fine[sub] = np.where(split, _F32(np.nan), value[2 * cell + (first <= bound[cell])])
    return fine


@cache
def dynamic_map(capability: str) -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map as torch builds it under ``capability`` (its linspace rounds
    differently without FMA)."""
    data: list[float] = []
    for i in range(7):
        bounds = aten_cpu.linspace_f32(0.1, 1.0, 2**i + 1, capability)
        means = (bounds[:-1] + bounds[1:]) / _F32(2)
        scale = _F32(10 ** (i - 6))
        data += (scale * means).tolist() + (-scale * means).tolist()
    data += [0.0, 1.0]
    return np.array(sorted(data), _F32)


@cache
def _lut8(capability: str) -> np.ndarray:
    """bitsandbytes' CPU lookup table: 65536 evenly spaced points of [-1, 1] -> nearest code index (a midpoint
    goes left), as nf4.py's ``_lut8``."""
    code = dynamic_map(capability)
    mid = _F32(0.5) * (code[:-1] + code[1:])
    val = _F32(-1) + (_F32(2) * np.arange(_LUT_SIZE, dtype=_F32)) / _F32(_LUT_SIZE - 1)
    return np.searchsorted(mid, val, side="left").astype(np.uint8)


def quantize_blockwise8(x: np.ndarray, capability: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 indices, fp32 block absmax): 8-bit blockwise quantization on the dynamic map in blocks of 256,
    bitsandbytes' CPU kernel (``x * (1 / absmax)`` looked up in the 65536-point table; an all-zero block stores
    index 0)."""
    x = np.ascontiguousarray(x, _F32).reshape(-1)
    n = x.size
    blocks = -(n // -NESTED_BLOCK_SIZE)
    flat = np.zeros(blocks * NESTED_BLOCK_SIZE, _F32)
    flat[:n] = x
    padded = flat.reshape(blocks, NESTED_BLOCK_SIZE)
    absmax = np.abs(padded).max(axis=1)
    zero = absmax == 0
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(zero, _F32(0), _F32(1) / absmax).astype(_F32)
    normed = np.clip(padded * inv[:, None], _F32(-1), _F32(1))
    pos = ((normed + _F32(1)) * _F32(0.5) * _F32(_LUT_SIZE - 1) + _F32(0.5)).astype(np.intp)  # truncates
    q = _lut8(capability)[pos]
    q[zero] = 0
    return q.reshape(-1)[:n], absmax


def dequantize_blockwise8(q: np.ndarray, absmax: np.ndarray, capability: str) -> np.ndarray:
    scale = np.repeat(absmax.astype(_F32), NESTED_BLOCK_SIZE)[: q.size]
    return dynamic_map(capability)[q] * scale


def double_quantized_scales(absmax: np.ndarray, capability: str) -> np.ndarray:
    """The block scales as double quantization leaves them: dequant8(quant8(absmax - offset)) + offset, the
    offset being torch's one-thread float32 mean (bitsandbytes' ``absmax.mean()``)."""
    if not np.isfinite(absmax).all():
        raise InvalidInputError(
            "the weight holds NaN or infinite values: its 4-bit block statistics cannot be double-quantized"
        )
    offset = aten_cpu.mean_f32(absmax, capability)
    q, nested = quantize_blockwise8(absmax - offset, capability)
    return dequantize_blockwise8(q, nested, capability) + offset


def _widen(w: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
    """Elements of the weight as fp32 (exact), into ``out``."""
    if dtype == "bfloat16":
        return bf16_to_f32(w, out)
    np.copyto(out, w)
    return out


#: each weight dtype's bit patterns and the mask that clears their sign
_MAGNITUDE: dict[str, tuple[np.dtype[Any], np.unsignedinteger[Any]]] = {
    "bfloat16": (np.dtype(np.uint16), np.uint16(0x7FFF)),
    "float16": (np.dtype(np.uint16), np.uint16(0x7FFF)),
    "float32": (np.dtype(np.uint32), np.uint32(0x7FFFFFFF)),
}


def _bits_to_f32(bits: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return bf16_to_f32(bits)
    return bits.view(np.float16).astype(_F32) if dtype == "float16" else bits.view(_F32).copy()


def block_absmax(w: np.ndarray, dtype: str, block_size: int) -> np.ndarray:
    """Per-block absmax (fp32) as bitsandbytes stores it: the partial last block's clamped to 1e-38.

    Taken on the bit patterns with the sign cleared, as integers: IEEE orders non-negative floats as their bits,
    and NaN's bits exceed infinity's, so a NaN still makes its block's absmax NaN (as torch's amax does); numpy's
    integer max is three times faster than its float max on blocks this short."""
    uint, mask = _MAGNITUDE[dtype]
    bits = w.view(uint)
    n = w.size
    full = n - n % block_size
    top = np.empty(-(n // -block_size), uint)
    buf = np.empty(min(_CHUNK, n), uint)
    for start in range(0, full, _CHUNK):
        stop = min(full, start + _CHUNK)
        magnitude = np.bitwise_and(bits[start:stop], mask, out=buf[: stop - start])
        np.max(magnitude.reshape(-1, block_size), axis=1, out=top[start // block_size : stop // block_size])
    if full < n:
        top[-1] = np.bitwise_and(bits[full:], mask).max()
    absmax = _bits_to_f32(top, dtype)
    if full < n:
        absmax[-1] = np.maximum(absmax[-1], _F32(1e-38))  # NaN stays NaN, as in torch's clamp
    return absmax


_F16_ULP_SHIFT = np.uint32(13 << 23)  # exponent + 13: adding 2**13 m rounds m to 2**-10 m, float16's ulp
_F16_SMALLEST_NORMAL_EXPONENT = np.uint32(113 << 23)  # 2**-14: below it, float16's ulp stays 2**-24


def round_f16_in_place(x: np.ndarray, scratch: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Round contiguous float32 ``x`` to the nearest float16 (even on ties, subnormals and overflow to inf
    included) and leave it widened, in place: twice as fast as numpy's conversion there and back.

    ``(m + c) - c`` with ``c`` = 2**13 times m's power of two (2**-1 below float16's normal range) rounds the
    magnitude m to float16's ulp at m in one IEEE addition; the sign is put back after, so -0 stays -0.
    ``scratch``: two uint32 buffers and a bool one, of at least x.size elements."""
    bits = x.view(np.uint32)
    sign, c, over = (buf[: x.size].reshape(x.shape) for buf in scratch)
    np.bitwise_and(bits, np.uint32(0x80000000), out=sign)
    np.bitwise_and(bits, np.uint32(0x7FFFFFFF), out=bits)
    np.greater_equal(x, _F32(65520), out=over)  # rounds past 65504, float16's largest: inf
    np.bitwise_and(bits, np.uint32(0x7F800000), out=c)
    np.maximum(c, _F16_SMALLEST_NORMAL_EXPONENT, out=c)
    np.add(c, _F16_ULP_SHIFT, out=c)
    np.add(x, c.view(_F32), out=x)
    np.subtract(x, c.view(_F32), out=x)
    if over.any():
        x[over] = np.inf
    np.bitwise_or(bits, sign, out=bits)
    return x


class _Pass:
    """Per-chunk buffers of :func:`roundtrip_4bit`, allocated once per weight."""

    def __init__(self, quant_type: str, size: int) -> None:
        self.cells = cells(quant_type)
        self.x = np.empty(size, _F32)
        self.idx = np.empty(size, np.uint32)
        self.vals = np.empty(size, _F32)
        self.nan = np.empty(size, np.bool_)
        self.rounded = np.empty(size, _F32)
        self.scratch = np.empty(size, np.uint32)

    def code_values(self, x: np.ndarray) -> np.ndarray:
        """Each scaled element's code value (valid until the next call): by its high 20 bits, then the exact
        search for the few whose cell could not say. uint32 indices are cheaper to make than intp ones, and
        np.take's "wrap" mode, a no-op on these in-range indices, skips the buffered bounds check."""
        n = x.size
        idx, vals, nan = self.idx[:n], self.vals[:n], self.nan[:n]
        np.right_shift(x.view(np.uint32), 12, out=idx)
        np.take(self.cells.fine, idx, out=vals, mode="wrap")
        np.isnan(vals, out=nan)
        undecided = np.flatnonzero(nan)
        if undecided.size:
            vals[undecided] = self.cells.exact(x[undecided])
        return vals

    def rescale(
        self, vals: np.ndarray, scales: np.ndarray, dtype: str, dst: np.ndarray, finite: bool
    ) -> None:
        """dst = code value * block scale, the product in fp32 rounded once to ``dtype`` and then widened into
        ``dst``: in place when ``dst`` is fp32, else through a buffer."""
        n = vals.size
        into = dst if dst.dtype == _F32 else self.rounded[:n]
        np.multiply(vals.reshape(scales.size, -1), scales[:, None], out=into.reshape(scales.size, -1))
        if dtype == "bfloat16":
            round_bf16_in_place(into, self.scratch, finite=finite)
        elif dtype == "float16":
            round_f16_in_place(into, (self.scratch, self.idx, self.nan))  # idx and nan are spent
        if into is not dst:
            np.copyto(dst, into, casting="unsafe")


class RoundTrip:
    """dequant(quant(w)) of one flat weight ``w`` (``dtype``: bfloat16 as uint16 bits, float16 or float32): its
    block statistics (absmax, the scales double quantization leaves, 1 / absmax) computed once, then the round
    trip of any run of its elements from a block boundary to a block boundary or the end, so that a merge can
    stream it through cache-sized sub-blocks of rows. ``capability``: torch's CPU capability
    (merging.devices.torch_cpu_capability()), which double quantization depends on."""

    def __init__(
        self,
        w: np.ndarray,
        dtype: str,
        *,
        quant_type: str = "nf4",
        block_size: int = 64,
        double_quant: bool = False,
        capability: str | None = None,
    ) -> None:
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"4-bit block size must be one of {BLOCK_SIZES}, not {block_size}")
        if dtype not in DTYPES:
            raise ValueError(f"the numpy 4-bit round trip takes {DTYPES} weights, not {dtype}")
        if double_quant and capability is None:
            raise ValueError("double quantization needs torch's CPU capability")
        self.dtype, self.quant_type, self.block_size, self.size = dtype, quant_type, block_size, w.size
        cells(quant_type)  # validates the quant type before any work
        self.full = w.size - w.size % block_size  # elements in whole blocks
        self.absmax = block_absmax(w.reshape(-1), dtype, block_size) if w.size else np.zeros(0, _F32)
        self.finite = bool(
            np.isfinite(self.absmax).all()
        )  # a NaN or inf element makes its block's absmax one
        self.scales = self.absmax
        if double_quant and w.size:
            self.scales = double_quantized_scales(self.absmax, str(capability))
        with np.errstate(divide="ignore", over="ignore"):
            self.inv = _F32(1) / np.maximum(self.absmax[: self.full // block_size], _F32(1e-38))
        self._pass: _Pass | None = None

    def values(self, w: np.ndarray, offset: int, out: np.ndarray) -> np.ndarray:
        """Elements [offset, offset + w.size) of the weight (``w`` holds them), rounded to the weight's dtype
        and widened into ``out`` (contiguous fp32 or fp64, w.size elements), which it returns."""
        bs, end = self.block_size, offset + w.size
        if offset % bs or (end % bs and end != self.size) or end > self.size:
            raise ValueError(
                "a run of the round trip starts on a block boundary and ends on one or at the end"
            )
        if not out.flags.c_contiguous or out.size != w.size or out.dtype not in (np.float32, np.float64):
            raise ValueError("out must be a contiguous fp32 or fp64 array of as many elements as the weight")
        w, dst = w.reshape(-1), out.reshape(-1)
        if self._pass is None or self._pass.x.size < min(_CHUNK, w.size):
            self._pass = _Pass(self.quant_type, min(_CHUNK, w.size))
        step, whole = self._pass, max(0, min(end, self.full) - offset)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            for start in range(0, whole, _CHUNK):
                stop = min(whole, start + _CHUNK)
                rows = slice((offset + start) // bs, (offset + stop) // bs)
                x = _widen(w[start:stop], self.dtype, step.x[: stop - start])
                np.multiply(x.reshape(-1, bs), self.inv[rows, None], out=x.reshape(-1, bs))
                step.rescale(step.code_values(x), self.scales[rows], self.dtype, dst[start:stop], self.finite)
            if end > self.full:  # the partial last block
                x = _widen(w[whole:], self.dtype, step.x[: w.size - whole])
                np.divide(x, self.absmax[-1], out=x)
                step.rescale(step.code_values(x), self.scales[-1:], self.dtype, dst[whole:], self.finite)
        return out


def roundtrip_4bit(
    w: np.ndarray,
    dtype: str,
    out: np.ndarray,
    *,
    quant_type: str = "nf4",
    block_size: int = 64,
    double_quant: bool = False,
    capability: str | None = None,
) -> np.ndarray:
    """dequant(quant(w)) of a whole weight into ``out`` (as :class:`RoundTrip`), which it returns."""
    trip = RoundTrip(
        w,
        dtype,
        quant_type=quant_type,
        block_size=block_size,
        double_quant=double_quant,
        capability=capability,
    )
    return trip.values(w, 0, out)
