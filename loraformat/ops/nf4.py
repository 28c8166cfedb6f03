"""bitsandbytes' 4-bit block quantization (NF4 and FP4, optional double quantization) as pure torch math.

Bit-identical to ``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit`` on CPU (bitsandbytes 0.50 is the
oracle in tests/ops/test_nf4.py), so that a QLoRA-faithful merge reproduces exactly the weight the adapter was
trained against, and a re-quantized NF4 checkpoint is what bitsandbytes itself would have written:

- quantize: per block of ``block_size`` consecutive elements (row-major, the last block partial) absmax,
  ``x * (1 / absmax)`` (a partial last block: ``x / absmax``), clamped to [-1, 1], bucketed on the midpoints
  of the sorted code, two 4-bit indices per byte (first element in the high nibble); the bucket comes from a
  table over the high 16 bits of the fp32 value plus one exact comparison (:class:`_Cells`), not a binary search;
- double quantization: the absmax vector minus its mean, quantized with the 8-bit dynamic map in blocks of 256
  (nearest code value, ties to the lower index), the mean kept as ``offset``: bitsandbytes with torch on one
  thread (with more, a long absmax vector's mean depends on the thread count: :func:`_double_quantize`);
- dequantize: ``code[index] * absmax`` in fp32, rounded once to the weight dtype.

No file or network I/O: callers hand in tensors (loraformat/io/nf4.py reads and writes the checkpoint layout).
The reference for loraformat/ops/nf4_numpy.py, the same round trip in numpy for merges that never import torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from loraformat.errors import InvalidInputError
from loraformat.ops.nf4_numpy import BLOCK_SIZES, FP4_VALUES, NESTED_BLOCK_SIZE, NF4_VALUES

QUANT_TYPES = ("nf4", "fp4")


@cache
def code4(quant_type: str) -> torch.Tensor:
    """The 16 code values of ``quant_type`` (fp32), indexed by the stored 4-bit value."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"4-bit quant type must be nf4 or fp4, not {quant_type!r}")
    data = torch.tensor(NF4_VALUES if quant_type == "nf4" else FP4_VALUES, dtype=torch.float32)
    return data.div_(data.abs().max())


