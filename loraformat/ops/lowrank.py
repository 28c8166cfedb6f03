"""Low-rank linear algebra on LoRA factors: the SVD of ``B @ A`` without forming it, optimal truncation, energy.

A module's delta is ``s * B @ A`` with B (out x r) and A (r x in), r much smaller than out and in. Its SVD comes
from two thin QR factorisations and the SVD of an r x r core:

    B = Q_B R_B,  A^T = Q_A R_A   =>   B @ A = Q_B (R_B R_A^T) Q_A^T = (Q_B U_c) diag(S) (V_c^T Q_A^T)

which costs O((out + in) r^2 + r^3) instead of O(out * in * min(out, in)) for a full SVD of the dense matrix,
and gives the very same singular triplets (up to round-off). Truncating to the top k triplets is the optimal
rank-k approximation in Frobenius and spectral norm (Eckart-Young).

Pure math: tensors in, tensors out; no file or network I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraformat.errors import UsageError

if TYPE_CHECKING:
    import torch

AUTO_PREFIX = "auto:"


@dataclass(frozen=True)
class RankSpec:
    """A target rank: a fixed ``rank``, or ``energy`` E meaning the smallest rank keeping a fraction E of the
    delta's squared Frobenius norm (``auto:E``)."""

    rank: int | None = None
    energy: float | None = None

    def __str__(self) -> str:
        return f"{AUTO_PREFIX}{self.energy:g}" if self.energy is not None else str(self.rank)

    def to_json(self) -> int | str:
        return self.rank if self.rank is not None else str(self)


def parse_rank_spec(value: int | str | RankSpec | None) -> RankSpec | None:
    """``16`` / ``"16"`` -> RankSpec(rank=16); ``"auto:0.99"`` -> RankSpec(energy=0.99); None stays None."""
    if value is None or isinstance(value, RankSpec):
        return value
    if isinstance(value, bool):
        raise UsageError(f"rank must be a positive integer or auto:E, not {value!r}")
    if isinstance(value, int):
        rank = value
    else:
        text = str(value).strip()
        if text.lower().startswith(AUTO_PREFIX):
            raw = text[len(AUTO_PREFIX) :]
            try:
                energy = float(raw)
            except ValueError:
                raise UsageError(
                    f"rank {text!r}: energy {raw!r} is not a number (use e.g. auto:0.99)"
                ) from None
            if not (0.0 < energy <= 1.0) or math.isnan(energy):
                raise UsageError(f"rank {text!r}: energy must be in (0, 1], e.g. auto:0.99")
            return RankSpec(energy=energy)
        try:
            rank = int(text)
        except ValueError:
            raise UsageError(
                f"rank {text!r} is neither a positive integer nor auto:E (e.g. 16 or auto:0.99)"
            ) from None
    if rank <= 0:
        raise UsageError(f"rank must be a positive integer, not {rank}")
    return RankSpec(rank=rank)


