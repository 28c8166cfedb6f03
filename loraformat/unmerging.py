"""``loraformat unmerge``: recover a base from a merged checkpoint, W = W' - sum_i w_i s_i B_i A_i.

The exact inverse of :func:`loraformat.merge`, run by the same streaming merge with the weights negated (fp32,
rounded once, untouched tensors copied byte for byte, atomic output). What can be verified differs from a merge:

- the adapters' recorded ``target_digests`` describe the *base*, so MERGED's tensors cannot match them; they
  are checked on the recovered output instead. A recovery through bf16/fp16 rounding is within 1 ulp of the
  base but rarely bit-identical, so a differing digest is reported, not refused; equal digests prove the
  recovered tensor is the base's.
- MERGED's structure hash is checked against each adapter's, from headers, before any data is read.
- a checkpoint written by ``loraformat merge`` records the adapters and weights merged into it
  (``loraformat.merge`` in its safetensors metadata): every adapter unmerged must be listed there with the same
  content hash and weight, or the run is refused before anything is read (``verify=False`` skips this).

Adapters whose effect is not additive cannot be unmerged: DoRA (the magnitude renormalises each row) and saved
tensors (modules_to_save, trained biases) that replaced base tensors whose values are gone.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

from loraformat.adapter import Adapter, adapter_weights, open_adapter
from loraformat.base import target_tensors
from loraformat.constants import MERGE_RECORD_KEY
from loraformat.errors import BaseMismatchError, ComposeError, UsageError
from loraformat.hashing import hash_tensors
from loraformat.io.checkpoint import open_checkpoint
from loraformat.merging.api import MergeResult, merge
from loraformat.merging.engine import Progress


def _check_additive(adapter: Adapter) -> None:
    if adapter.meta.dora:
        raise ComposeError(
            "is a DoRA adapter: its magnitude vector renormalises the merged weight, which cannot be undone "
            "by subtracting a delta",
            path=adapter.path,
        )
    if adapter.meta.saved_tensors:
        first = sorted(adapter.meta.saved_tensors.values())[0]
        raise ComposeError(
            f"replaces base tensors whole (modules_to_save or trained biases, e.g. {first!r}): their base "
            "values are not in the merged checkpoint, so they cannot be recovered",
            path=adapter.path,
        )


def _merge_record(merged: str | os.PathLike[str]) -> list[dict[str, Any]] | None:
    """The adapters ``loraformat merge`` recorded in MERGED's shard metadata, or None when it recorded none."""
    ck = open_checkpoint(merged)
    for shard in ck.shards:
        raw = shard.metadata.get(MERGE_RECORD_KEY)
        if raw is None:
            continue
        try:
            record = json.loads(raw)
            adapters = record["adapters"]
        except (ValueError, KeyError, TypeError):
            return None
        return [a for a in adapters if isinstance(a, dict)] if isinstance(adapters, list) else None
    return None


def _check_record(
    merged: str | os.PathLike[str], adapters: list[Adapter], weights: list[float]
) -> dict[str, Any]:
    """Refuse an adapter that MERGED's merge record does not list (with this weight); say what was checked."""
    record = _merge_record(merged)
    if record is None:
        return {"merge_record": "absent", "adapters_confirmed": 0}
    confirmed = 0
    for adapter, w in zip(adapters, weights, strict=True):
        h = adapter.meta.content_hash
        if h is None:
            continue  # a PEFT adapter has no content hash to compare
        if not any(e.get("content_hash") == h and e.get("weight") == w for e in record):
            listed = ", ".join(f"{e.get('name')} (weight {e.get('weight')})" for e in record) or "none"
            raise BaseMismatchError(
                f"MERGED records that it was merged with {listed}, not with this adapter at weight {w:g}; "
                "--no-verify skips this check",
                path=adapter.path,
            )
        confirmed += 1
    return {"merge_record": "present", "adapters_confirmed": confirmed}


def _check_recovered(out: str | os.PathLike[str], adapters: list[Adapter]) -> dict[str, Any]:
    """Hash the recovered target tensors and compare them with the base digests the adapters recorded."""
    recorded: dict[str, str] = {}
    for a in adapters:
        recorded.update(
            {k: v for k, v in a.meta.base_model.target_digests.items() if k in target_tensors(a.meta)}
        )
    if not recorded:
        return {"checked": 0, "identical": 0, "differing": []}
    actual = hash_tensors(open_checkpoint(out), sorted(recorded))
    differing = sorted(n for n, d in recorded.items() if actual[n] != d)
    return {"checked": len(recorded), "identical": len(recorded) - len(differing), "differing": differing}


def unmerge(
    merged: str | os.PathLike[str],
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    out: str | os.PathLike[str],
    *,
    weights: list[float] | None = None,
    device: str = "auto",
    verify: bool = True,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> MergeResult:
    """Subtract ``adapters`` (at ``weights``, as they were merged) from ``merged`` and write the base to ``out``.

    Returns the merge's report; its ``verified`` says what was confirmed (see the module docstring).
    """
    if not adapters:
        raise UsageError("give at least one adapter to unmerge")
    ws = adapter_weights(weights, len(adapters))
    opened = [a if isinstance(a, Adapter) else open_adapter(a) for a in adapters]
    try:
        for a in opened:
            _check_additive(a)
        record = _check_record(merged, opened, ws) if verify else {"merge_record": "not checked"}
        with warnings.catch_warnings():
            # verify=False: the base digests cannot match MERGED; they are checked on the output instead
            warnings.simplefilter("ignore")
            result = merge(
                merged,
                list(opened),
                out,
                weights=[-w for w in ws],
                device=device,
                verify=False,
                overwrite=overwrite,
                progress=progress,
            )
        recovered = _check_recovered(out, opened) if verify else {}
    finally:
        for a, given in zip(opened, adapters, strict=True):
            if a is not given:
                a.close()
    result.adapters = [{**entry, "weight": w} for entry, w in zip(result.adapters, ws, strict=True)]
    result.verified = {
        "enabled": verify,
        **record,
        "structure_hash_checked": result.verified.get("structure_hash_checked", []),
        "recovered_digests": recovered,
    }
    result.warnings = []
    if recovered.get("differing"):
        result.warnings.append(
            f"{len(recovered['differing'])} of {recovered['checked']} recovered target tensors are not "
            "bit-identical to the base the adapters recorded: expected after a merge that rounded (the "
            "recovery is within one rounding of the base)"
        )
    return result
