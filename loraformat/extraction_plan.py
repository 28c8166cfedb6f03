"""What ``loraformat extract`` will do, decided from the two checkpoints' headers alone (no tensor data read).

Tensors are matched by name, whatever the shards: a shape mismatch refuses the run before any data is read;
names present on one side only are reported. Each common tensor is either a low-rank **target** (a 2-D float
``<module>.weight`` selected by ``targets``) or **other** (embeddings, norms, lm_head, biases, conv kernels):
changed others are listed in the report, or saved whole with ``save_changed``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from loraformat.errors import BaseMismatchError, UsageError
from loraformat.io.checkpoint import Checkpoint
from loraformat.io.header import FLOAT_DTYPES, TensorInfo

ALL_LINEAR = "all-linear"
#: module names that all-linear never targets: PEFT's all-linear skips the output layer; embeddings are not linear
_NOT_LINEAR_PARTS = ("embed", "lm_head", "wte", "wpe")


@dataclass(frozen=True)
class Pair:
    """One tensor name present in both checkpoints."""

    name: str
    base: TensorInfo
    tuned: TensorInfo

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0] if "." in self.name else self.name


@dataclass
class ExtractPlan:
    targets: list[Pair] = field(default_factory=list)  # low-rank candidates (decomposed if they changed)
    others: list[Pair] = field(default_factory=list)  # everything else both sides have
    only_in_base: list[str] = field(default_factory=list)
    only_in_tuned: list[str] = field(default_factory=list)


def parse_targets(targets: str | Sequence[str] | None) -> list[str] | None:
    """None or "all-linear" -> None (every linear weight); "q_proj,v_proj" or a list -> module name suffixes."""
    if targets is None:
        return None
    items = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else [str(t) for t in targets]
    items = [t for t in items if t]
    if not items:
        raise UsageError("--targets is empty: give module names (q_proj,v_proj) or all-linear")
    if ALL_LINEAR in items:
        if len(items) > 1:
            raise UsageError("--targets all-linear cannot be combined with module names")
        return None
    return items


def _vocab_size(ck: Checkpoint) -> int | None:
    """config.json's vocab_size, when the checkpoint directory has one: a (vocab, hidden) weight is an output
    layer or an embedding, whatever its name."""
    try:
        config = json.loads((ck.root / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("vocab_size") if isinstance(config, dict) else None
    return value if isinstance(value, int) and value > 0 else None


def _is_linear_weight(pair: Pair, vocab: int | None) -> bool:
    info = pair.base
    if not pair.name.endswith(".weight") or len(info.shape) != 2 or info.dtype not in FLOAT_DTYPES:
        return False
    parts = pair.module.lower().split(".")
    if any(marker in part for part in parts for marker in _NOT_LINEAR_PARTS):
        return False
    return vocab is None or info.shape[0] != vocab  # (vocab, hidden): an output layer under another name


def _matches(module: str, key: str) -> bool:
    """PEFT's target_modules rule for a list: the full name, or its ending after a dot."""
    return module == key or module.endswith("." + key)


def plan_extract(base: Checkpoint, tuned: Checkpoint, targets: list[str] | None) -> ExtractPlan:
    """Match tensors by name and classify them; refuse mismatched shapes (one line, nothing read)."""
    plan = ExtractPlan()
    mismatched: list[str] = []
    for name in sorted(base.locations):
        b, t = base.info(name), tuned.info(name)
        assert b is not None
        if t is None:
            plan.only_in_base.append(name)
        elif b.shape != t.shape:
            mismatched.append(f"{name!r} is {list(b.shape)} in BASE but {list(t.shape)} in TUNED")
        else:
            plan.others.append(Pair(name, b, t))
    plan.only_in_tuned = sorted(set(tuned.locations) - set(base.locations))
    if mismatched:
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise BaseMismatchError(
            f"tensor {mismatched[0]}{more}: TUNED is not a fine-tune of this base (resized embeddings "
            "must be resized in BASE first); nothing was read",
            path=tuned.path,
        )
    vocab = _vocab_size(base)
    used: set[str] = set()
    kept: list[Pair] = []
    for pair in plan.others:
        hit = next((k for k in targets if _matches(pair.module, k)), None) if targets is not None else ""
        if hit is not None and _is_linear_weight(pair, vocab) and pair.tuned.dtype in FLOAT_DTYPES:
            plan.targets.append(pair)
            used.add(hit)
        else:
            kept.append(pair)
    plan.others = kept
    if targets is not None:
        unused = [k for k in targets if k not in used]
        if unused:
            raise UsageError(
                f"--targets {','.join(unused)}: matches no linear weight of BASE (a 2-D floating-point "
                "'<module>.weight' that is not an embedding or the output layer)"
            )
    if not plan.targets:
        raise UsageError("no linear weight to extract: BASE has no 2-D floating-point '<module>.weight'")
    return plan
