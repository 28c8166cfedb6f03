"""bitsandbytes' 4-bit block quantization (NF4 and FP4, optional double quantization) as pure torch math.

Bit-identical to ``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit`` on CPU (bitsandbytes 0.50 is the
oracle in tests/ops/test_nf4.py), so that a QLoRA-faithful merge reproduces exactly the weight the adapter was
trained against, and a re-quantized NF4 checkpoint is what bitsandbytes itself would have written:

- quantize: per block of ``block_size`` consecutive elements (row-major, the last block partial) absmax,
  ``x * (1 / absmax)`` (a partial last block: ``x / absmax``), clamped to [-1, 1], bucketed on the midpoints
  of the sorted code, two 4-bit indices per byte (first element in the high nibble);
- double quantization: the absmax vector minus its mean, quantized with the 8-bit dynamic map in blocks of 256
  (nearest code value, ties to the lower index), the mean kept as ``offset``;
- dequantize: ``code[index] * absmax`` in fp32, rounded once to the weight dtype.

No file or network I/O: callers hand in tensors (loraformat/io/nf4.py reads and writes the checkpoint layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCK_SIZE = 256  # bitsandbytes quantizes the absmax vector in blocks of 256
QUANT_TYPES = ("nf4", "fp4")

#: bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1), sorted
_NF4 = (
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
#: get_4bit_type("fp4") before normalisation: sign, 2 exponent bits, 1 mantissa bit, in bit-pattern order
_FP4 = (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


@cache
def code4(quant_type: str) -> torch.Tensor:
    """The 16 code values of ``quant_type`` (fp32), indexed by the stored 4-bit value."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"4-bit quant type must be nf4 or fp4, not {quant_type!r}")
    data = torch.tensor(_NF4 if quant_type == "nf4" else _FP4, dtype=torch.float32)
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


def _absmax_blocks(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and the values scaled into [-1, 1], exactly as bitsandbytes' default kernel."""
    n = flat.numel()
    rem = n % block_size
    full = n - rem
    body = flat[:full].view(-1, block_size)
    absmax = body.abs().max(dim=-1)[0]
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    return absmax, scaled


def quantize_4bit(
    w: torch.Tensor, *, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = False
) -> tuple[torch.Tensor, State4bit]:
    """``w`` (F32/BF16/F16, any shape) -> (packed uint8 of shape ((numel + 1) // 2, 1), its state)."""
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"4-bit block size must be one of {BLOCK_SIZES}, not {block_size}")
    bounds, order = _bounds(quant_type)
    absmax, scaled = _absmax_blocks(w.reshape(-1).float(), block_size)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, bounds, out_int32=True)
    if quant_type != "nf4":
        q = order[q]
    q8 = q.to(torch.uint8)
    packed = ((q8[::2] << 4) | q8[1::2]).unsqueeze(1)
    state = State4bit(quant_type, block_size, tuple(w.shape), w.dtype, absmax, code4(quant_type))
    if double_quant:
        offset = absmax.mean()
        state.absmax, state.nested_absmax = quantize_blockwise8(
            absmax - offset, dynamic_map(), NESTED_BLOCK_SIZE
        )
        state.offset, state.nested_code = float(offset), dynamic_map().clone()
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
    vals = pairs[flat.int()].reshape(-1)
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
    w: torch.Tensor, *, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = False
) -> torch.Tensor:
    """dequant(quant(w)) in w's dtype: the weight a QLoRA adapter trained against, for a 16-bit base ``w``."""
    packed, state = quantize_4bit(w, quant_type=quant_type, block_size=block_size, double_quant=double_quant)
    return dequantize_4bit(packed, state)


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
