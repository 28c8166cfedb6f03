"""``loraformat extract``: an adapter from a fine-tuned model, streaming, optimal at the chosen rank.

Per target module, delta = W_tuned - W_base in fp32, decomposed to rank R (or, with ``auto:E``, the smallest
rank keeping a fraction E of its Frobenius energy, clamped to [min_rank, max_rank]) by the randomized SVD of
:mod:`loraformat.ops.extract`; B = U_r diag(s_r), A = V_r^T and alpha = rank, so each module's scale is 1.

Streaming: both checkpoints are planned from their headers (:mod:`loraformat.extraction_plan`), hashed (cached;
the hashes stamp the output and identify the fine-tune), and read one tensor pair at a time; tensors whose
digests agree are skipped without being decoded. Memory: one pair of tensors and their fp32 delta, plus the
small factors kept for the output, whatever the model size. The output is a native loraformat file stamped with
BASE's hashes and target digests, with provenance ``extract``.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraformat.base import stamp
from loraformat.constants import PEFT_PREFIX, LayerKind, ScalingRule
from loraformat.errors import InvalidInputError, UsageError
from loraformat.extraction_plan import ALL_LINEAR, ExtractPlan, Pair, parse_targets, plan_extract
from loraformat.hashing import BaseHashes, hash_base
from loraformat.io.atomic import check_output
from loraformat.io.checkpoint import Checkpoint, open_checkpoint, read_tensor
from loraformat.io.native import write_native
from loraformat.metadata import AdapterMetadata, ModuleEntry, Provenance
from loraformat.ops.lowrank import RankSpec, parse_rank_spec
from loraformat.rules import check_not_an_input

if TYPE_CHECKING:
    import torch

Progress = Callable[[int], None]  # tensors done (increments)
FACTOR_DTYPES = {"auto": None, "fp32": "F32", "bf16": "BF16", "fp16": "F16"}


@dataclass
class ExtractResult:
    output: str
    content_hash: str
    rank: int | str
    targets: list[str] | str
    device: str
    modules: dict[str, dict[str, Any]]  # module -> rank, energy_kept, relative_error, method, shape
    changed: list[dict[str, Any]]  # changed tensors that are not low-rank targets: name, shape, saved, reason
    identical: int  # tensors skipped because their digests agree
    zero_delta: list[str]  # targets whose bytes differ but whose values do not (e.g. a dtype change)
    only_in_base: list[str]
    only_in_tuned: list[str]
    base: dict[str, str | None]
    tuned: dict[str, str | None]
    parameters: int
    file_size: int
    seconds: float
    peak_rss_bytes: int
    warnings: list[str] = field(default_factory=list)

    @property
    def max_relative_error(self) -> float:
        return max((m["relative_error"] for m in self.modules.values()), default=0.0)

    @property
    def min_energy_kept(self) -> float:
        return min((m["energy_kept"] for m in self.modules.values()), default=1.0)

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "max_relative_error": self.max_relative_error,
            "min_energy_kept": self.min_energy_kept,
        }


@dataclass
class _Run:
    """The state of one extraction: inputs, options, and what has been produced so far."""

    base: Checkpoint
    tuned: Checkpoint
    spec: RankSpec
    min_rank: int
    max_rank: int | None
    device: str
    dtype: str | None
    exact: bool
    progress: Progress
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    modules: dict[str, ModuleEntry] = field(default_factory=dict)
    report: dict[str, dict[str, Any]] = field(default_factory=dict)
    zero: list[str] = field(default_factory=list)
    work: torch.Tensor | None = None  # the fp32 delta's storage, reused (see _decode_delta)
    work_numel: int = 0  # the largest target's size, so that the workspace is allocated once


def _peak_rss() -> int:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _check_options(
    spec: RankSpec | None, min_rank: int, max_rank: int | None, dtype: str
) -> tuple[RankSpec, str | None]:
    if spec is None:
        raise UsageError("give --rank R or --rank auto:E (e.g. 16 or auto:0.9)")
    if min_rank < 1 or (max_rank is not None and max_rank < min_rank):
        raise UsageError(f"--min-rank {min_rank} / --max-rank {max_rank}: need 1 <= min-rank <= max-rank")
    key = dtype.lower()
    if key not in FACTOR_DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(FACTOR_DTYPES)}, not {dtype!r}")
    return spec, FACTOR_DTYPES[key]


def _check_paths(base: Checkpoint, tuned: Checkpoint, out: Path, overwrite: bool) -> None:
    inputs: list[str | os.PathLike[str]] = []
    for ck in (base, tuned):
        inputs += [ck.path, *(s.path for s in ck.shards)]
    check_not_an_input(out, inputs)
    check_output(out, overwrite=overwrite)


def _read_pair(run: _Run, pair: Pair) -> tuple[torch.Tensor, torch.Tensor]:
    return read_tensor(run.base, pair.name), read_tensor(run.tuned, pair.name)


def _pairs(run: _Run, pairs: list[Pair]) -> Iterator[tuple[Pair, tuple[torch.Tensor, torch.Tensor]]]:
    """Each pair with its two tensors, the next pair read on a thread while this one is decomposed (the page
    faults of a cold read overlap the math). At most two pairs are in memory."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="loraformat-extract-read") as pool:
        ahead = pool.submit(_read_pair, run, pairs[0]) if pairs else None
        for i, pair in enumerate(pairs):
            assert ahead is not None
            loaded = ahead.result()
            ahead = pool.submit(_read_pair, run, pairs[i + 1]) if i + 1 < len(pairs) else None
            yield pair, loaded


