"""The merge kernel interface: decode a block of stored rows to the compute dtype, add the terms, encode once.

A merge streams each target tensor through here a block of rows at a time (merging/engine.py owns the loop).
A :class:`Kernel` is the array library the math runs in (numpy: ops/kernel_numpy.py, torch on CPU or CUDA:
ops/kernel_torch.py); a :class:`Codec` is how one stored layout is turned into compute-dtype rows and back
(plain floating point today; quantized layouts add codecs, see :meth:`Kernel.codec`). Both kernels run the
same :meth:`Kernel.merge_block` with the same operation order -- per term ``work += L @ (scale * R)`` in the
work dtype (fp32; fp64 when the base or the output is F64), then one rounding to the stored dtype.

Where the kernels may differ, and by how much (tests/test_ops_kernel.py checks these bounds on random shapes,
tests/test_merge.py on every fixture): a product ``L @ R`` sums ``r`` terms, and BLAS libraries (numpy's
OpenBLAS, torch's MKL, cuBLAS) choose their own summation order, so a product can differ between kernels in
its last fp32 bit or two. After ``work += prod`` and the one rounding to the stored dtype this shows only where
the exact sum lies within that much of a rounding boundary of the output: BF16/F16 outputs differ in about one
element in 10^4 or fewer, by one ulp; F32 outputs in a few percent of the merged elements, by an ulp or two.
Each kernel is, element by element, within ``ulp(out)/2 + (r + 2) * eps * (|L| @ |R|)`` of the exact result
(eps of the work dtype), which is what "the math in fp32, rounded once" promises and what PEFT's own merge
does. The same bound holds for any partition of the rows into blocks, but the bits need not: MKL in particular
picks its summation order by the block's shape and its thread count. A run is reproducible with the same
kernel, device and blocks -- which the block plan fixes from the tensor's shape and dtype -- so a split merge's
workers write byte for byte the shards of the whole merge on the same kind of machine. (An earlier design
formed the products in fp64 to hide the order; that doubled the cost of a CPU merge, and on most GPUs far
more, for a difference below PEFT's own rounding.)

Everything here is pure: arrays in, arrays out, no file or network I/O.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from loraformat.constants import LayerKind, StoredLayout
from loraformat.ops.term import Term, lora_factors

T = TypeVar("T")  # the kernel's array type: numpy.ndarray or torch.Tensor


@dataclass
class Factors(Generic[T]):
    """A term prepared for row blocks of the stored weight viewed (rows, cols): rows [s, e) of its delta are
    ``L[s:e] @ R`` (the scale folded into R, in the work dtype); for a lora_bias term ``L`` is the scaled bias (rows,)
    and ``R`` is None."""

    L: T
    R: T | None
    axis: int = 0  # DoRA channel axis of the 2-D view
    magnitude: T | None = None


class Codec(ABC, Generic[T]):
    """One stored layout of one tensor <-> rows in the compute dtype.

    ``raw`` arguments are 1-D uint8 arrays holding exactly rows [start, stop) as stored (``row_nbytes`` bytes a
    row); ``start``/``stop`` are absolute row numbers, so a codec whose layout carries per-row or per-block
    side data (scales, quantisation state, given to :meth:`Kernel.codec`) can find the part that applies.
    """

    layout: StoredLayout
    dtype: str  # the stored element dtype (safetensors name)
    #: the largest finite stored value, when the stored dtype has one: work within +-max_finite encodes to
    #: finite values, so the merge can skip its inf/NaN check on the encoded rows (None: always check)
    max_finite: float | None = None

    @abstractmethod
    def row_nbytes(self, cols: int) -> int:
        """Stored bytes of one row of ``cols`` logical elements."""

    @abstractmethod
    def decode(self, raw: T, start: int, stop: int, out: T) -> None:
        """Stored rows -> ``out`` (stop - start, cols) in the compute dtype, exactly."""

    @abstractmethod
    def encode(self, work: T, start: int, stop: int, raw: T, *, finite: bool = False) -> None:
        """Compute-dtype rows -> stored bytes, rounded once (to nearest even). ``finite``: the caller checked
        that every element of ``work`` is finite and within +-:attr:`max_finite` (an encoder may then skip its
        inf/NaN handling)."""

    @abstractmethod
    def nonfinite(self, raw: T, rows: int) -> T:
        """A boolean mask of the stored rows' inf/NaN elements, shaped (rows, cols)."""

    def prepare(self, raw: T, start: int, stop: int) -> None:
        """Called with each block's stored rows before they are decoded, possibly a few rows at a time: a codec
        whose statistics span the block (the QLoRA round trip's) takes them here. Nothing by default."""

    def view(self, raw: T, rows: int, cols: int, cd: Any) -> T | None:
        """``raw`` viewed as (rows, cols) elements of the compute dtype ``cd`` when that is how the rows are
        stored (the merge then works in place), else None."""
        return None