@cache
def _bounds(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = code4(quant_type)
    order = torch.argsort(code)
    return (code[order[:-1]] + code[order[1:]]) / 2, order


@cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``), the code of double quantization."""
    data: list[float] = []
    non_sign_bits, max_exponent_bits = 7, 7
    for i in range(max_exponent_bits):
        items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@dataclass
class State4bit:
    """Everything needed to dequantize one 4-bit weight (bitsandbytes' QuantState, as tensors and scalars)."""

    quant_type: str
    block_size: int
    shape: tuple[int, ...]
    dtype: torch.dtype  # the weight dtype dequantization rounds to
    absmax: torch.Tensor  # fp32 per block, or uint8 indices into nested_code when double-quantized
    code: torch.Tensor
    offset: float | None = None  # double quantization: mean of the absmax vector
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_block_size: int = NESTED_BLOCK_SIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None


@cache
def _lut8(code_key: tuple[float, ...]) -> torch.Tensor:
    """bitsandbytes' CPU lookup table: 65536 evenly spaced points of [-1, 1] -> nearest code index (the midpoint
    itself goes left), so that quantize_blockwise rounds exactly as its C kernel does."""
    code = torch.tensor(code_key, dtype=torch.float32)
    mid = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(_LUT_SIZE, dtype=torch.float32)
    val = -1.0 + (2.0 * i) / (_LUT_SIZE - 1)
    return torch.searchsorted(mid, val, side="left").to(torch.uint8)


_LUT_SIZE = 65536


def quantize_blockwise8(
    x: torch.Tensor, code: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization on a 256-entry code (bitsandbytes 0.50's CPU kernel: x * (1 / absmax) looked
    up in a 65536-point table; an all-zero block stores index 0)."""
    x = x.reshape(-1).float()
    n = x.numel()
    blocks = -(n // -block_size)
    padded = torch.nn.functional.pad(x, (0, blocks * block_size - n)).view(blocks, block_size)
    absmax = padded.abs().amax(dim=1)
    inv = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)
    normed = (padded * inv[:, None]).clamp_(-1.0, 1.0)
    pos = ((normed + 1.0) * 0.5 * float(_LUT_SIZE - 1) + 0.5).to(torch.int64)
    q = _lut8(tuple(code.tolist()))[pos.reshape(-1)[:n]]
    zero = (absmax == 0).repeat_interleave(block_size)[:n]
    return q.masked_fill_(zero, 0), absmax


def dequantize_blockwise8(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block_size: int
) -> torch.Tensor:
    n = q.numel()
    vals = code[q.reshape(-1).long()]
    scale = absmax.float().repeat_interleave(block_size)[:n]
    return vals * scale


_HALF_OR_SINGLE = (torch.bfloat16, torch.float16, torch.float32)
#: elements per pass: the fp32 / int32 temporaries of a pass stay in L2, and it is a multiple of every block size
_CHUNK = 1 << 16


@dataclass(frozen=True)
class _Cells:
    """``bucketize(x, midpoints)`` for fp32 ``x`` without its binary search (about 25 ns an element on one core).

    A cell is the 65536 floats sharing their high 16 bits (sign, exponent and 7 mantissa bits): an interval far
    narrower than the gap between two midpoints, so it holds at most one of them, and one exact comparison
    against that midpoint (+inf where there is none) finishes the search. Slot ``2 * cell + (x <= bound)`` then
    holds the answer; NaN compares false and lands in slot ``2 * cell``, which holds NaN's bucket (the last)."""

    bound: torch.Tensor  # fp32 [65536], by cell
    index: torch.Tensor  # uint8 [2 * 65536], by slot: the stored 4-bit index
    value: torch.Tensor  # fp32 [2 * 65536], by slot: its code value


def _cell_ends() -> torch.Tensor:
    """The first and last fp32 of every cell, cell ``c`` being the high half ``(c - 32768)`` as a signed int."""
    high = (torch.arange(1 << 16, dtype=torch.int64) ^ 0x8000) << 16
    ends = torch.stack([high, high | 0xFFFF])
    return torch.where(ends >= 1 << 31, ends - (1 << 32), ends).to(torch.int32).view(torch.float32)


@cache
def _cells(quant_type: str) -> _Cells:
    bounds, order = _bounds(quant_type)
    ends = _cell_ends()
    ends_bucket = torch.bucketize(ends, bounds)  # the reference itself, at both ends of every cell
    lo, hi = ends_bucket.amin(dim=0), ends_bucket.amax(dim=0)
    special = ends[1].isnan()  # exponent all ones: +-inf then NaN, or NaN only
    if bool(((hi - lo > 1) & ~special).any()):
        raise AssertionError(f"two {quant_type} midpoints share a cell")
    beyond = torch.cat([bounds, torch.tensor([math.inf])])
    bound = torch.where(special, ends[0], torch.where(hi > lo, beyond[lo], math.inf))
    if_le = torch.where(special, ends_bucket[0], lo)
    if_gt = torch.where(special, ends_bucket[1], hi)
    stored = order[torch.stack([if_gt, if_le], dim=1).reshape(-1)]
    return _Cells(bound, stored.to(torch.uint8), code4(quant_type)[stored])


class _Search:
    """Reusable per-chunk buffers for :meth:`slots`: allocated once per weight, not once per chunk."""

    def __init__(self, quant_type: str, size: int) -> None:
        self.cells = _cells(quant_type)
        self.idx = torch.empty(size, dtype=torch.int32)
        self.bound = torch.empty(size, dtype=torch.float32)
        self.le = torch.empty(size, dtype=torch.bool)

    def slots(self, x: torch.Tensor) -> torch.Tensor:
        """Each element's slot in the cell tables (contiguous fp32 ``x``; valid until the next call)."""
        n = x.numel()
        idx, bound, le = self.idx[:n], self.bound[:n], self.le[:n]
        torch.bitwise_right_shift(x.view(torch.int32), 16, out=idx)
        idx.add_(32768)
        torch.index_select(self.cells.bound, 0, idx, out=bound)
        torch.le(x, bound, out=le)
        return torch.add(le, idx, alpha=2, out=idx)


def _check_block_size(block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"4-bit block size must be one of {BLOCK_SIZES}, not {block_size}")


def _flat(w: torch.Tensor) -> torch.Tensor:
    """The weight as bitsandbytes reads it: flat, and in fp32 unless half or single (exact either way)."""
    flat = w.reshape(-1)
    return flat if flat.dtype in _HALF_OR_SINGLE else flat.float()


def _block_absmax(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """Per-block absmax (fp32) as bitsandbytes stores it: the partial last block's is clamped to 1e-38. Widened
    to fp32 a chunk at a time first (exact): abs and max are several times faster on fp32 than on 16-bit."""
    n = flat.numel()
    full = n - n % block_size
    absmax = torch.empty(full // block_size)
    buf = torch.empty(min(_CHUNK, full))
    for start in range(0, full, _CHUNK):
        stop = min(full, start + _CHUNK)
        x = buf[: stop - start]
        x.copy_(flat[start:stop]).abs_()
        torch.amax(x.view(-1, block_size), dim=1, out=absmax[start // block_size : stop // block_size])
    if full == n:
        return absmax
    tail = flat[full:].abs().max().float().clamp(min=1e-38)
    return torch.cat([absmax, tail.unsqueeze(0)])


def _scaled_chunks(
    flat: torch.Tensor, absmax: torch.Tensor, block_size: int, buf: torch.Tensor
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, stop, x): runs of whole blocks scaled as bitsandbytes scales them, ``x * (1 / absmax)`` (into
    ``buf``), then the partial last block, ``x / absmax``. Unclamped: every midpoint lies inside (-1, 1), so
    clamping to [-1, 1] never changes a bucket (NaN stays NaN either way)."""
    n = flat.numel()
    full = n - n % block_size
    inv = 1.0 / absmax[: full // block_size].clamp(min=1e-38)
    for start in range(0, full, _CHUNK):
        stop = min(full, start + _CHUNK)
        rows = (stop - start) // block_size
        x = buf[: stop - start]
        scale = inv[start // block_size : start // block_size + rows, None]
        x.copy_(flat[start:stop]).view(rows, block_size).mul_(scale)
        yield start, stop, x
    if full < n:
        yield full, n, flat[full:].float() / absmax[-1]


def _double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(uint8 indices, nested absmax, offset): the absmax vector minus its mean on the 8-bit dynamic map.

    The mean is taken on one thread: torch splits a long reduction between its threads, so the offset's last
    bit (and, through it, an ulp of a few weights) would otherwise depend on the machine's core count."""
    if not bool(torch.isfinite(absmax).all()):
        raise InvalidInputError(
            "the weight holds NaN or infinite values: its 4-bit block statistics cannot be double-quantized"
        )
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        offset = absmax.mean()
    finally:
        torch.set_num_threads(previous)
    q, nested = quantize_blockwise8(absmax - offset, dynamic_map(), NESTED_BLOCK_SIZE)
    return q, nested, float(offset)


def quantize_4bit(
    w: torch.Tensor, *, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = False
) -> tuple[torch.Tensor, State4bit]:
    """``w`` (F32/BF16/F16, any shape) -> (packed uint8 of shape ((numel + 1) // 2, 1), its state)."""
    _check_block_size(block_size)
    flat = _flat(w)
    absmax = _block_absmax(flat, block_size)
    search = _Search(quant_type, min(_CHUNK, flat.numel()))
    q = torch.empty(flat.numel() + flat.numel() % 2, dtype=torch.uint8)
    for start, stop, x in _scaled_chunks(flat, absmax, block_size, torch.empty(min(_CHUNK, flat.numel()))):
        torch.index_select(search.cells.index, 0, search.slots(x), out=q[start:stop])
    if flat.numel() % 2:  # an odd count pads one scaled 0.0
        q[-1:] = search.cells.index[search.slots(torch.zeros(1))]
    packed = ((q[::2] << 4) | q[1::2]).unsqueeze(1)
    state = State4bit(quant_type, block_size, tuple(w.shape), w.dtype, absmax, code4(quant_type))
    if double_quant:
        state.absmax, state.nested_absmax, state.offset = _double_quantize(absmax)
        state.nested_code = dynamic_map().clone()
    return packed, state


def block_absmax(state: State4bit) -> torch.Tensor:
    """The fp32 per-block scales, undoing double quantization."""
    if state.nested_absmax is None:
        return state.absmax.float()
    assert state.nested_code is not None and state.offset is not None
    nested = dequantize_blockwise8(
        state.absmax, state.nested_absmax, state.nested_code, state.nested_block_size
    )
    return nested + torch.tensor(state.offset, dtype=torch.float32)


def dequantize_4bit_f32(packed: torch.Tensor, state: State4bit) -> torch.Tensor:
    """code[index] * absmax in fp32, shaped like the weight (before the final rounding to its dtype)."""
    n = math.prod(state.shape)
    flat = packed.reshape(-1).view(torch.uint8)
    code = state.code.float()
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # byte -> (high, low) values
    vals = pairs.index_select(0, flat.int()).reshape(-1)
    bs = state.block_size
    blocks = -(n // -bs)
    if vals.numel() < blocks * bs:
        vals = torch.nn.functional.pad(vals, (0, blocks * bs - vals.numel()))
    out = vals[: blocks * bs].view(blocks, bs).mul_(block_absmax(state).view(-1, 1))
    return out.reshape(-1)[:n].reshape(state.shape)


def dequantize_4bit(packed: torch.Tensor, state: State4bit) -> torch.Tensor:
    """As bitsandbytes' dequantize_4bit: the weight in ``state.dtype``."""
    return dequantize_4bit_f32(packed, state).to(state.dtype)


def roundtrip_4bit(
    w: torch.Tensor,
    *,
    quant_type: str = "nf4",
    block_size: int = 64,
    double_quant: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """dequant(quant(w)) in w's dtype: the weight a QLoRA adapter trained against, for a 16-bit base ``w``.

    Bit for bit ``dequantize_4bit(*quantize_4bit(w))``, but chunk by chunk in cache and without packing: each
    element goes from its scaled value to its code value and is rescaled at once. ``out`` (contiguous, any float
    dtype, ``w.numel()`` elements) receives the result, rounded to w's dtype first, and is returned."""
    _check_block_size(block_size)
    flat = _flat(w)
    absmax = _block_absmax(flat, block_size)
    scales = absmax
    if double_quant:
        q, nested, offset = _double_quantize(absmax)
        dq = dequantize_blockwise8(q, nested, dynamic_map(), NESTED_BLOCK_SIZE)
        scales = dq + torch.tensor(offset, dtype=torch.float32)
    result = torch.empty(w.shape, dtype=w.dtype) if out is None else out
    dst = result.view(-1)
    rounded = w.dtype if w.dtype in _HALF_OR_SINGLE else torch.float32  # as bitsandbytes rounds
    tmp = None if dst.dtype == rounded else torch.empty(min(_CHUNK, dst.numel()), dtype=rounded)
    search = _Search(quant_type, min(_CHUNK, flat.numel()))
    for start, stop, x in _scaled_chunks(flat, absmax, block_size, torch.empty(min(_CHUNK, flat.numel()))):
        vals = torch.index_select(search.cells.value, 0, search.slots(x), out=x)  # x is spent: reuse it
        _rescale(vals, scales, start, block_size, dst[start:stop], tmp)
    return result


def _rescale(
    vals: torch.Tensor,
    scales: torch.Tensor,
    start: int,
    block_size: int,
    dst: torch.Tensor,
    tmp: torch.Tensor | None,
) -> None:
    """dst = code value * block scale, the product in fp32 rounded once: straight into ``dst`` when it has the
    rounding dtype, else into ``tmp`` (which has it) and then widened into ``dst``."""
    n = vals.numel()
    into = dst if tmp is None else tmp[:n]
    if n % block_size:  # the partial last block alone
        torch.mul(vals, scales[start // block_size], out=into)
    else:
        first = start // block_size
        rows = n // block_size
        torch.mul(
            vals.view(rows, block_size), scales[first : first + rows, None], out=into.view(rows, block_size)
        )
    if tmp is not None:
        dst.copy_(into)


def state_summary(state: State4bit) -> dict[str, Any]:
    """The non-tensor part of the state, as bitsandbytes packs it into ``quant_state.bitsandbytes__<type>``."""
    out: dict[str, Any] = {
        "quant_type": state.quant_type,
        "blocksize": state.block_size,
        "dtype": str(state.dtype).removeprefix("torch."),
        "shape": list(state.shape),
    }
    if state.double_quant:
        out.update(
            nested_blocksize=state.nested_block_size, nested_dtype="float32", nested_offset=state.offset
        )
    return out
