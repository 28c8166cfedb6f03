"""LoRA merge math: the delta a LoRA module adds to its base weight, DoRA, lora_bias, weighted sums.

Pure functions of tensors (CPU or CUDA, no file or network I/O). Everything is computed in fp32 (fp64 when the
base or the output is fp64) and rounded once, by the caller, to the output dtype. The formulas follow PEFT's
``get_delta_weight`` (peft/tuners/lora/layer.py: Linear, Embedding, _ConvNd) and its DoRA variants
(peft/tuners/lora/dora.py, variants.py), so a merge here gives PEFT's ``merge_and_unload`` weights.

Two forms of the same math:

- :func:`delta_weight` / :func:`merge_weight` build a whole tensor, as PEFT writes it (the reference);
- :class:`LoraTerm` + :func:`merge_rows_` merge a block of rows of the base weight in place, with one
  ``addmm_`` per adapter, so a streaming merge never holds more than a block in fp32. Every layer kind is a
  product ``L @ R`` of two thin factors in the stored layout (see :func:`lora_term`), which is what makes
  row blocks possible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraformat.constants import LayerKind
from loraformat.ops.delta_np import lora_factors


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp64 when any input or output is fp64, else fp32: the precision every merge is computed in."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """PEFT's ``transpose``: GPT-2's Conv1D stores (in, out), so its delta is transposed."""
    return weight.T if fan_in_fan_out else weight


# --- whole tensors (the reference form) ---------------------------------------------------------------------


def delta_weight(
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    kind: str = LayerKind.LINEAR,
    *,
    fan_in_fan_out: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The whole delta dW in the stored layout of the base weight, unrounded (fp32 unless ``dtype``).

    linear: transpose(B @ A, fan_in_fan_out) * s; embedding: (B @ A)^T * s (A is r x num_embeddings);
    conv 1x1: (B @ A) over the channel dims; conv kxk: conv(A^T, B)^T * s, as PEFT computes them.
    """
    cd = dtype or compute_dtype(A.dtype, B.dtype)
    a, b = A.to(cd), B.to(cd)
    if kind == LayerKind.LINEAR:
        return transpose(b @ a, fan_in_fan_out) * scale
    if kind == LayerKind.EMBEDDING:
        return (b @ a).T * scale
    if kind == LayerKind.CONV:
        if all(k == 1 for k in a.shape[2:]):  # 1x1: a plain product over the channel dims
            r = a.shape[0]
            return (b.reshape(b.shape[0], r) @ a.reshape(r, a.shape[1])).reshape(
                b.shape[0], a.shape[1], *a.shape[2:]
            ) * scale
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[a.dim()]
        return conv(a.transpose(0, 1), b).transpose(0, 1) * scale
    raise ValueError(f"unknown layer kind {kind!r}")


def channel_axis(kind: str, fan_in_fan_out: bool = False) -> int:
    """The axis of the stored weight that indexes DoRA's output channels (one magnitude each).

    nn.Linear and conv store (out, in, ...): axis 0. Conv1D (fan_in_fan_out) stores (in, out) and PEFT's
    embedding DoRA normalises per embedding dimension, a column of (num_embeddings, dim): axis 1.
    """
    if kind == LayerKind.EMBEDDING or (kind == LayerKind.LINEAR and fan_in_fan_out):
        return 1
    return 0


def _norm_except(x: torch.Tensor, axis: int) -> torch.Tensor:
    """L2 norm over every dim but ``axis``, kept broadcastable against ``x``."""
    dims = tuple(d for d in range(x.dim()) if d != axis)
    return torch.linalg.vector_norm(x, dim=dims, keepdim=True)