class LowRankSVD:
    """``U diag(S) Vh``: U (out x k), S (k,) descending, Vh (k x in).

    U and Vh may be kept factored as ``Q_B @ U_c`` and ``V_c^T @ Q_A^T`` (the QR-core form), so a truncation
    to rank k lifts only k columns back to full size.
    """

    def __init__(
        self,
        U: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        S: torch.Tensor,
        Vh: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        self._U, self.S, self._Vh = U, S, Vh

    def U_k(self, k: int) -> torch.Tensor:
        if isinstance(self._U, tuple):
            Q, Uc = self._U
            return Q @ Uc[:, :k]
        return self._U[:, :k]

    def Vh_k(self, k: int) -> torch.Tensor:
        if isinstance(self._Vh, tuple):
            Vhc, Q = self._Vh
            return Vhc[:k] @ Q.mT
        return self._Vh[:k]

    @property
    def U(self) -> torch.Tensor:
        return self.U_k(int(self.S.shape[0]))

    @property
    def Vh(self) -> torch.Tensor:
        return self.Vh_k(int(self.S.shape[0]))

    def factors(self, k: int, coef: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """LoRA factors (A: k x in, B: out x k) with ``B @ A = coef * U_k diag(S_k) Vh_k``.

        The singular values are split evenly (sqrt on each side) so both factors have the same scale, which
        keeps fp16/bf16 storage of the result well conditioned. A negative coef goes into B's sign.
        """
        import torch

        k = max(1, min(k, int(self.S.shape[0])))
        root = torch.sqrt(self.S[:k].clamp_min(0) * abs(coef))
        sign = -1.0 if coef < 0 else 1.0
        U, Vh = self.U_k(k), self.Vh_k(k)
        B = U * (root * sign).to(U.dtype)
        A = root.to(Vh.dtype)[:, None] * Vh
        return A.contiguous(), B.contiguous()


def flatten_A(A: torch.Tensor) -> torch.Tensor:
    """A as an r x (in * k * k) matrix: conv kernels are folded into the input side."""
    return A.reshape(A.shape[0], -1)


def flatten_B(B: torch.Tensor) -> torch.Tensor:
    """B as an out x r matrix (conv B is out x r x 1 x 1)."""
    return B.reshape(B.shape[0], B.shape[1])


def qr_core_svd(A: torch.Tensor, B: torch.Tensor, *, core_dtype: torch.dtype | None = None) -> LowRankSVD:
    """The thin SVD of ``B @ A`` from the factors alone, never forming the out x in product.

    A is r x n, B is m x r (already flattened). The r x r core is decomposed in ``core_dtype`` (float64 by
    default: it is tiny, and fp64 there costs nothing while keeping small singular values accurate).
    """
    import torch

    core_dtype = core_dtype or torch.float64
    Qb, Rb = torch.linalg.qr(B)  # m x k1, k1 x r
    Qa, Ra = torch.linalg.qr(A.mT)  # n x k2, k2 x r
    core = Rb.to(core_dtype) @ Ra.to(core_dtype).mT  # k1 x k2
    Uc, S, Vhc = torch.linalg.svd(core, full_matrices=False)
    return LowRankSVD((Qb, Uc.to(Qb.dtype)), S.to(Qb.dtype), (Vhc.to(Qa.dtype), Qa))


def singular_values(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Singular values of ``B @ A`` (descending, length min(m, n, r)) without forming it."""
    import torch

    Rb = torch.linalg.qr(B, mode="r")[1]
    Ra = torch.linalg.qr(A.mT, mode="r")[1]
    return torch.linalg.svdvals(Rb.to(torch.float64) @ Ra.to(torch.float64).mT)


def dense_svd(D: torch.Tensor) -> LowRankSVD:
    """Thin SVD of a dense matrix (for deltas that are not low rank, e.g. after TIES or DARE)."""
    import torch

    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    return LowRankSVD(U, S, Vh)


def energy_profile(S: torch.Tensor) -> list[float]:
    """Fraction of the squared Frobenius norm kept by the top-k singular values, for k = 1..len(S)."""
    import torch

    sq = S.detach().to("cpu", torch.float64).square()
    total = float(sq.sum())
    if total <= 0.0:
        return [1.0] * int(S.shape[0])
    return [min(1.0, float(c) / total) for c in torch.cumsum(sq, 0)]


def energy_kept(S: torch.Tensor, k: int) -> float:
    """Fraction of the squared Frobenius norm of ``U diag(S) Vh`` that its rank-k truncation keeps."""
    n = int(S.shape[0])
    if k >= n:
        return 1.0
    if k <= 0:
        return 0.0
    return energy_profile(S)[k - 1]


def energy_rank(S: torch.Tensor, energy: float) -> int:
    """The smallest k whose truncation keeps at least ``energy`` of the squared Frobenius norm (>= 1)."""
    profile = energy_profile(S)
    for k, kept in enumerate(profile, start=1):
        # a hair of slack so that E = 1.0 stops at the last non-zero singular value despite round-off
        if kept >= energy - 1e-12:
            return k
    return max(1, len(profile))


def choose_rank(S: torch.Tensor, spec: RankSpec, *, cap: int | None = None) -> int:
    """Rank to keep for a spectrum S: the fixed rank or the energy rank, never above ``cap`` nor len(S)."""
    k = spec.rank if spec.rank is not None else energy_rank(S, float(spec.energy or 1.0))
    k = min(k, int(S.shape[0]))
    if cap is not None:
        k = min(k, cap)
    return max(1, k)
