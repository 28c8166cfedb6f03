"""Scale conversions between scaling rules: pure arithmetic on ranks and alphas, no I/O."""

from __future__ import annotations

from loraformat.constants import ScalingRule
from loraformat.spec import scale_for


def alpha_for_standard_rule(rule: str, rank: int, alpha: float) -> float:
    """The alpha that gives the same scale under alpha / r (the only rule kohya knows): the alpha itself for
    alpha/r adapters (exact), s * r for rsLoRA ones."""
    if rule == ScalingRule.STANDARD:
        return float(alpha)
    return scale_for(rule, rank, alpha) * rank
