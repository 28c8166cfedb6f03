"""The one term type: one adapter's contribution to one module, and how it factors over a stored weight.

A :class:`Term` is generic in what it holds: a merge plan holds tensor *keys* (``Term[str]``, planned from
headers alone), a kernel holds arrays or tensors (``Term[np.ndarray]`` / ``Term[torch.Tensor]``), compose and
rescale hold torch tensors. The rules here (factor order, DoRA channel axis, the 2-D view of a stored tensor)
are written once and work on numpy arrays and torch tensors alike. Pure functions: no I/O, no torch import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from loraformat.constants import LayerKind

T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True)
class Term(Generic[T]):
    """``scale * B @ A`` added to a module's weight (``scale`` = the LoRA scale x the adapter's weight).

    ``kind`` decides how the product lies in the stored weight (:func:`lora_factors`); a ``LayerKind.BIAS``
    term has no ``A`` and adds ``scale * B`` (lora_B.bias) to a bias. ``magnitude`` is DoRA's
    lora_magnitude_vector, one entry per output channel (:attr:`axis`).
    """

    kind: LayerKind
    A: T | None
    B: T
    scale: float
    fan_in_fan_out: bool = False
    magnitude: T | None = None

    @property
    def axis(self) -> int:
        return channel_axis(self.kind, self.fan_in_fan_out)

    @property
    def lora_A(self) -> T:
        """A, for every kind but ``BIAS`` (compose and rescale only ever hold such terms)."""
        if self.A is None:
            raise ValueError("a lora_bias term has no A factor")
        return self.A

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    def map(self, f: Callable[[T], U]) -> Term[U]:
        """The same term with every tensor (or key) passed through ``f``, e.g. key -> loaded tensor."""
        return Term(
            kind=self.kind,
            A=None if self.A is None else f(self.A),
            B=f(self.B),
            scale=self.scale,
            fan_in_fan_out=self.fan_in_fan_out,
            magnitude=None if self.magnitude is None else f(self.magnitude),
        )

    def scaled(self, factor: float) -> Term[T]:
        return replace(self, scale=self.scale * factor)


def channel_axis(kind: str, fan_in_fan_out: bool = False) -> int:
    """The axis of the stored weight that indexes DoRA's output channels (one magnitude each).

    nn.Linear and conv store (out, in, ...): axis 0. Conv1D (fan_in_fan_out) stores (in, out) and PEFT's
    embedding DoRA normalises per embedding dimension, a column of (num_embeddings, dim): axis 1.
    """
    if kind == LayerKind.EMBEDDING or (kind == LayerKind.LINEAR and fan_in_fan_out):
        return 1
    return 0


def lora_factors(A: Any, B: Any, kind: str, fan_in_fan_out: bool = False) -> tuple[Any, Any]:
    """(L, R) with dW = L @ R over the stored weight viewed (rows, cols); torch tensors or numpy arrays.

    linear (out, in): L = B, R = A. Conv1D (in, out) and embedding (num, dim): dW = A^T B^T, so L = A^T,
    R = B^T. conv (out, in, k...): L = B (out, r), R = A (r, in*k...) -- PEFT's conv of A^T with the 1x1 kernel
    B is exactly this product (peft/tuners/lora/layer.py ``_ConvNd.get_delta_weight``).
    """
    r = A.shape[0]
    if kind == LayerKind.LINEAR and not fan_in_fan_out:
        return B, A
    if kind in (LayerKind.LINEAR, LayerKind.EMBEDDING):
        return A.T, B.T
    if kind == LayerKind.CONV:
        return B.reshape(B.shape[0], r), A.reshape(r, -1)
    raise ValueError(f"unknown layer kind {kind!r}")


def rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    """How a stored tensor is viewed for row-block merging: (shape[0], everything else); 0-D is (1, 1)."""
    if len(shape) == 0:
        return 1, 1
    return int(shape[0]), (math.prod(shape[1:]) if len(shape) > 1 else 1)


def needs_whole_tensor(terms: Sequence[Term[Any]]) -> bool:
    """DoRA with channels along axis 1 needs column norms over every row: one block must hold the tensor."""
    return any(t.is_dora and t.axis != 0 for t in terms)
