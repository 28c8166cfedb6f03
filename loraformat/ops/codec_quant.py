"""Merge-kernel codecs for quantized layouts (loraformat.ops.kernel.Codec): FP8 E4M3 with tensor, channel or block
scales, bitsandbytes 4-bit (NF4/FP4), and the QLoRA-faithful 4-bit round trip of a 16-bit weight.

One codec object serves as both the decoder and the encoder of its tensor, so that it can measure what the
re-quantization costs: the decoded base rows of each block are kept until the block is encoded, and
``error`` accumulates, over every merged element, e = requant(W + ΔW) - (W + ΔW) against ΔW = (W + ΔW) - W.
Fresh scales (and bitsandbytes' state) produced by ``encode`` are handed to the writer through ``side``.
numpy arrays in and out (bitsandbytes' math runs in torch inside the checkpoint codecs, in numpy in the round trip
one where it can); no file or network I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from loraformat.constants import StoredLayout
from loraformat.ops import fp8, nf4_numpy
from loraformat.ops.bf16 import f32_to_bf16
from loraformat.ops.kernel import Codec
from loraformat.ops.kernel_numpy import STORAGE, DenseCodec


@dataclass
class ErrorStats:
    """Running max and sum of squares of the re-quantization error and of the delta it is compared with."""

    max_error: float = 0.0
    sq_error: float = 0.0
    max_delta: float = 0.0
    sq_delta: float = 0.0
    elements: int = 0

    def add(self, err: np.ndarray, delta: np.ndarray) -> None:
        if err.size:
            self.add_sums(fp8.EncodeSums.of(err, delta), err.size)

    def add_sums(self, sums: fp8.EncodeSums, elements: int) -> None:
        self.merge(ErrorStats(sums.max_error, sums.sq_error, sums.max_delta, sums.sq_delta, elements))

    def merge(self, other: ErrorStats) -> None:
        self.max_error = max(self.max_error, other.max_error)
        self.max_delta = max(self.max_delta, other.max_delta)
        self.sq_error += other.sq_error
        self.sq_delta += other.sq_delta
        self.elements += other.elements

    def report(self) -> dict[str, float | int]:
        """max |e| / max |ΔW| and RMS(e) / RMS(ΔW) (0 when the adapter changed nothing)."""
        rel_max = self.max_error / self.max_delta if self.max_delta else 0.0
        rel_rms = math.sqrt(self.sq_error / self.sq_delta) if self.sq_delta else 0.0
        return {
            "max_rel": rel_max,
            "rms_rel": rel_rms,
            "max_abs": self.max_error,
            "rms_abs": math.sqrt(self.sq_error / self.elements) if self.elements else 0.0,
            "elements": self.elements,
        }


class _Measured(Codec[np.ndarray]):
    """Keeps each block's decoded base rows so that ``encode`` can measure the error against the delta."""

    def __init__(self) -> None:
        self.error = ErrorStats()
        self._base: tuple[int, np.ndarray] | None = None
        self.side: dict[str, bytes] = {}  # companion role -> bytes, complete once the last block is encoded

    def _keep(self, start: int, out: np.ndarray) -> None:
        self._base = (start, out.copy())

    def _measure(self, start: int, work: np.ndarray, requant: np.ndarray) -> None:
        if self._base is None or self._base[0] != start or self._base[1].shape != work.shape:
            return
        base = self._base[1]
        np.subtract(work, base, out=base)  # the delta, in the kept buffer
        np.subtract(requant, work, out=requant)
        self.error.add(requant, base)
        self._base = None


