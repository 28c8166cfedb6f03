"""Combining the deltas of several adapters for one module: the exact weighted sum and TIES / DARE.

A term (:class:`loraformat.ops.term.Term`) is one parent's contribution ``scale * B @ A`` (scale = weight x
the parent's LoRA scale), its factors flattened to matrices (A r x n, B m x r). The exact
sum of terms is again a LoRA product: stack the scaled A's as rows and the B's as columns (``stack``). PEFT's
``linear`` combination instead averages the A's and the B's separately, which adds cross terms
``w_i w_j B_i A_j`` and is not the weighted sum; ours is.

TIES and DARE are elementwise operations on the dense delta, so they are applied per module on the dense
out x in matrix (one module in memory at a time) and the caller recompresses the result to low rank. They are
approximations by nature; randomness (DARE) comes from a generator seeded from (seed, module name), so a
result depends neither on the order modules are processed in nor on anything but its inputs and the seed.

Pure math: tensors in, tensors out; no file or network I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from loraformat.constants import DENSITY_METHODS, LayerKind
from loraformat.ops.term import Term

if TYPE_CHECKING:
    import torch

    from loraformat.ops.lowrank import RankSpec


def flat(A: torch.Tensor, B: torch.Tensor, scale: float) -> Term[torch.Tensor]:
    """A term over flattened factors: B @ A is the module's (out, in...) delta as a matrix."""
    return Term(LayerKind.LINEAR, A, B, scale)


def stack(terms: Sequence[Term[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact concatenation: ``B_cat @ A_cat == sum_i scale_i * B_i @ A_i`` with rank = sum of ranks.

    A_cat stacks the rows ``scale_i * A_i``; B_cat stacks the columns ``B_i``.
    """
    import torch

    A = torch.cat([t.lora_A * t.scale for t in terms], dim=0)
    B = torch.cat([t.B for t in terms], dim=1)
    return A, B


def dense(term: Term[torch.Tensor]) -> torch.Tensor:
    """The dense m x n delta of one term."""
    return (term.B @ term.lora_A) * term.scale


def dense_sum(terms: Sequence[Term[torch.Tensor]]) -> torch.Tensor:
    """The dense exact sum (for tests and the dense methods; the exact methods never form it)."""
    out = dense(terms[0])
    for t in terms[1:]:
        out = out + dense(t)
    return out


def module_seed(seed: int, module: str) -> int:
    """A 63-bit seed derived from (seed, module name) alone, so results do not depend on module order."""
    digest = hashlib.sha256(f"loraformat/{int(seed)}/{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def module_generator(seed: int, module: str, device: torch.device | str = "cpu") -> torch.Generator:
    import torch

    g = torch.Generator(device=device)
    g.manual_seed(module_seed(seed, module))
    return g


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the ``int(density * numel)`` entries of largest magnitude, zero the rest (as PEFT)."""
    import torch

    if density >= 1.0:
        return delta
    k = int(density * delta.numel())
    flat = delta.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask[torch.topk(flat.abs(), k, largest=True, sorted=False).indices] = True
    return (flat * mask).reshape(delta.shape)


def dare_drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry with probability p = 1 - density, rescale survivors by 1 / (1 - p)."""
    import torch

    if density >= 1.0:
        return delta
    keep = torch.rand(delta.shape, generator=generator, device=delta.device, dtype=torch.float32) < density
    return delta * keep / density


def elect_and_merge(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES sign election and disjoint mean.

    Per entry the elected sign is that of the sum (zero counts as +); the result is the mean of the entries
    that carry the elected sign, zeros (trimmed or dropped) not counted.
    """
    import torch

    total = deltas[0].clone()
    for d in deltas[1:]:
        total += d
    sign = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    num = torch.zeros_like(total)
    count = torch.zeros_like(total)
    for d in deltas:
        agree = (torch.sign(d) == sign).to(total.dtype)
        num += d * agree
        count += agree
    return num / count.clamp_min(1.0)


def combine_dense(
    method: str,
    terms: Sequence[Term[torch.Tensor]],
    *,
    density: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The dense result of a TIES / DARE method for one module.

    The weights are inside the terms' coefficients, so they apply *before* the sign election: a negative
    weight negates a task (PEFT elects on unweighted tensors and weights afterwards).
    """
    if method not in DENSITY_METHODS:
        raise ValueError(f"unknown dense method {method!r}")
    if method == "ties":
        return elect_and_merge([trim(dense(t), density) for t in terms])
    if generator is None:
        raise ValueError("DARE needs a generator")
    if method == "dare_linear":  # a running sum: one dense delta in memory besides the result
        out = dare_drop(dense(terms[0]), density, generator)
        for t in terms[1:]:
            out += dare_drop(dense(t), density, generator)
        return out
    return elect_and_merge([dare_drop(dense(t), density, generator) for t in terms])


def compose_module(
    method: str,
    terms: Sequence[Term[torch.Tensor]],
    *,
    rank: RankSpec | None,
    density: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One composed module as flattened factors (A: k x n, B: m x k) with scale 1, and the energy kept.

    ``cat`` stacks; ``linear`` stacks and, where the stacked rank exceeds min(m, n), keeps every singular
    triplet (exact, just no wider than the module); ``svd`` keeps the best rank-``rank`` approximation of the
    exact sum (QR-core); the dense methods combine elementwise in fp32, then truncate by a dense SVD.
    """
    import torch

    from loraformat.ops import lowrank

    if method in ("cat", "linear", "svd"):
        A, B = stack(terms)
        if method == "cat" or (method == "linear" and A.shape[0] <= min(A.shape[1], B.shape[0])):
            return A, B, 1.0
        svd = lowrank.qr_core_svd(A, B)
        if method == "linear":
            A, B = svd.factors(int(svd.S.shape[0]))
            return A, B, 1.0
    else:
        fp32 = [flat(t.lora_A.to(torch.float32), t.B.to(torch.float32), t.scale) for t in terms]
        svd = lowrank.dense_svd(combine_dense(method, fp32, density=density, generator=generator))
    if rank is None:
        raise ValueError(f"{method} needs a target rank")
    k = lowrank.choose_rank(svd.S, rank)
    A, B = svd.factors(k)
    return A, B, lowrank.energy_kept(svd.S, k)
