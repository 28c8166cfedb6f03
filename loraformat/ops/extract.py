"""Low-rank decomposition of a dense delta ``D = W_tuned - W_base``: the math of ``loraformat extract``.

A fine-tune's delta is a dense out x in matrix whose spectrum usually decays fast; an adapter keeps its top r
singular triplets, the optimal rank-r approximation in Frobenius norm (Eckart-Young). A full SVD costs
O(m n min(m, n)) per module (seconds for a 5632 x 2048 projection on a laptop CPU) although only r << min(m, n)
triplets are kept. We use the randomized range finder with subspace (power) iterations instead (Halko,
Martinsson & Tropp 2011, algorithm 4.4): a sketch ``Y = D Omega`` of l = r + p columns, then alternate
``Q = orth(D Q')``, ``Q' = orth(D^T Q)``, and finally the SVD of the small l x n matrix ``Q^T D``. Each pass
costs two m x n x l products.

The error is checked, not assumed: for the Rayleigh-Ritz approximation ``D_k = Q U_c S_k V_k^T``,
``||D - D_k||_F^2 = ||D||_F^2 - sum(S_k^2)`` exactly, so the kept energy is known after every pass. Iterations
stop when a pass improves the residual by less than ``tol`` of itself (converged to the optimum for all
practical purposes; bench/extract_bench.py compares against a full SVD), and an ``auto:E`` request grows the
sketch until it holds a fraction E of ``||D||_F^2`` or reaches the rank cap. Small matrices, or requests whose
sketch would cover half the smaller side, take an exact SVD, which is then cheaper.

Pure math: tensors in, tensors out; no file or network I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraformat.ops.lowrank import RankSpec

if TYPE_CHECKING:
    import torch

#: matrices with at most this many elements (e.g. 256 x 256) are decomposed exactly: it is as fast as sketching
EXACT_MAX_ELEMENTS = 1 << 16
#: extra sketch columns beyond the rank: the approximation error falls with p, the cost grows linearly
MIN_OVERSAMPLE = 10
#: stop iterating once a pass lowers the residual energy by less than this fraction of it
DEFAULT_TOL = 1e-3
MAX_POWER_ITERS = 10
#: a fixed seed: the same inputs give the same adapter, bit for bit, on the same machine
DEFAULT_SEED = 0


@dataclass
class Decomposition:
    """``D ~= U diag(S) Vh`` truncated to ``rank``, with what it cost and how good it is."""

    U: torch.Tensor  # m x rank
    S: torch.Tensor  # rank, descending
    Vh: torch.Tensor  # rank x n
    total: float  # ||D||_F^2
    method: str  # "exact" or "randomized"
    sketch: int  # columns of the sketch (0 for exact)
    passes: int  # products with D or D^T after the sketch (0 for exact)

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])

    @property
    def kept(self) -> float:
        """Fraction of ||D||_F^2 the truncation keeps."""
        if self.total <= 0.0:
            return 1.0
        return min(1.0, float(self.S.double().square().sum()) / self.total)

    @property
    def relative_error(self) -> float:
        """||D - U S Vh||_F / ||D||_F, from the energies (exact for a Rayleigh-Ritz approximation)."""
        return max(0.0, 1.0 - self.kept) ** 0.5

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """LoRA factors with ``B @ A = U diag(S) Vh``: B = U diag(S) (out x r), A = Vh (r x in); at alpha = r the
        scale is 1, so the factors carry the delta as is."""
        return self.Vh.contiguous(), (self.U * self.S[None, :]).contiguous()


def rank_bounds(shape: tuple[int, int], min_rank: int, max_rank: int | None) -> tuple[int, int]:
    """The usable [lo, hi] rank interval for an m x n matrix: at most min(m, n), at least 1."""
    full = min(shape)
    hi = full if max_rank is None else min(max_rank, full)
    return max(1, min(min_rank, hi)), max(1, hi)


def energy_rank(S: torch.Tensor, total: float, energy: float) -> int | None:
    """Smallest k whose top-k singular values hold ``energy`` of ``total`` (= ||D||_F^2), or None when even all
    of S do not (a sketch too small to tell)."""
    import torch

    if total <= 0.0:
        return 1
    cum = torch.cumsum(S.detach().double().square(), 0) / total
    hits = torch.nonzero(cum >= energy - 1e-12)
    return int(hits[0]) + 1 if hits.numel() else None


def frobenius_sq(D: torch.Tensor) -> float:
    """||D||_F^2, accurate to ~1e-9 relative and without an fp64 copy: per-row norms in D's dtype (short sums),
    then their squares summed in fp64. Ten to forty times faster than ``D.double().square().sum()``, whose
    large temporaries cost more than the arithmetic. NaN or Inf in D gives a non-finite result."""
    import torch

    rows = torch.linalg.vector_norm(D.reshape(-1, D.shape[-1]), dim=1)
    return float(rows.double().square().sum())


def _orth(X: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.linalg.qr(X).Q


def _small_svd(R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of an l x l (or l x n, l small) core in float64: it is tiny, and fp64 keeps small values right."""
    import torch

    U, S, Vh = torch.linalg.svd(R.double(), full_matrices=False)
    return U.to(R.dtype), S.to(R.dtype), Vh.to(R.dtype)


