"""QR-core SVD, optimal truncation, energy ranks and rank parsing, against torch.linalg on dense matrices."""

from __future__ import annotations

import pytest
import torch

from loraformat.errors import UsageError
from loraformat.ops.lowrank import (
    RankSpec,
    choose_rank,
    dense_svd,
    energy_kept,
    energy_profile,
    energy_rank,
    flatten_A,
    flatten_B,
    parse_rank_spec,
    qr_core_svd,
    singular_values,
)


def factors(m: int, n: int, r: int, seed: int = 0, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, n, generator=g, dtype=dtype), torch.randn(m, r, generator=g, dtype=dtype)


def with_spectrum(
    S: list[float], m: int = 40, n: int = 30, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors whose product has exactly the singular values S (orthonormal U, V from QR)."""
    g = torch.Generator().manual_seed(seed)
    k = len(S)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    return V.T.contiguous(), U * torch.tensor(S, dtype=torch.float64)


@pytest.mark.parametrize("m,n,r", [(50, 30, 6), (30, 50, 6), (8, 12, 20), (64, 64, 64)])
def test_qr_core_svd_is_the_svd_of_the_product(m, n, r):
    A, B = factors(m, n, r)
    dense = B @ A
    svd = qr_core_svd(A, B)
    k = min(m, n, r)
    assert svd.U.shape == (m, k) and svd.S.shape == (k,) and svd.Vh.shape == (k, n)
    torch.testing.assert_close(svd.U @ torch.diag(svd.S) @ svd.Vh, dense, rtol=1e-10, atol=1e-10)
    full = torch.linalg.svdvals(dense)
    torch.testing.assert_close(svd.S, full[:k], rtol=1e-10, atol=1e-10)
    assert float(full[k:].abs().sum()) < 1e-9  # the rest of the dense spectrum is zero
    torch.testing.assert_close(svd.U.T @ svd.U, torch.eye(k, dtype=svd.U.dtype), rtol=0, atol=1e-10)
    torch.testing.assert_close(singular_values(A, B), full[:k], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_truncation_is_optimal_eckart_young(k):
    A, B = factors(60, 45, 12, seed=3)
    dense = B @ A
    a, b = qr_core_svd(A, B).factors(k)
    assert a.shape == (k, 45) and b.shape == (60, k)
    S = torch.linalg.svdvals(dense)
    optimal = float(S[k:].square().sum().sqrt())
    assert float((dense - b @ a).norm()) == pytest.approx(optimal, rel=1e-9)
    U, S2, Vh = torch.linalg.svd(dense, full_matrices=False)
    torch.testing.assert_close(b @ a, U[:, :k] @ torch.diag(S2[:k]) @ Vh[:k], rtol=1e-9, atol=1e-9)


def test_factors_carry_coefficient_and_split_evenly():
    A, B = factors(20, 16, 4, seed=5)
    svd = qr_core_svd(A, B)
    a, b = svd.factors(4, coef=-2.5)
    torch.testing.assert_close(b @ a, -2.5 * (B @ A), rtol=1e-10, atol=1e-10)
    # balanced: each factor carries sqrt of the singular values
    torch.testing.assert_close(a.norm(dim=1), b.norm(dim=0), rtol=1e-10, atol=0)
    assert svd.factors(99)[0].shape[0] == 4  # never more than the spectrum has


def test_fp32_path_is_accurate_to_round_off():
    A, B = factors(300, 200, 16, seed=7)
    ref = torch.linalg.svdvals(B @ A)[:16]
    got = qr_core_svd(A.float(), B.float()).S.double()
    assert float((got - ref).abs().max() / ref[0]) < 1e-5


def test_dense_svd_matches_torch():
    D = factors(20, 10, 10, seed=2)[1] @ factors(20, 10, 10, seed=2)[0]
    svd = dense_svd(D)
    torch.testing.assert_close(svd.U @ torch.diag(svd.S) @ svd.Vh, D, rtol=1e-10, atol=1e-10)


def test_energy_profile_and_kept():
    A, B = with_spectrum([4.0, 2.0, 1.0, 0.5])
    S = qr_core_svd(A, B).S
    total = 16 + 4 + 1 + 0.25
    assert energy_profile(S) == pytest.approx([16 / total, 20 / total, 21 / total, 1.0])
    assert energy_kept(S, 2) == pytest.approx(20 / total)
    assert energy_kept(S, 4) == 1.0 and energy_kept(S, 10) == 1.0
    assert energy_kept(torch.zeros(3), 1) == 1.0  # a zero delta loses nothing


@pytest.mark.parametrize(
    "energy,rank", [(0.5, 1), (0.75, 1), (0.76, 2), (0.94, 2), (0.95, 3), (0.99, 4), (1.0, 4)]
)
def test_energy_rank_is_the_smallest_rank_reaching_the_energy(energy, rank):
    A, B = with_spectrum([4.0, 2.0, 1.0, 0.5])  # cumulative: 0.753, 0.941, 0.988, 1
    S = qr_core_svd(A, B).S
    assert energy_rank(S, energy) == rank
    assert choose_rank(S, RankSpec(energy=energy)) == rank


def test_energy_rank_one_stops_at_the_numerical_rank():
    A, B = with_spectrum([3.0, 1.0, 0.0, 0.0], seed=4)
    assert energy_rank(qr_core_svd(A, B).S, 1.0) == 2
    assert energy_rank(torch.zeros(5, dtype=torch.float64), 1.0) == 1


def test_choose_rank_caps():
    S = torch.tensor([3.0, 2.0, 1.0])
    assert choose_rank(S, RankSpec(rank=8)) == 3
    assert choose_rank(S, RankSpec(rank=2)) == 2
    assert choose_rank(S, RankSpec(rank=3), cap=1) == 1


@pytest.mark.parametrize(
    "value,expected",
    [
        (16, RankSpec(rank=16)),
        ("8", RankSpec(rank=8)),
        (" 4 ", RankSpec(rank=4)),
        ("auto:0.99", RankSpec(energy=0.99)),
        ("AUTO:1", RankSpec(energy=1.0)),
        (None, None),
    ],
)
def test_parse_rank_spec(value, expected):
    assert parse_rank_spec(value) == expected


@pytest.mark.parametrize(
    "value", [0, -3, "0", "-1", "auto:0", "auto:1.5", "auto:-0.1", "auto:nan", "auto:x", "abc", "4.5", True]
)
def test_parse_rank_spec_refuses(value):
    with pytest.raises(UsageError):
        parse_rank_spec(value)


def test_rank_spec_text():
    assert str(RankSpec(energy=0.99)) == "auto:0.99" and RankSpec(energy=0.99).to_json() == "auto:0.99"
    assert RankSpec(rank=16).to_json() == 16


def test_conv_factors_flatten_into_the_input_side():
    A = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    B = torch.randn(8, 4, 1, 1, dtype=torch.float64)
    a, b = flatten_A(A), flatten_B(B)
    assert a.shape == (4, 27) and b.shape == (8, 4)
    # the flattened product is PEFT's conv delta: conv2d(A^T, B)^T
    conv = torch.nn.functional.conv2d(A.transpose(0, 1), B).transpose(0, 1)
    torch.testing.assert_close((b @ a).reshape(8, 3, 3, 3), conv)
