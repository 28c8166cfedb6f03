"""The numpy kernel: a CPU merge that never imports torch.

``import torch`` costs seconds of one core, about as long as copying a small model; on CPU the merge itself is
a few elementwise passes and one thin matrix product per block, which numpy does as well. It runs the block
algorithm of :class:`loraformat.ops.kernel.Kernel` with the same operation order as the torch kernel; the two
differ only by their BLAS libraries' summation order, within the bound ops/kernel.py states. Not here: DoRA (its norms are reductions whose summation order differs between the
libraries) and dtypes other than BF16/F16/F32/F64; the merge picks the torch kernel for those.

numpy has no bfloat16 of its own: bf16 tensors are held as uint16 bit patterns and converted in integer
arithmetic (loraformat/ops/bf16.py), with torch's bits.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from loraformat.constants import StoredLayout
from loraformat.ops.bf16 import BF16_MAX, bf16_to_f32, f32_to_bf16
from loraformat.ops.finite import nonfinite_mask
from loraformat.ops.kernel import Codec, Factors, Kernel

#: safetensors dtype -> numpy dtype of its stored elements (BF16 as raw uint16 bit patterns)
STORAGE: dict[str, type[np.generic]] = {
    "BF16": np.uint16,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
}
#: the largest finite value of each stored dtype
MAX_FINITE = {
    "BF16": BF16_MAX,
    "F16": float(np.finfo(np.float16).max),
    "F32": float(np.finfo(np.float32).max),
    "F64": float(np.finfo(np.float64).max),
}


class DenseCodec(Codec[np.ndarray]):
    """A plain floating-point tensor: widening is exact, narrowing rounds once to nearest even. fp64 goes
    through fp32 on its way to BF16 and F16, as torch's conversions do, so that both kernels agree."""

    layout = StoredLayout.DENSE

    def __init__(self, st_dtype: str) -> None:
        self.dtype = st_dtype
        self.storage = STORAGE[st_dtype]
        self.max_finite = float(MAX_FINITE[st_dtype])
        self._scratch: np.ndarray | None = None  # the integer rounding's temporary, reused block after block

    def row_nbytes(self, cols: int) -> int:
        return cols * np.dtype(self.storage).itemsize

    def _elements(self, raw: np.ndarray, rows: int) -> np.ndarray:
        return raw.view(self.storage).reshape(rows, -1)

    def decode(self, raw: np.ndarray, start: int, stop: int, out: np.ndarray) -> None:
        src = self._elements(raw, stop - start)
        if self.dtype == "BF16":
            bf16_to_f32(src, out)
        else:
            np.copyto(out, src, casting="unsafe")

    def encode(
        self, work: np.ndarray, start: int, stop: int, raw: np.ndarray, *, finite: bool = False
    ) -> None:
        out = self._elements(raw, stop - start)
        with np.errstate(over="ignore", invalid="ignore"):  # out of range rounds to inf, as in torch
            if self.dtype in ("BF16", "F16") and work.dtype == np.float64:
                work = work.astype(np.float32)
            if self.dtype == "BF16":
                if self._scratch is None or self._scratch.size < work.size:
                    self._scratch = np.empty(work.size, np.uint32)
                f32_to_bf16(work, out, finite=finite, scratch=self._scratch)
            else:
                np.copyto(out, work, casting="same_kind")

    def nonfinite(self, raw: np.ndarray, rows: int) -> np.ndarray:
        return nonfinite_mask(raw, self.dtype).reshape(rows, -1)

    def view(self, raw: np.ndarray, rows: int, cols: int, cd: Any) -> np.ndarray | None:
        return self._elements(raw, rows) if self.storage is cd else None


class NumpyKernel(Kernel[np.ndarray]):
    name = "numpy"

    def compute_dtype(self, *st_dtypes: str) -> Any:
        return np.float64 if "F64" in st_dtypes else np.float32

    def codec(
        self, layout: StoredLayout, st_dtype: str, aux: dict[str, np.ndarray] | None = None
    ) -> Codec[np.ndarray]:
        if layout != StoredLayout.DENSE or st_dtype not in STORAGE:
            raise ValueError(f"the numpy kernel has no codec for {layout} {st_dtype}")
        return DenseCodec(st_dtype)

    def unsupported(self, st_dtypes: Iterable[str], dora: bool) -> str | None:
        if sys.byteorder != "little":
            return "a big-endian host"
        if dora:
            return "DoRA"
        for dt in st_dtypes:
            if dt not in STORAGE:
                return f"dtype {dt}"
        return None

    def any_true(self, mask: np.ndarray) -> bool:
        return bool(mask.any())

    def within(self, work: np.ndarray, limit: float) -> bool:
        """Two reductions (max and min propagate NaN, so a NaN fails the test), cheaper than testing the
        encoded bits."""
        if work.size == 0:
            return True
        return bool(work.max() <= limit and work.min() >= -limit)

    def from_host(self, buffer: Any, nbytes: int) -> np.ndarray:
        if nbytes == 0:
            return np.empty(0, np.uint8)
        return np.frombuffer(buffer, dtype=np.uint8, count=nbytes)

    def load(self, raw: Any, st_dtype: str, shape: Sequence[int], cd: Any) -> np.ndarray:
        out = np.empty(math.prod(shape), cd).reshape(max(1, shape[0] if shape else 1), -1)
        DenseCodec(st_dtype).decode(np.asarray(raw, np.uint8).reshape(-1), 0, out.shape[0], out)
        return out.reshape(tuple(shape))

    def empty(self, count: int, cd: Any) -> np.ndarray:
        return np.empty(count, cd)

    def scale(self, x: np.ndarray, factor: float) -> np.ndarray:
        return x * factor

    def contiguous(self, x: Any, cd: Any) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=cd)

    def add_terms(
        self,
        work: np.ndarray,
        factors: Sequence[Factors[np.ndarray]],
        start: int,
        stop: int,
        scratch: np.ndarray | None,
    ) -> None:
        for f in factors:
            if f.R is None:
                np.add(work, f.L[start:stop, None], out=work, casting="same_kind")
                continue
            prod = None if scratch is None else scratch[: work.size].reshape(work.shape)
            prod = np.matmul(f.L[start:stop], f.R, out=prod)
            np.add(work, prod, out=work)

    def threads(self) -> contextlib.AbstractContextManager[int]:
        return _one_blas_thread()


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[int]:
    """The merge makes many short, thin products; OpenBLAS's extra threads then spin between them and take the
    core the writer and the hasher need (measured: 41 % of a 2.2 GB merge's CPU samples in OpenBLAS's thread
    server on 2 cores, the merge 2.4x slower). threadpoolctl limits them for the merge only (an environment
    variable would have to be set before numpy loads, which a library cannot promise)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield 1