@contextlib.contextmanager
def _compute_threads(device: str) -> Iterator[None]:
    """One core is left to the reader thread: on a busy or small machine, OpenMP threads that wait for a core
    make a dense SVD or product several times slower than fewer threads that do not."""
    import torch

    previous = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(max(1, min(previous, (os.cpu_count() or 1) - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _decode_delta(run: _Run, pair: Pair, loaded: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """W_tuned - W_base in fp32 (fp64 when an input is fp64), on the run's device, in a workspace reused from
    module to module: a fresh 50 MB tensor per module costs more in page faults than the subtraction."""
    import torch

    wide = torch.float64 if "F64" in (pair.base.dtype, pair.tuned.dtype) else torch.float32
    base, tuned = loaded
    numel = base.numel()
    if run.work is None or run.work.numel() < numel or run.work.dtype != wide:
        run.work = torch.empty(max(numel, run.work_numel), dtype=wide, device=run.device)
    delta = run.work[:numel].view(base.shape)
    delta.copy_(tuned)
    delta.sub_(base.to(run.device))
    return delta


def _factor_dtype(run: _Run, pair: Pair) -> torch.dtype:
    from loraformat.io.tensors import torch_dtype

    return torch_dtype(run.dtype or pair.tuned.dtype)


def _extract_module(run: _Run, pair: Pair, loaded: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Decompose one changed target and keep its factors, metadata entry and report line."""
    from loraformat.ops.extract import decompose, frobenius_sq

    delta = _decode_delta(run, pair, loaded)
    total = frobenius_sq(delta)
    if not math.isfinite(total):
        raise InvalidInputError(
            f"tensor {pair.name!r}: TUNED - BASE is not finite (NaN or Inf in one of them)",
            path=run.tuned.path,
        )
    if total == 0.0:
        run.zero.append(pair.name)
        return
    dec = decompose(
        delta, run.spec, min_rank=run.min_rank, max_rank=run.max_rank, exact=run.exact, total=total
    )
    A, B = dec.factors()
    fdtype = _factor_dtype(run, pair)
    A, B = A.to(fdtype), B.to(fdtype)
    # the error of what is stored (factors rounded to their dtype), not only of the fp32 decomposition
    residual = delta.addmm_(B.to(delta.dtype), A.to(delta.dtype), alpha=-1.0)
    error = (frobenius_sq(residual) / total) ** 0.5
    module = pair.module
    keys_prefix = PEFT_PREFIX + module
    run.tensors[f"{keys_prefix}.lora_A.weight"] = A.cpu()
    run.tensors[f"{keys_prefix}.lora_B.weight"] = B.cpu()
    out_f, in_f = pair.base.shape
    run.modules[module] = ModuleEntry(
        kind=LayerKind.LINEAR,
        rank=dec.rank,
        alpha=float(dec.rank),
        in_features=in_f,
        out_features=out_f,
        base_tensor=pair.name,
    )
    run.report[module] = {
        "rank": dec.rank,
        "energy_kept": dec.kept,
        "relative_error": error,
        "method": dec.method,
        "passes": dec.passes,
        "shape": [out_f, in_f],
    }


def _changed_others(run: _Run, plan: ExtractPlan, same: set[str], save: bool) -> list[dict[str, Any]]:
    """Changed tensors that are not low-rank targets: listed, and saved whole (modules_to_save) on request."""
    target_modules = {p.module for p in plan.targets}
    changed = []
    for pair in plan.others:
        if pair.name in same:
            continue
        item: dict[str, Any] = {"name": pair.name, "shape": list(pair.base.shape), "saved": False}
        if not save:
            item["reason"] = "not a low-rank target (--save-changed stores it whole)"
        elif pair.module in target_modules:
            item["reason"] = "belongs to a LoRA target module, which PEFT cannot also save whole"
        else:
            run.tensors[PEFT_PREFIX + pair.name] = read_tensor(run.tuned, pair.name)
            item["saved"], item["reason"] = True, "saved whole (modules_to_save)"
        changed.append(item)
        run.progress(1)
    return changed


def _metadata(
    run: _Run, changed: list[dict[str, Any]], hashes: tuple[BaseHashes, BaseHashes], name: str
) -> AdapterMetadata:
    base_hashes, tuned_hashes = hashes
    saved = {PEFT_PREFIX + c["name"]: c["name"] for c in changed if c["saved"]}
    meta = AdapterMetadata(
        modules=run.modules,
        scaling=ScalingRule.STANDARD,
        modules_to_save=sorted({n.rsplit(".", 1)[0] for n in saved.values()}),
        saved_tensors=saved,
        name=name,
        description=f"extracted from {run.tuned.path.name} against {run.base.path.name}",
    )
    stamp(meta, run.base, base_hashes)
    meta.provenance = Provenance(
        method="extract",
        rank=run.spec.to_json(),
        details={
            "tuned_model": {
                "id": run.tuned.path.name,
                "content_hash": tuned_hashes.content_hash,
                "structure_hash": tuned_hashes.structure_hash,
                "hash_algorithm": tuned_hashes.algorithm,
            },
            "min_rank": run.min_rank,
            "max_rank": run.max_rank,
            "ranks": {m: r["rank"] for m, r in sorted(run.report.items())},
            "energy_kept": {m: r["energy_kept"] for m, r in sorted(run.report.items())},
            "relative_error": {m: r["relative_error"] for m, r in sorted(run.report.items())},
        },
    )
    return meta


def extract(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rank: int | str | RankSpec,
    targets: str | Sequence[str] | None = ALL_LINEAR,
    min_rank: int = 1,
    max_rank: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    save_changed: bool = False,
    exact: bool = False,
    overwrite: bool = False,
    name: str | None = None,
    progress: Progress | None = None,
) -> ExtractResult:
    """Extract a LoRA adapter of ``rank`` (an int, or ``"auto:E"``) from the fine-tune ``tuned`` of ``base``.

    ``targets``: module names (PEFT's rule: the name or its last dotted parts) or "all-linear" (every 2-D
    weight but embeddings and the output layer). ``dtype``: the factors' storage dtype ("auto": the tuned
    weight's). ``exact`` forces a full SVD per module (slow; the reference). Raises a LoraformatError subclass
    for every refusal; nothing is written under ``out`` on failure.
    """
    from loraformat.rules import resolve_device

    t0 = time.perf_counter()
    spec, fdtype = _check_options(parse_rank_spec(rank), min_rank, max_rank, dtype)
    wanted = parse_targets(targets)
    out_path = Path(out)
    bck, tck = open_checkpoint(base), open_checkpoint(tuned)
    _check_paths(bck, tck, out_path, overwrite)
    plan = plan_extract(bck, tck, wanted)
    dev = resolve_device(device)
    hashes = hash_base(bck), hash_base(tck)
    digests_b, digests_t = hashes[0].tensor_digests, hashes[1].tensor_digests
    same = {p.name for p in (*plan.targets, *plan.others) if digests_b[p.name] == digests_t[p.name]}
    run = _Run(bck, tck, spec, min_rank, max_rank, dev, fdtype, exact, progress or (lambda n: None))
    run.work_numel = max(p.base.numel for p in plan.targets)
    run.progress(len(same & {p.name for p in plan.targets}))
    with _compute_threads(dev):
        for pair, loaded in _pairs(run, [p for p in plan.targets if p.name not in same]):
            _extract_module(run, pair, loaded)
            run.progress(1)
    changed = _changed_others(run, plan, same, save_changed)
    if not run.modules:
        raise UsageError(
            "TUNED does not differ from BASE in any target module: nothing to extract"
            + (f" ({len(changed)} other tensors changed)" if changed else ""),
            path=tck.path,
        )
    meta = _metadata(run, changed, hashes, name or out_path.stem)
    content_hash = write_native(out_path, meta, run.tensors, overwrite=overwrite)
    return _result(run, plan, out_path, content_hash, changed, same, hashes, wanted, t0)


def _result(
    run: _Run,
    plan: ExtractPlan,
    out_path: Path,
    content_hash: str,
    changed: list[dict[str, Any]],
    same: set[str],
    hashes: tuple[BaseHashes, BaseHashes],
    wanted: list[str] | None,
    t0: float,
) -> ExtractResult:
    notes = []
    if run.spec.energy is not None:
        short = [m for m, r in run.report.items() if r["energy_kept"] < float(run.spec.energy) - 1e-9]
        if short:
            notes.append(f"{len(short)} modules reached --max-rank before keeping {run.spec} of their energy")
    unsaved = [c["name"] for c in changed if not c["saved"]]
    if unsaved:
        notes.append(f"{len(unsaved)} changed tensors are not in the adapter: {', '.join(unsaved[:5])}")
    return ExtractResult(
        output=str(out_path),
        content_hash=content_hash,
        rank=run.spec.to_json(),
        targets=wanted if wanted is not None else ALL_LINEAR,
        device=run.device,
        modules=run.report,
        changed=changed,
        identical=len(same),
        zero_delta=run.zero,
        only_in_base=plan.only_in_base,
        only_in_tuned=plan.only_in_tuned,
        base={"content_hash": hashes[0].content_hash, "structure_hash": hashes[0].structure_hash},
        tuned={"content_hash": hashes[1].content_hash, "structure_hash": hashes[1].structure_hash},
        parameters=sum(int(t.numel()) for t in run.tensors.values()),
        file_size=os.path.getsize(out_path),
        seconds=round(time.perf_counter() - t0, 4),
        peak_rss_bytes=_peak_rss(),
        warnings=notes,
    )