class Kernel(ABC, Generic[T]):
    """The array library a merge computes in. Subclasses provide storage, codecs and the term arithmetic;
    :meth:`merge_block` is the one block algorithm every kernel runs."""

    name: ClassVar[str]

    # -- what a subclass provides ---------------------------------------------------------------------------
    @abstractmethod
    def compute_dtype(self, *st_dtypes: str) -> Any:
        """fp64 when any stored dtype is F64, else fp32: the precision of the rows, factors and products."""

    @abstractmethod
    def codec(self, layout: StoredLayout, st_dtype: str, aux: dict[str, T] | None = None) -> Codec[T]:
        """The codec of one stored tensor; ``aux`` holds its side tensors (e.g. scales) already loaded."""

    @abstractmethod
    def from_host(self, buffer: Any, nbytes: int) -> T:
        """A 1-D uint8 array over ``nbytes`` of a host buffer (a mapping, a numpy array), without a copy."""

    @abstractmethod
    def load(self, raw: Any, st_dtype: str, shape: Sequence[int], cd: Any) -> T:
        """A whole stored tensor (host uint8 bytes) decoded into the compute dtype on the kernel's device."""

    @abstractmethod
    def empty(self, count: int, cd: Any) -> T:
        """An uninitialised 1-D array of ``count`` elements of ``cd`` on the kernel's device."""

    @abstractmethod
    def scale(self, x: T, factor: float) -> T:
        """A new array ``factor * x`` (rounded in x's dtype)."""

    @abstractmethod
    def contiguous(self, x: Any, cd: Any) -> T:
        """``x`` as a contiguous array of ``cd`` on the kernel's device (a copy only when needed)."""

    @abstractmethod
    def add_terms(
        self, work: T, factors: Sequence[Factors[T]], start: int, stop: int, scratch: T | None
    ) -> None:
        """work (stop - start, cols) += each term's rows, in order: ``work += L @ R`` in the work dtype (the
        product rounded, then the sum rounded; ``scratch`` holds the product where the library needs one)."""

    def within(self, work: T, limit: float) -> bool:
        """True when every element of ``work`` is finite and within +-``limit`` (False: unknown). A kernel
        answers it where that is cheaper than testing the encoded rows (never on a device that would stall)."""
        return False

    @abstractmethod
    def any_true(self, mask: T) -> Any:
        """Whether ``mask`` has a true element: a bool, or (CUDA) a 0-d device tensor read once per tensor, so
        that a GPU merge does not synchronise on every block."""

    def unsupported(self, st_dtypes: Iterable[str], dora: bool) -> str | None:
        """Why this kernel cannot merge a tensor (None: it can)."""
        return None

    def threads(self) -> AbstractContextManager[int]:
        """A context limiting the library's own threads while merging; yields their number."""
        return nullcontext(1)

    # -- the one algorithm ----------------------------------------------------------------------------------
    def prepare(self, term: Term[T]) -> Factors[T]:
        """Factor a loaded term (its tensors in the work dtype) as L @ R over the stored layout, contiguous."""
        pd = term.B.dtype  # type: ignore[attr-defined]
        scale = float(term.scale)
        if term.kind == LayerKind.BIAS:
            return Factors(self.scale(self.contiguous(term.B.reshape(-1), pd), scale), None)  # type: ignore[attr-defined]
        assert term.A is not None
        L, R = lora_factors(term.A, term.B, term.kind, term.fan_in_fan_out)
        mag = None if term.magnitude is None else self.contiguous(term.magnitude.reshape(-1), pd)  # type: ignore[attr-defined]
        return Factors(self.contiguous(L, pd), self.scale(self.contiguous(R, pd), scale), term.axis, mag)

    def merge_block(
        self,
        src: T,
        dec: Codec[T],
        out: T,
        enc: Codec[T],
        factors: Sequence[Factors[T]],
        start: int,
        stop: int,
        cols: int,
        *,
        sub_rows: int = 0,
    ) -> Any:
        """Rows [start, stop): stored bytes ``src`` -> decoded, merged, encoded once into stored bytes ``out``.

        ``sub_rows`` > 0 works through the block that many rows at a time (CPU: the fp32 work stays in cache);
        DoRA with column channels needs the whole tensor in one block and one pass (``sub_rows`` 0). Returns
        whether the merge wrote inf/NaN where the stored rows were finite (spec/v1.md §16: the caller abandons
        the output), as :meth:`any_true` gives it.
        """
        n = stop - start
        introduced: Any = False
        if n <= 0 or cols <= 0:
            return introduced
        cd = self.compute_dtype(dec.dtype, enc.dtype)
        step = n if sub_rows <= 0 else min(sub_rows, n)
        direct = enc.view(out, n, cols, cd)  # the output holds the compute dtype: merge in place
        work = None if direct is not None else self.empty(step * cols, cd)
        scratch = self.empty(step * cols, cd) if any(f.R is not None for f in factors) else None
        src_row, out_row = dec.row_nbytes(cols), enc.row_nbytes(cols)
        dec.prepare(src, start, stop)
        for s0 in range(0, n, step):
            s1 = min(n, s0 + step)
            if direct is not None:
                w = direct[s0:s1]  # type: ignore[index]
            else:
                w = work[: (s1 - s0) * cols].reshape(s1 - s0, cols)  # type: ignore[index]
            dec.decode(src[s0 * src_row : s1 * src_row], start + s0, start + s1, w)  # type: ignore[index]
            checked = False
            if factors:
                self.add_terms(w, factors, start + s0, start + s1, scratch)
                checked = enc.max_finite is not None and self.within(w, enc.max_finite)
            if direct is None:
                raw = out[s0 * out_row : s1 * out_row]  # type: ignore[index]
                enc.encode(w, start + s0, start + s1, raw, finite=checked)
            if factors and not checked:
                src_rows = src[s0 * src_row : s1 * src_row]  # type: ignore[index]
                out_rows = out[s0 * out_row : s1 * out_row]  # type: ignore[index]
                introduced = introduced | self._introduced(dec, src_rows, enc, out_rows, s1 - s0)
        return introduced

    def _introduced(self, dec: Codec[T], src: T, enc: Codec[T], out: T, rows: int) -> Any:
        """inf/NaN in the merged rows where the stored rows were finite; one reduction when all is finite."""
        bad = enc.nonfinite(out, rows)
        if self.any_true(bad) is False:
            return False
        return self.any_true(bad & ~dec.nonfinite(src, rows))  # type: ignore[operator]
