"""The randomized decomposition of a dense delta, against torch's full SVD (the Eckart-Young optimum)."""

from __future__ import annotations

import pytest
import torch

from loraformat.ops.extract import EXACT_MAX_ELEMENTS, decompose, energy_rank
from loraformat.ops.lowrank import RankSpec


def with_spectrum(S: list[float], m: int, n: int, *, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """A float32 m x n matrix U diag(S) V^T (+ optional Gaussian noise of Frobenius norm ``noise``)."""
    g = torch.Generator().manual_seed(seed)
    k = len(S)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    D = (U * torch.tensor(S, dtype=torch.float64)) @ V.T
    if noise:
        N = torch.randn(m, n, generator=g, dtype=torch.float64)
        D += N * (noise / float(N.norm()))
    return D.float()


def optimal_error(D: torch.Tensor, k: int) -> float:
    S = torch.linalg.svdvals(D.double())
    return float(S[k:].square().sum().sqrt() / S.square().sum().sqrt())


def decaying(n: int, rate: float) -> list[float]:
    return [rate**i for i in range(n)]


@pytest.mark.parametrize("rate", [0.7, 0.9, 0.97])
@pytest.mark.parametrize("shape", [(700, 500), (400, 1100)])
def test_fixed_rank_is_within_a_hair_of_the_optimum(rate, shape):
    D = with_spectrum(decaying(200, rate), *shape, noise=0.05, seed=1)
    assert D.numel() > EXACT_MAX_ELEMENTS  # the randomized path
    dec = decompose(D, RankSpec(rank=16))
    assert dec.method == "randomized" and dec.rank == 16
    assert dec.U.shape == (shape[0], 16) and dec.Vh.shape == (16, shape[1])
    actual = float((D.double() - (dec.U * dec.S) @ dec.Vh).norm() / D.double().norm())
    best = optimal_error(D, 16)
    assert actual <= best * 1.01
    # the reported error is the real one
    assert dec.relative_error == pytest.approx(actual, rel=1e-3, abs=1e-6)
    A, B = dec.factors()
    torch.testing.assert_close(B @ A, (dec.U * dec.S) @ dec.Vh)


def test_a_low_rank_delta_is_recovered_exactly():
    D = with_spectrum([5.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05], 900, 600, seed=2)
    dec = decompose(D, RankSpec(rank=8))
    A, B = dec.factors()
    assert float((B @ A - D).norm() / D.norm()) < 1e-5
    assert dec.kept == pytest.approx(1.0, abs=1e-6)


def test_small_matrices_take_the_exact_svd_and_the_rank_is_clamped():
    D = with_spectrum(decaying(30, 0.8), 40, 30, seed=3)
    dec = decompose(D, RankSpec(rank=64))
    assert dec.method == "exact" and dec.rank == 30  # never above min(out, in)
    assert decompose(D, RankSpec(rank=4), exact=True).rank == 4


@pytest.mark.parametrize("shape", [(60, 50), (800, 700)])  # exact and randomized
@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_auto_energy_picks_the_smallest_rank_keeping_E(shape, energy):
    S = decaying(48, 0.9)
    D = with_spectrum(S, *shape, seed=4)
    dec = decompose(D, RankSpec(energy=energy))
    true_S = torch.linalg.svdvals(D.double())
    cum = torch.cumsum(true_S.square(), 0) / true_S.square().sum()
    expected = int(torch.nonzero(cum >= energy)[0]) + 1  # the documented rule
    assert dec.rank == expected
    assert dec.kept >= energy - 1e-6


def test_auto_energy_grows_the_sketch_past_its_first_guess():
    D = with_spectrum(decaying(120, 0.97), 900, 800, seed=5)  # 0.99 needs ~75 of 120
    dec = decompose(D, RankSpec(energy=0.99))
    assert dec.rank > 40 and dec.kept >= 0.99 - 1e-6
    assert dec.method == "randomized" and dec.sketch > dec.rank


def test_auto_energy_is_clamped_to_min_and_max_rank():
    D = with_spectrum(decaying(48, 0.9), 800, 700, seed=6)
    assert decompose(D, RankSpec(energy=0.99), max_rank=8).rank == 8
    assert decompose(D, RankSpec(energy=0.2), min_rank=12).rank == 12


def test_same_input_same_output():
    D = with_spectrum(decaying(100, 0.9), 700, 600, noise=0.1, seed=7)
    a, b = decompose(D, RankSpec(rank=12)), decompose(D, RankSpec(rank=12))
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.Vh, b.Vh)


def test_energy_rank_on_a_short_spectrum():
    S = torch.tensor([3.0, 2.0, 1.0])
    assert energy_rank(S, 14.0, 0.64) == 1  # 9/14
    assert energy_rank(S, 14.0, 0.92) == 2  # 13/14 = 0.929
    assert energy_rank(S, 14.0, 0.93) == 3
    assert energy_rank(S, 20.0, 0.99) is None  # the sketch cannot reach 0.99 of 20