def dora_weight(
    weight: torch.Tensor,
    delta: torch.Tensor,
    magnitude: torch.Tensor,
    axis: int,
    *,
    norm_base: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoRA: W' = m / ||W0 + dW|| * (W + dW), one norm per output channel along ``axis``.

    ``norm_base`` is W0, the unmerged base weight PEFT takes the norm of; it differs from ``weight`` only when
    other adapters were merged first (PEFT merges in turn and always normalises against the unmerged base).
    """
    base = weight if norm_base is None else norm_base
    shape = [1] * weight.dim()
    shape[axis] = -1
    factor = magnitude.to(delta.dtype).reshape(shape) / _norm_except(base + delta, axis)
    return factor * (weight + delta)


@dataclass
class AdapterDelta:
    """One adapter's contribution to one base weight, in whole-tensor form (see :func:`merge_weight`)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float  # s * weight
    kind: str = LayerKind.LINEAR
    fan_in_fan_out: bool = False
    magnitude: torch.Tensor | None = None  # DoRA


def merge_weight(
    weight: torch.Tensor, deltas: Sequence[AdapterDelta], out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """W' for a whole tensor: deltas applied in turn (PEFT's order), computed in fp32/fp64, rounded once."""
    out_dtype = out_dtype or weight.dtype
    cd = compute_dtype(weight.dtype, out_dtype)
    w0 = weight.to(cd)
    w = w0.clone()
    for d in deltas:
        dw = delta_weight(d.A, d.B, d.scale, d.kind, fan_in_fan_out=d.fan_in_fan_out, dtype=cd)
        if d.magnitude is None:
            w = w + dw
        else:
            w = dora_weight(w, dw, d.magnitude, channel_axis(d.kind, d.fan_in_fan_out), norm_base=w0)
    return w.to(out_dtype)


def lora_bias_delta(bias_B: torch.Tensor, scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """lora_bias: PEFT adds s * lora_B.bias to the base layer's bias."""
    return bias_B.to(dtype) * scale


# --- row blocks (the streaming form) ------------------------------------------------------------------------


def rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    """How a stored tensor is viewed for row-block merging: (shape[0], everything else); 1-D is (n, 1)."""
    if len(shape) == 0:
        return 1, 1
    rows = int(shape[0])
    return rows, (math.prod(shape[1:]) if len(shape) > 1 else 1)


@dataclass
class LoraTerm:
    """One adapter's contribution to one base tensor, prepared for row blocks of its (rows, cols) view.

    For a LoRA module, dW (stored layout, viewed 2-D) = scale * L @ R. For a lora_bias term, ``L`` is the
    bias vector (rows,) and ``R`` is None.
    """

    L: torch.Tensor
    R: torch.Tensor | None
    scale: float
    axis: int = 0  # DoRA channel axis of the 2-D view
    magnitude: torch.Tensor | None = None

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    def delta_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of scale * dW, unrounded."""
        if self.R is None:
            return (self.L[start:stop] * self.scale).unsqueeze(1)
        return torch.mm(self.L[start:stop], self.R) * self.scale


def lora_term(
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    kind: str = LayerKind.LINEAR,
    *,
    fan_in_fan_out: bool = False,
    magnitude: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> LoraTerm:
    """Factor a module's delta as L @ R over the stored layout viewed (rows, cols).

    linear (out, in): L = B, R = A. Conv1D (in, out) and embedding (num, dim): dW = A^T B^T, so L = A^T,
    R = B^T. conv (out, in, k...): L = B (out, r), R = A (r, in*k...) -- PEFT's conv of A^T with the 1x1 kernel
    B is exactly this product. The factors are made contiguous once, in the compute dtype, on ``device``.
    """
    L, R = lora_factors(A, B, kind, fan_in_fan_out)  # shared with the numpy backend
    mag = None if magnitude is None else magnitude.reshape(-1).to(device=device, dtype=dtype).contiguous()
    return LoraTerm(
        L=L.to(device=device, dtype=dtype).contiguous(),
        R=R.to(device=device, dtype=dtype).contiguous(),
        scale=float(scale),
        axis=channel_axis(kind, fan_in_fan_out),
        magnitude=mag,
    )


def bias_term(
    bias_B: torch.Tensor,
    scale: float,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> LoraTerm:
    """A lora_bias contribution to a base bias of shape (out,)."""
    return LoraTerm(
        L=bias_B.reshape(-1).to(device=device, dtype=dtype).contiguous(), R=None, scale=float(scale)
    )


def introduces_nonfinite(out: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor: does ``out`` hold inf/NaN where ``src`` (the same rows before merging) was finite? One
    reduction in the common all-finite case; stays on the device so a GPU merge need not synchronise per block."""
    import torch

    bad = ~torch.isfinite(out)
    return (
        (bad & torch.isfinite(src)).any()
        if out.is_cuda
        else (bad.any() and (bad & torch.isfinite(src)).any())
    )


def needs_whole_tensor(terms: Sequence[LoraTerm]) -> bool:
    """DoRA with channels along axis 1 needs column norms over every row, so the block must be the whole tensor."""
    return any(t.is_dora and t.axis != 0 for t in terms)


def merge_rows_(work: torch.Tensor, terms: Sequence[LoraTerm], start: int, stop: int) -> torch.Tensor:
    """Merge rows [start, stop) in place: ``work`` holds those rows of the base (or its replacement) in the
    compute dtype, viewed (stop - start, cols). Terms apply in turn, as PEFT merges adapters one after another;
    DoRA norms are taken against the unmerged rows. Returns ``work``.
    """
    if stop <= start or not terms:
        return work
    if any(t.is_dora for t in terms):
        if needs_whole_tensor(terms) and start != 0:
            raise ValueError("a DoRA term with column channels needs the whole tensor in one block")
        return _merge_rows_dora_(work, terms, start, stop)
    for t in terms:
        if t.R is None:
            work.add_(t.L[start:stop].unsqueeze(1), alpha=t.scale)
        else:
            work.addmm_(t.L[start:stop], t.R, alpha=t.scale)
    return work


def _merge_rows_dora_(work: torch.Tensor, terms: Sequence[LoraTerm], start: int, stop: int) -> torch.Tensor:
    base = work.clone()
    for t in terms:
        if not t.is_dora:
            if t.R is None:
                work.add_(t.L[start:stop].unsqueeze(1), alpha=t.scale)
            else:
                work.addmm_(t.L[start:stop], t.R, alpha=t.scale)
            continue
        delta = t.delta_rows(start, stop)
        assert t.magnitude is not None
        mag = t.magnitude[start:stop].unsqueeze(1) if t.axis == 0 else t.magnitude.unsqueeze(0)
        factor = mag / _norm_except(base + delta, t.axis)
        work.add_(delta).mul_(factor)
    return work
