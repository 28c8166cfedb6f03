"""The torch kernel: the same block algorithm as the numpy kernel, on CPU or CUDA, plus DoRA and every float
dtype torch has.

The formulas follow PEFT's ``get_delta_weight`` (peft/tuners/lora/layer.py: Linear, Embedding, _ConvNd) and its
DoRA variants (peft/tuners/lora/dora.py), so a merge gives PEFT's ``merge_and_unload`` weights.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from loraformat.constants import TORCH_DTYPE_NAMES, StoredLayout
from loraformat.ops.kernel import Codec, Factors, Kernel


def torch_dtype(st_dtype: str) -> torch.dtype:
    return getattr(torch, TORCH_DTYPE_NAMES[st_dtype])


class DenseCodec(Codec[torch.Tensor]):
    """A plain floating-point tensor; ``copy_`` widens exactly and narrows rounding to nearest even."""

    layout = StoredLayout.DENSE

    def __init__(self, st_dtype: str) -> None:
        self.dtype = st_dtype
        self.torch_dtype = torch_dtype(st_dtype)
        self.itemsize = torch.empty(0, dtype=self.torch_dtype).element_size()
        if self.torch_dtype.is_floating_point:
            self.max_finite = float(torch.finfo(self.torch_dtype).max)

    def row_nbytes(self, cols: int) -> int:
        return cols * self.itemsize

    def _elements(self, raw: torch.Tensor, rows: int) -> torch.Tensor:
        return raw.view(self.torch_dtype).view(rows, -1)

    def decode(self, raw: torch.Tensor, start: int, stop: int, out: torch.Tensor) -> None:
        out.copy_(self._elements(raw, stop - start))

    def encode(
        self, work: torch.Tensor, start: int, stop: int, raw: torch.Tensor, *, finite: bool = False
    ) -> None:
        self._elements(raw, stop - start).copy_(work)

    def nonfinite(self, raw: torch.Tensor, rows: int) -> torch.Tensor:
        return ~torch.isfinite(self._elements(raw, rows))

    def view(self, raw: torch.Tensor, rows: int, cols: int, cd: Any) -> torch.Tensor | None:
        return self._elements(raw, rows) if self.torch_dtype == cd else None


class TorchKernel(Kernel[torch.Tensor]):
    name = "torch"

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)

    def compute_dtype(self, *st_dtypes: str) -> Any:
        return torch.float64 if "F64" in st_dtypes else torch.float32

    def codec(
        self, layout: StoredLayout, st_dtype: str, aux: dict[str, torch.Tensor] | None = None
    ) -> Codec[torch.Tensor]:
        if layout != StoredLayout.DENSE:
            raise ValueError(f"the torch kernel has no codec for {layout}")
        return DenseCodec(st_dtype)

    def any_true(self, mask: torch.Tensor) -> Any:
        flag = mask.any()
        return flag if flag.is_cuda else bool(flag)

    def within(self, work: torch.Tensor, limit: float) -> bool:
        """On the CPU one min/max pass (NaN propagates and fails the test); on CUDA "unknown", so that the
        merge reads one flag per tensor instead of synchronising on every block."""
        if self.device.type != "cpu":
            return False
        if work.numel() == 0:
            return True
        lo, hi = torch.aminmax(work)
        return bool(hi <= limit) and bool(lo >= -limit)

    def from_host(self, buffer: Any, nbytes: int) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes)

    def load(self, raw: Any, st_dtype: str, shape: Sequence[int], cd: Any) -> torch.Tensor:
        t = raw if isinstance(raw, torch.Tensor) else torch.from_numpy(raw)
        host = t.reshape(-1).view(torch.uint8).view(torch_dtype(st_dtype)).reshape(tuple(shape))
        return host.to(device=self.device, dtype=cd)

    def empty(self, count: int, cd: Any) -> torch.Tensor:
        return torch.empty(count, dtype=cd, device=self.device)

    def scale(self, x: torch.Tensor, factor: float) -> torch.Tensor:
        return x.mul(factor)

    def contiguous(self, x: Any, cd: Any) -> torch.Tensor:
        return x.to(device=self.device, dtype=cd).contiguous()

    def add_terms(
        self,
        work: torch.Tensor,
        factors: Sequence[Factors[torch.Tensor]],
        start: int,
        stop: int,
        scratch: torch.Tensor | None,
    ) -> None:
        base = work.clone() if any(f.magnitude is not None for f in factors) else None
        for f in factors:
            if f.R is None:
                work.add_(f.L[start:stop].unsqueeze(1))
                continue
            if f.magnitude is None:
                work.addmm_(f.L[start:stop], f.R)
                continue
            prod = _product(f, start, stop, work, scratch)
            assert base is not None  # DoRA: norms against the unmerged rows, as PEFT takes them
            mag = f.magnitude[start:stop].unsqueeze(1) if f.axis == 0 else f.magnitude.unsqueeze(0)
            delta = prod.to(work.dtype)  # PEFT's delta, in the work dtype
            norm = torch.linalg.vector_norm(base + delta, dim=1 - f.axis, keepdim=True)
            work.add_(delta).mul_(mag.to(work.dtype) / norm)

    def threads(self) -> contextlib.AbstractContextManager[int]:
        return cpu_threads() if self.device.type == "cpu" else contextlib.nullcontext(1)


def _product(
    f: Factors[torch.Tensor], start: int, stop: int, work: torch.Tensor, scratch: Any
) -> torch.Tensor:
    """L[start:stop] @ R (the scale is folded into R), in ``scratch`` when given."""
    assert f.R is not None
    out = None if scratch is None else scratch[: work.numel()].view(work.shape)
    return torch.mm(f.L[start:stop], f.R, out=out)


@contextlib.contextmanager
def cpu_threads() -> Iterator[int]:
    """The hasher and the writer each keep a core busy: leave them theirs, or OpenMP's spinning threads and
    the I/O threads slow each other down several times over (also for torch work inside numpy merges: the
    QLoRA round trip ran 2-6x slower on 2 threads beside them)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(previous, (os.cpu_count() or 1) - 2)))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