def exact_svd(D: torch.Tensor, total: float) -> Decomposition:
    import torch

    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    return Decomposition(U, S, Vh, total, "exact", 0, 0)


def randomized_svd(
    D: torch.Tensor,
    sketch: int,
    total: float,
    *,
    watch: int,
    tol: float = DEFAULT_TOL,
    max_iters: int = MAX_POWER_ITERS,
    seed: int = DEFAULT_SEED,
) -> Decomposition:
    """Top ``sketch`` approximate singular triplets of D by subspace iteration, untruncated.

    ``watch`` is the rank whose kept energy decides convergence: a pass that lowers the rank-``watch`` residual
    by less than ``tol`` of it ends the iteration (at least one power pass is always made).
    """
    import torch

    m, n = D.shape
    gen = torch.Generator(device=D.device).manual_seed(seed)
    omega = torch.randn(n, sketch, generator=gen, device=D.device, dtype=D.dtype)
    Q = _orth(D @ omega)
    passes, previous = 1, None
    while True:
        Qb, Rb = torch.linalg.qr(D.mT @ Q)  # D^T Q = Qb Rb, so Q^T D = Rb^T Qb^T
        passes += 1
        S = torch.linalg.svdvals(Rb.double())
        residual = max(0.0, total - float(S[:watch].square().sum()))
        if previous is not None and (previous - residual <= tol * residual or passes >= 2 * max_iters):
            break
        previous = residual
        Q = _orth(D @ Qb)
        passes += 1
    Uc, S32, Vhc = _small_svd(Rb.mT)  # Q^T D = Rb^T Qb^T = Uc S (Qb Vhc^T)^T
    return Decomposition(Q @ Uc, S32, Vhc @ Qb.mT, total, "randomized", sketch, passes)


def _truncate(dec: Decomposition, k: int) -> Decomposition:
    k = max(1, min(k, dec.rank))
    return Decomposition(dec.U[:, :k], dec.S[:k], dec.Vh[:k], dec.total, dec.method, dec.sketch, dec.passes)


def decompose(
    D: torch.Tensor,
    spec: RankSpec,
    *,
    min_rank: int = 1,
    max_rank: int | None = None,
    exact: bool = False,
    tol: float = DEFAULT_TOL,
    seed: int = DEFAULT_SEED,
    total: float | None = None,
) -> Decomposition:
    """The rank-r approximation of a 2-D fp32/fp64 delta that ``spec`` asks for (a fixed rank, or ``auto:E``:
    the smallest rank keeping a fraction E of ||D||_F^2), clamped to [min_rank, max_rank] and min(D.shape).

    ``exact`` forces a full SVD (the reference); otherwise only small matrices get one. ``total`` is
    ||D||_F^2 when the caller has it already.
    """
    m, n = (int(x) for x in D.shape)
    lo, hi = rank_bounds((m, n), min_rank, max_rank)
    total = frobenius_sq(D) if total is None else total
    small = exact or m * n <= EXACT_MAX_ELEMENTS
    if spec.energy is None:
        k = max(lo, min(int(spec.rank or 1), hi))
        sketch = k + max(MIN_OVERSAMPLE, k // 2)
        if small or 2 * sketch >= min(m, n):
            return _truncate(exact_svd(D, total), k)
        return _truncate(randomized_svd(D, sketch, total, watch=k, tol=tol, seed=seed), k)
    return _decompose_energy(D, float(spec.energy), total, lo, hi, small, tol, seed)


def _decompose_energy(
    D: torch.Tensor, energy: float, total: float, lo: int, hi: int, small: bool, tol: float, seed: int
) -> Decomposition:
    """auto:E: sketch, and double the sketch while it cannot reach E below the cap ``hi``."""
    full = min(int(D.shape[0]), int(D.shape[1]))
    target = max(lo, min(hi, 16))
    while True:
        sketch = target + max(MIN_OVERSAMPLE, target // 2)
        if small or 2 * sketch >= full:
            dec = exact_svd(D, total)
            break
        dec = randomized_svd(D, sketch, total, watch=target, tol=tol, seed=seed)
        k = energy_rank(dec.S[:target], total, energy)
        if k is not None or target >= hi:
            break
        target = min(hi, 2 * target)
    k = energy_rank(dec.S, total, energy)
    k = hi if k is None else k
    return _truncate(dec, max(lo, min(k, hi)))
