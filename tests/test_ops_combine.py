"""The exact concatenation, TIES and DARE on dense module deltas, checked against fp64 sums and PEFT's own
merge utilities."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from loraformat.ops.combine import (
    combine_dense,
    dare_drop,
    dense,
    dense_sum,
    elect_and_merge,
    flat,
    module_generator,
    module_seed,
    stack,
    trim,
)
from loraformat.ops.term import Term


def term(m: int, n: int, r: int, coef: float, seed: int, dtype=torch.float64) -> Term:
    g = torch.Generator().manual_seed(seed)
    return flat(
        torch.randn(r, n, generator=g, dtype=dtype), torch.randn(m, r, generator=g, dtype=dtype), coef
    )


def test_stack_is_the_exact_weighted_sum_with_mixed_ranks_and_negative_weights():
    terms = [term(24, 18, 2, 0.75, 0), term(24, 18, 8, -1.5, 1), term(24, 18, 5, 3.0, 2)]
    A, B = stack(terms)
    assert A.shape == (15, 18) and B.shape == (24, 15)
    expected = sum(t.scale * (t.B @ t.A) for t in terms)
    torch.testing.assert_close(B @ A, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dense_sum(terms), expected, rtol=1e-12, atol=1e-12)


def test_peft_linear_is_not_the_weighted_sum():
    """Why we do not mix A and B separately: PEFT's `linear` (weighted A's times weighted B's) has cross terms."""
    t1, t2 = term(10, 10, 4, 1.0, 0), term(10, 10, 4, 1.0, 1)
    w = 0.5**0.5  # PEFT applies sqrt(weight) to each of A and B
    peft_linear = (w * t1.B + w * t2.B) @ (w * t1.A + w * t2.A)
    exact = 0.5 * dense(t1) + 0.5 * dense(t2)
    assert float((peft_linear - exact).norm() / exact.norm()) > 0.1
    A, B = stack([flat(t1.A, t1.B, 0.5), flat(t2.A, t2.B, 0.5)])
    torch.testing.assert_close(B @ A, exact)


def test_trim_keeps_the_largest_magnitudes():
    x = torch.tensor([[0.1, -5.0, 2.0], [-0.3, 4.0, -1.0]])
    out = trim(x, 0.5)  # int(0.5 * 6) = 3 entries
    torch.testing.assert_close(out, torch.tensor([[0.0, -5.0, 2.0], [0.0, 4.0, 0.0]]))
    assert trim(x, 1.0) is x
    assert int((trim(x, 0.1) != 0).sum()) == 0  # int(0.6) = 0 entries, as PEFT


def test_elect_and_merge_by_hand():
    a = torch.tensor([1.0, -2.0, 3.0, 0.0])
    b = torch.tensor([3.0, 1.0, -1.0, 0.0])
    # sums: 4 (+), -1 (-), 2 (+), 0 (+); means of agreeing non-zero entries
    torch.testing.assert_close(elect_and_merge([a, b]), torch.tensor([2.0, -2.0, 3.0, 0.0]))


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_peft_with_unit_weights(density):
    terms = [term(16, 12, 3, 1.0, s, torch.float32) for s in range(3)]
    ours = combine_dense("ties", terms, density=density)
    peft = merge_utils.ties([dense(t) for t in terms], torch.ones(3), density)
    torch.testing.assert_close(ours, peft, rtol=1e-6, atol=1e-6)


def test_ties_weights_apply_before_the_sign_election():
    t = term(8, 8, 2, 1.0, 0)
    negated = combine_dense("ties", [flat(t.A, t.B, -1.0)], density=1.0)
    torch.testing.assert_close(negated, -dense(t))


def test_dare_drops_and_rescales():
    x = torch.ones(200, 300, dtype=torch.float64)
    out = dare_drop(x, 0.3, module_generator(0, "m"))
    kept = out != 0
    assert abs(float(kept.double().mean()) - 0.3) < 0.01
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.3))
    assert abs(float(out.mean()) - 1.0) < 0.05  # the expectation is preserved
    assert dare_drop(x, 1.0, module_generator(0, "m")) is x


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_deterministic_under_a_seed(method):
    terms = [term(30, 20, 4, 1.0, s, torch.float32) for s in range(2)]
    run = [
        combine_dense(method, terms, density=0.5, generator=module_generator(seed, "layer.q", "cpu"))
        for seed in (7, 7, 8)
    ]
    assert torch.equal(run[0], run[1])
    assert not torch.equal(run[0], run[2])
    other_module = combine_dense(method, terms, density=0.5, generator=module_generator(7, "layer.k"))
    assert not torch.equal(run[0], other_module)


def test_dare_with_density_one_is_exact():
    terms = [term(10, 9, 3, 0.5, s) for s in range(3)]
    torch.testing.assert_close(
        combine_dense("dare_linear", terms, density=1.0, generator=module_generator(0, "m")), dense_sum(terms)
    )
    torch.testing.assert_close(
        combine_dense("dare_ties", terms, density=1.0, generator=module_generator(0, "m")),
        combine_dense("ties", terms, density=1.0),
    )


def test_module_seed_depends_on_seed_and_module_only():
    assert module_seed(0, "a.q_proj") == module_seed(0, "a.q_proj")
    assert len({module_seed(0, "a.q_proj"), module_seed(1, "a.q_proj"), module_seed(0, "a.k_proj")}) == 3
    assert 0 <= module_seed(123, "x") < 2**63


def test_unknown_dense_method_and_missing_generator():
    t = [term(4, 4, 1, 1.0, 0)]
    with pytest.raises(ValueError):
        combine_dense("svd", t, density=0.5)
    with pytest.raises(ValueError):
        combine_dense("dare_linear", t, density=0.5)