class Fp8Codec(_Measured):
    """F8_E4M3 rows with the stored scales (decode) and fresh absmax/448 scales (encode, ``side["scale"]``).

    Instead of a copy of the decoded base rows, it keeps the stored codes it decoded (the merge holds them until
    the block is encoded) and measures the error and the delta in the encode pass (``fp8.encode_measured``)."""

    layout = StoredLayout.FP8
    dtype = "F8_E4M3"

    def __init__(self, layout: fp8.Fp8Layout, scale: np.ndarray, shape: tuple[int, int]) -> None:
        super().__init__()
        self.fp8_layout, self.scale, self.shape = layout, scale.astype(np.float32), shape
        self._codes: tuple[int, np.ndarray, np.ndarray | None] | None = None
        self.fresh = np.zeros(layout.scale_shape(*shape), np.float32)

    def row_nbytes(self, cols: int) -> int:
        return cols

    def decode(self, raw: np.ndarray, start: int, stop: int, out: np.ndarray) -> None:
        q = raw.reshape(stop - start, -1)
        values = fp8.decode_rows(q, self.scale, self.fp8_layout, row0=start, out=out)
        if values is not out:
            np.copyto(out, values, casting="same_kind")
        self._codes = (start, q, None if fp8.native() else out.copy())

    def nonfinite(self, raw: np.ndarray, rows: int) -> np.ndarray:
        """E4M3 has no infinity; its NaNs are 0x7F and 0xFF."""
        return ((raw & 0x7F) == 0x7F).reshape(rows, -1)

    def _fresh_rows(self, work: np.ndarray, start: int, stop: int) -> np.ndarray:
        kind = self.fp8_layout.kind
        if kind == "tensor":
            if (start, stop) != (0, self.shape[0]):
                raise ValueError("a per-tensor FP8 scale needs the whole tensor in one block")
            self.fresh[...] = fp8.fresh_scales(work, self.fp8_layout)
        elif kind == "channel":
            self.fresh[start:stop] = fp8.fresh_scales(work, self.fp8_layout)
        else:
            bo = self.fp8_layout.block[0]
            self.fresh[start // bo : -(stop // -bo)] = fp8.fresh_scales(work, self.fp8_layout)
        return self.fresh

    def encode(
        self, work: np.ndarray, start: int, stop: int, raw: np.ndarray, *, finite: bool = False
    ) -> None:
        x = np.asarray(work, np.float32)
        scale = self._fresh_rows(x, start, stop)
        kept, self._codes = self._codes, None
        if kept is not None and kept[0] == start and kept[1].shape == x.shape:
            q, sums = fp8.encode_measured(x, scale, self.fp8_layout, start, kept[1], self.scale, kept[2])
            self.error.add_sums(sums, x.size)
        else:
            q = fp8.encode_rows(x, scale, self.fp8_layout, row0=start)
        raw[:] = q.reshape(-1)
        if stop >= self.shape[0]:
            stored = fp8.stored_scales(self.fresh, self.fp8_layout.scale_dtype)
            self.side["scale"] = np.ascontiguousarray(stored).tobytes()


@dataclass(frozen=True)
class Bnb4Spec:
    """A bitsandbytes 4-bit quantization: what QLoRA trained against, or how a checkpoint stores a weight."""

    quant_type: str  # nf4 | fp4
    block_size: int
    double_quant: bool
    dtype: str  # torch dtype name the weight dequantizes to (its compute-side value)


#: stored dtype -> (a numpy dtype of its width torch can wrap, the torch dtype name to view that as)
_STORED_VIEW: dict[str, tuple[np.dtype[Any], str]] = {
    "BF16": (np.dtype(np.int16), "bfloat16"),
    "F16": (np.dtype(np.float16), "float16"),
    "F32": (np.dtype(np.float32), "float32"),
}


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


class Bnb4Codec(_Measured):
    """A packed bitsandbytes 4-bit weight (whole tensor): dequantized with its stored state, re-quantized with
    the same quant type, block size and double quantization; ``side`` holds the new absmax, nested absmax and
    the state JSON's new nested offset (``side_offset``)."""

    layout = StoredLayout.BNB4
    dtype = "U8"

    def __init__(
        self, spec: Bnb4Spec, shape: tuple[int, ...], state: dict[str, np.ndarray], offset: float | None
    ):
        super().__init__()
        self.spec, self.shape, self.arrays, self.offset = spec, shape, state, offset
        self.new_offset: float | None = None
        self._bad: np.ndarray | None = None

    def row_nbytes(self, cols: int) -> int:
        return cols // 2

    def nonfinite(self, raw: np.ndarray, rows: int) -> np.ndarray:
        """4-bit codes have no inf/NaN: the mask is that of the values last encoded (NaN poisons a block)."""
        if self._bad is not None and self._bad.shape[0] == rows:
            return self._bad
        return np.zeros((rows, max(1, raw.size * 2 // max(rows, 1))), bool)

    def _state(self) -> Any:
        import torch

        from loraformat.ops.nf4 import State4bit

        a = self.arrays
        return State4bit(
            self.spec.quant_type,
            self.spec.block_size,
            tuple(self.shape),
            _torch_dtype(self.spec.dtype),
            torch.from_numpy(a["absmax"].copy()),
            torch.from_numpy(a["quant_map"].copy()),
            self.offset,
            torch.from_numpy(a["nested_absmax"].copy()) if "nested_absmax" in a else None,
            torch.from_numpy(a["nested_quant_map"].copy()) if "nested_quant_map" in a else None,
        )

    def decode(self, raw: np.ndarray, start: int, stop: int, out: np.ndarray) -> None:
        import torch

        from loraformat.ops.kernel_torch import cpu_threads
        from loraformat.ops.nf4 import dequantize_4bit

        if (start, stop) != (0, self.shape[0]):
            raise ValueError("a bitsandbytes 4-bit weight is decoded whole")
        with cpu_threads():
            w = dequantize_4bit(torch.from_numpy(np.ascontiguousarray(raw)), self._state())
        np.copyto(out, w.float().numpy().reshape(out.shape), casting="same_kind")
        self._keep(start, out)

    def encode(
        self, work: np.ndarray, start: int, stop: int, raw: np.ndarray, *, finite: bool = False
    ) -> None:
        import torch

        from loraformat.ops.kernel_torch import cpu_threads
        from loraformat.ops.nf4 import dequantize_4bit, quantize_4bit

        self._bad = ~np.isfinite(work)
        x = torch.from_numpy(np.ascontiguousarray(work, np.float32)).reshape(self.shape)
        with cpu_threads():
            packed, state = quantize_4bit(
                x,
                quant_type=self.spec.quant_type,
                block_size=self.spec.block_size,
                double_quant=self.spec.double_quant,
            )
            state.dtype = _torch_dtype(self.spec.dtype)
            requant = dequantize_4bit(packed, state).float().numpy().reshape(work.shape)
        raw[:] = packed.reshape(-1).numpy()
        self._measure(start, np.asarray(work, np.float32), requant)
        self.side["absmax"] = state.absmax.numpy().tobytes()
        if state.nested_absmax is not None:
            self.side["nested_absmax"] = state.nested_absmax.numpy().tobytes()
        self.new_offset = state.offset


class Bnb4RoundtripCodec(Codec[np.ndarray]):
    """A 16-bit weight decoded as QLoRA saw it: dequant(quant(W)) in the weight's dtype (bitsandbytes' round trip,
    bit for bit), then widened exactly. The block scales and the double-quant offset span the whole tensor:
    :meth:`prepare` takes them from all of it, then :meth:`decode` gives any rows (the merge's cache-sized
    sub-blocks, whole groups of 4-bit blocks).

    In numpy (loraformat/ops/nf4_numpy.py), so that a QLoRA-faithful merge on the numpy kernel never imports
    torch; in torch (loraformat/ops/nf4.py, the whole round trip at once) where the numpy port cannot be sure to
    match it: double quantization without torch's CPU capability (``capability``:
    merging.devices.torch_cpu_capability())."""

    layout = StoredLayout.DENSE

    def __init__(
        self, st_dtype: str, spec: Bnb4Spec, shape: tuple[int, ...], capability: str | None = None
    ) -> None:
        self.dtype, self.spec, self.shape, self.capability = st_dtype, spec, shape, capability
        self.dense = DenseCodec(st_dtype)
        self.max_finite = self.dense.max_finite
        self.cols = math.prod(shape[1:])
        self._trip: nf4_numpy.RoundTrip | None = None  # prepared, in numpy
        self._done: np.ndarray | None = None  # prepared, in torch: the whole round trip

    def row_nbytes(self, cols: int) -> int:
        return self.dense.row_nbytes(cols)

    def nonfinite(self, raw: np.ndarray, rows: int) -> np.ndarray:
        return self.dense.nonfinite(raw, rows)

    def prepare(self, raw: np.ndarray, start: int, stop: int) -> None:
        if (start, stop) != (0, self.shape[0]):
            raise ValueError("a QLoRA round trip needs the whole tensor")
        if self.spec.dtype in nf4_numpy.DTYPES and (
            self.capability is not None or not self.spec.double_quant
        ):
            self._trip = nf4_numpy.RoundTrip(
                self._weight_numpy(raw, start, stop, None),
                self.spec.dtype,
                quant_type=self.spec.quant_type,
                block_size=self.spec.block_size,
                double_quant=self.spec.double_quant,
                capability=self.capability,
            )
        else:
            self._done = np.empty((stop, self.cols), np.float32)
            self._decode_torch(raw, start, stop, self._done)

    def decode(self, raw: np.ndarray, start: int, stop: int, out: np.ndarray) -> None:
        if self._trip is None and self._done is None:
            self.prepare(raw, start, stop)  # decoded whole, without the merge's prepare
        if self._done is not None:
            np.copyto(out, self._done[start:stop], casting="same_kind")
        else:
            assert self._trip is not None
            direct = out.flags.c_contiguous and out.dtype in (np.float32, np.float64)
            target = out if direct else np.empty(out.shape, np.float32)
            self._trip.values(self._weight_numpy(raw, start, stop, out), start * self.cols, target)
            if not direct:
                np.copyto(out, target, casting="same_kind")
        if stop >= self.shape[0]:
            self._trip = self._done = None  # the last rows: the statistics are spent

    def _weight_numpy(self, raw: np.ndarray, start: int, stop: int, out: np.ndarray | None) -> np.ndarray:
        """The stored rows as elements of the spec's dtype (bfloat16 as uint16 bits): the stored bytes
        themselves when that is their dtype, else decoded (into ``out`` if given) and narrowed as torch does."""
        view = _STORED_VIEW.get(self.dtype)
        if view is not None and view[1] == self.spec.dtype:
            return raw.view(STORAGE[self.dtype])
        wide = np.empty((stop - start, self.cols), np.float32) if out is None else out
        self.dense.decode(raw, start, stop, wide)
        narrow = np.ascontiguousarray(wide, np.float32)
        if self.spec.dtype == "bfloat16":
            return f32_to_bf16(narrow)
        return narrow.astype(np.float16) if self.spec.dtype == "float16" else narrow.copy()

    def _decode_torch(self, raw: np.ndarray, start: int, stop: int, out: np.ndarray) -> None:
        import torch

        from loraformat.ops.kernel_torch import cpu_threads
        from loraformat.ops.nf4 import roundtrip_4bit

        target = torch.from_numpy(out) if out.flags.c_contiguous else None
        with cpu_threads():
            rt = roundtrip_4bit(
                self._weight(raw, start, stop, out),
                quant_type=self.spec.quant_type,
                block_size=self.spec.block_size,
                double_quant=self.spec.double_quant,
                out=None if target is None else target.view(-1),
            )
        if target is None:
            np.copyto(out, rt.float().numpy().reshape(out.shape), casting="same_kind")

    def _weight(self, raw: np.ndarray, start: int, stop: int, out: np.ndarray) -> Any:
        """The stored weight as a torch tensor of the spec's dtype: the stored bytes themselves when that is
        their dtype (no widening and narrowing back), else decoded into ``out`` and converted."""
        import torch

        dtype = _torch_dtype(self.spec.dtype)
        view = _STORED_VIEW.get(self.dtype)
        if view is not None and view[1] == self.spec.dtype and raw.ctypes.data % view[0].itemsize == 0:
            data = raw if raw.flags.writeable else raw.copy()  # torch warns on read-only arrays
            return torch.from_numpy(data.view(view[0])).view(dtype)
        self.dense.decode(raw, start, stop, out)
        return torch.from_numpy(np.ascontiguousarray(out, np.float32)).to(
            dtype, copy=True
        )  # out gets the result

    def encode(
        self, work: np.ndarray, start: int, stop: int, raw: np.ndarray, *, finite: bool = False
    ) -> None:
        self.dense.encode(work, start, stop, raw, finite=finite)
