"""Compose adapters straight from their factors, with no base model loaded.

- ``compose``: per module, the weighted sum ``sum_i w_i s_i B_i A_i`` of the parents' deltas.
  ``cat`` stores it exactly (rank = sum of ranks); ``linear`` is the same exact sum, losslessly compacted to at
  most min(out, in) where the stacked rank exceeds that; ``svd`` recompresses it to rank R (or ``auto:E``) with
  the QR-core SVD, which is the optimal rank-R approximation (Eckart-Young); ``ties`` / ``dare_linear`` /
  ``dare_ties`` work on the dense delta of one module at a time, then SVD back to rank R.

``rescale`` and ``spectrum`` (one adapter at a time) live in :mod:`loraformat.rescaling`.

Outputs are native loraformat files written with the standard ``alpha/r`` rule and ``alpha = rank`` for every
composed module, so each module's scale is exactly 1 whatever rules the parents used (rsLoRA included); the
factors carry all the weight. Module paths and tensor keys stay PEFT's, so PEFT and vLLM load the file as is.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraformat.adapter import Adapter, adapter_weights, module_keys, open_adapter
from loraformat.constants import (
    COMPOSE_METHODS,
    DENSITY_METHODS,
    LOWRANK_METHODS,
    SEEDED_METHODS,
    ScalingRule,
)
from loraformat.errors import ComposeError, UsageError
from loraformat.io.atomic import check_output
from loraformat.io.native import data_section_hash, write_native
from loraformat.io.tensors import SafetensorsSource, torch_dtype
from loraformat.metadata import AdapterMetadata, BaseModel, ModuleEntry, Parent, Provenance
from loraformat.ops.lowrank import RankSpec, parse_rank_spec
from loraformat.rules import check_not_an_input, resolve_device

if TYPE_CHECKING:
    import torch

    from loraformat.ops.term import Term


Progress = Callable[[int], None]
PathLike = str | os.PathLike[str]


class ReportBase:
    modules: dict[str, dict[str, Any]]

    @property
    def min_energy_kept(self) -> float:
        return min((m["energy_kept"] for m in self.modules.values()), default=1.0)

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "min_energy_kept": self.min_energy_kept}


@dataclass
class ComposeResult(ReportBase):
    output: str
    method: str
    rank: int | str | None
    content_hash: str
    parents: list[dict[str, Any]]
    modules: dict[str, dict[str, Any]]  # module -> {"rank", "energy_kept", "parents"}
    parameters: int  # LoRA parameters written (A, B and LoRA biases)
    file_size: int
    base_kept: bool  # the base identity was recorded (every parent agreed on it)
    forced: bool  # different bases were composed because force was given
    seconds: float


# --- argument checks -------------------------------------------------------------------------------------------


def torch_device(device: str | torch.device) -> torch.device:
    """``device`` resolved by the shared rule (loraformat.rules.resolve_device) as a torch device."""
    import torch

    return torch.device(resolve_device(str(device)))


def factor_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp32, or fp64 when an input is fp64. The QR-core path is stable in fp32 (its error against the exact
    sum stays at fp32 round-off, far below a dense fp32 SVD's; bench/compose_bench.py) and 2-5x faster than
    fp64 on CPU; the r x r core is always decomposed in fp64."""
    import torch

    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def check_output_path(out: PathLike, inputs: Sequence[Adapter], overwrite: bool) -> Path:
    out_path = Path(out)
    check_not_an_input(out_path, [p for a in inputs for p in (a.path, a.source.path) if p])
    check_output(out_path, overwrite=overwrite)
    return out_path


def parent_hash(adapter: Adapter) -> str | None:
    """The parent's content hash: sha256 of its safetensors data section (as a native file records it)."""
    src = adapter.source
    if isinstance(src, SafetensorsSource):
        return data_section_hash(src.path, src.header.data_start)
    return adapter.meta.content_hash


def lora_params(tensors: dict[str, Any], saved: dict[str, str]) -> int:
    return sum(int(t.numel()) for k, t in tensors.items() if k not in saved)


# --- compose ---------------------------------------------------------------------------------------------------


def merge_base(adapters: Sequence[Adapter], *, force: bool) -> tuple[BaseModel, bool]:
    """The base identity the composed adapter records, and whether every parent agreed on it.

    Fields recorded by several parents with different values are dropped (so nothing false is recorded);
    disagreeing parents are refused unless ``force``.
    """
    bases = [a.meta.base_model for a in adapters]
    for i, a in enumerate(bases):
        for j in range(i):
            if not bases[j].same_base(a):
                if not force:
                    raise ComposeError(
                        f"{adapters[j].path} and {adapters[i].path} were made for different bases "
                        f"({bases[j].id or bases[j].content_hash} vs {a.id or a.content_hash}); "
                        "use --force to compose them anyway",
                        path=adapters[i].path,
                    )
                return _common_base(bases, agreed=False), False
    return _common_base(bases, agreed=True), True


def _common_base(bases: Sequence[BaseModel], *, agreed: bool) -> BaseModel:
    out = BaseModel()
    for attr in ("id", "revision", "structure_hash", "content_hash", "hash_algorithm"):
        values = [getattr(b, attr) for b in bases if getattr(b, attr)]
        if values and (len(set(values)) == 1 or (agreed and attr in ("id", "revision"))):
            setattr(out, attr, values[0])
    digests: dict[str, str] = {}
    conflicts: set[str] = set()
    for b in bases:
        for name, d in b.target_digests.items():
            if digests.setdefault(name, d) != d:
                conflicts.add(name)
    out.target_digests = {k: v for k, v in digests.items() if k not in conflicts}
    return out


def _plan(adapters: Sequence[Adapter]) -> dict[str, list[int]]:
    """module -> indices of the parents that adapt it; refuses parents that disagree about a module."""
    plan: dict[str, list[int]] = {}
    first: dict[str, tuple[int, ModuleEntry]] = {}
    for i, a in enumerate(adapters):
        for module, entry in a.meta.modules.items():
            if module in first:
                j, ref = first[module]
                for attr in (
                    "kind",
                    "in_features",
                    "out_features",
                    "kernel_size",
                    "base_tensor",
                    "fan_in_fan_out",
                ):
                    if getattr(ref, attr) != getattr(entry, attr):
                        raise ComposeError(
                            f"module {module}: {attr} {getattr(ref, attr)} in {adapters[j].path} but "
                            f"{getattr(entry, attr)} in {a.path}; adapters disagree about this module",
                            path=a.path,
                        )
            else:
                first[module] = (i, entry)
            plan.setdefault(module, []).append(i)
    return dict(sorted(plan.items()))


def _saved(adapters: Sequence[Adapter]) -> tuple[dict[str, str], dict[str, Any], list[str], str]:
    """saved tensors (modules_to_save, biases) are replacements, not deltas: they cannot be summed, so they
    pass through only when a single parent has them or all that have them agree exactly."""
    import torch

    owners = [a for a in adapters if a.meta.saved_tensors or a.meta.bias != "none" or a.meta.modules_to_save]
    if not owners:
        return {}, {}, [], "none"
    ref = owners[0]
    tensors = {k: ref.tensor(k) for k in ref.meta.saved_tensors}
    for other in owners[1:]:
        same = (
            other.meta.saved_tensors == ref.meta.saved_tensors
            and other.meta.bias == ref.meta.bias
            and sorted(other.meta.modules_to_save) == sorted(ref.meta.modules_to_save)
            and all(torch.equal(other.tensor(k), t) for k, t in tensors.items())
        )
        if not same:
            raise ComposeError(
                f"{ref.path} and {other.path} both carry whole saved tensors (modules_to_save or bias) that "
                "differ; they replace base weights and cannot be summed",
                path=other.path,
            )
    return dict(ref.meta.saved_tensors), tensors, list(ref.meta.modules_to_save), ref.meta.bias


def _term(
    adapter: Adapter, module: str, coef: float, device: torch.device, dtype: torch.dtype
) -> Term[torch.Tensor]:
    from loraformat.ops.combine import flat
    from loraformat.ops.lowrank import flatten_A, flatten_B

    A = flatten_A(adapter.lora_A(module)).to(device=device, dtype=dtype)
    B = flatten_B(adapter.lora_B(module)).to(device=device, dtype=dtype)
    return flat(A, B, coef * adapter.scale(module))


def shape_factors(
    entry: ModuleEntry,
    A: torch.Tensor,
    B: torch.Tensor,
    dtype: torch.dtype,
    dtype_b: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened factors back to the file's shapes (conv kernels unfolded), on the CPU, in ``dtype``."""
    from loraformat.adapter import expected_shapes

    want_a, want_b = expected_shapes(entry)
    return (
        A.reshape(want_a).to("cpu", dtype).contiguous(),
        B.reshape(want_b).to("cpu", dtype_b or dtype).contiguous(),
    )


def compose(
    adapters: Sequence[PathLike],
    out: PathLike,
    *,
    method: str,
    weights: Sequence[float] | None = None,
    rank: int | str | RankSpec | None = None,
    density: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    force: bool = False,
    overwrite: bool = False,
    name: str | None = None,
    progress: Progress | None = None,
) -> ComposeResult:
    """Compose adapters into one native loraformat file at ``out``; see the module docstring for the methods."""

    start = time.perf_counter()
    w = adapter_weights(weights, len(adapters))
    spec = parse_rank_spec(rank)
    _check_options(method, len(adapters), spec, density)
    dev = torch_device(device)

    with contextlib.ExitStack() as stack:
        parents = [stack.enter_context(open_adapter(p)) for p in adapters]
        out_path = check_output_path(out, parents, overwrite)
        _refuse_dora(parents)
        base, agreed = merge_base(parents, force=force)
        plan = _plan(parents)
        saved, saved_tensors, modules_to_save, bias = _saved(parents)
        lora_bias = any(a.meta.lora_bias for a in parents)
        if spec is None and method in LOWRANK_METHODS:
            spec = RankSpec(rank=max(r for a in parents for r in a.meta.ranks))
        out_dtype = _output_dtype(parents)

        modules, tensors, report = _compose_modules(
            parents, plan, w, method, spec, density, seed, dev, out_dtype, lora_bias, progress
        )
        tensors.update(saved_tensors)
        parent_info = [
            Parent(content_hash=parent_hash(a), weight=wi, name=a.meta.name)
            for a, wi in zip(parents, w, strict=True)
        ]

    details = _details(method, dev.type, density, seed, report, agreed)
    meta = AdapterMetadata(
        modules=modules,
        scaling=ScalingRule.STANDARD,
        dora=False,
        bias=bias,
        lora_bias=lora_bias,
        modules_to_save=modules_to_save,
        saved_tensors=saved,
        name=name or out_path.stem,
        description=f"{method} of " + ", ".join(f"{p.name} (weight {p.weight:g})" for p in parent_info),
        task=_common(a.meta.task for a in parents),
        license=_common(a.meta.license for a in parents),
        base_model=base,
        provenance=Provenance(
            method=method, parents=parent_info, rank=spec.to_json() if spec else None, details=details
        ),
    )
    content_hash = write_native(out_path, meta, tensors, overwrite=overwrite)
    return ComposeResult(
        output=str(out_path),
        method=method,
        rank=spec.to_json() if spec else None,
        content_hash=content_hash,
        parents=[{"path": os.fspath(p), **pi.to_dict()} for p, pi in zip(adapters, parent_info, strict=True)],
        modules=report,
        parameters=lora_params(tensors, saved),
        file_size=os.path.getsize(out_path),
        base_kept=agreed,
        forced=not agreed,
        seconds=time.perf_counter() - start,
    )


def _refuse_dora(parents: Sequence[Adapter]) -> None:
    for a in parents:
        if a.meta.dora:
            raise ComposeError(
                "is a DoRA adapter: its magnitude vector makes the delta nonlinear, so it "
                "cannot be composed exactly; merge it into the base instead",
                path=a.path,
            )


def _compose_modules(
    parents: Sequence[Adapter],
    plan: dict[str, list[int]],
    w: list[float],
    method: str,
    spec: RankSpec | None,
    density: float | None,
    seed: int,
    dev: torch.device,
    out_dtype: torch.dtype,
    lora_bias: bool,
    progress: Progress | None,
) -> tuple[dict[str, ModuleEntry], dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Every module of the composition: its entry, its factors (and LoRA bias) and what it kept."""
    from loraformat.ops import combine

    fdtype = factor_dtype(out_dtype)
    modules: dict[str, ModuleEntry] = {}
    tensors: dict[str, torch.Tensor] = {}
    report: dict[str, dict[str, Any]] = {}
    for module, idx in plan.items():
        terms = [_term(parents[i], module, w[i], dev, fdtype) for i in idx]
        gen = combine.module_generator(seed, module, dev) if method in SEEDED_METHODS else None
        A, B, kept = combine.compose_module(method, terms, rank=spec, density=density or 1.0, generator=gen)
        entry = _entry(parents[idx[0]].meta.modules[module], int(A.shape[0]))
        keys = module_keys(module, entry, lora_bias=lora_bias)
        tensors[keys.A], tensors[keys.B] = shape_factors(entry, A, B, out_dtype)
        if keys.bias:
            tensors[keys.bias] = _bias_sum(parents, idx, module, w, entry.out_features, fdtype, out_dtype)
        modules[module] = entry
        report[module] = {"rank": entry.rank, "energy_kept": kept, "parents": len(idx)}
        if progress:
            progress(1)
    return modules, tensors, report


def _check_options(method: str, n_adapters: int, spec: RankSpec | None, density: float | None) -> None:
    if method not in COMPOSE_METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(COMPOSE_METHODS)}")
    if not n_adapters:
        raise UsageError("give at least one adapter to compose")
    if spec is not None and method not in LOWRANK_METHODS:
        raise UsageError(
            f"--rank does not apply to {method} (it is exact); use --method svd to reduce the rank"
        )
    if method in DENSITY_METHODS:
        if density is None:
            raise UsageError(f"--method {method} needs --density (fraction of entries kept, e.g. 0.5)")
        if not (0.0 < density <= 1.0):
            raise UsageError(f"--density must be in (0, 1], not {density}")
    elif density is not None:
        raise UsageError(f"--density applies to {', '.join(DENSITY_METHODS)}, not {method}")


def _entry(ref: ModuleEntry, rank: int) -> ModuleEntry:
    """The composed module's entry: the parents' shape and target, the new rank, alpha = rank (scale 1)."""
    return ModuleEntry(
        kind=ref.kind,
        rank=rank,
        alpha=float(rank),
        in_features=ref.in_features,
        out_features=ref.out_features,
        base_tensor=ref.base_tensor,
        fan_in_fan_out=ref.fan_in_fan_out,
        kernel_size=list(ref.kernel_size) if ref.kernel_size else None,
    )


def _details(
    method: str, device: str, density: float | None, seed: int, report: dict[str, Any], agreed: bool
) -> dict[str, Any]:
    """provenance.details: what another run needs to reproduce the composition, and what it kept."""
    details: dict[str, Any] = {"device": device}
    if method in DENSITY_METHODS:
        details["density"] = density
    if method in SEEDED_METHODS:
        details["seed"] = seed
    if method in LOWRANK_METHODS:
        details["energy_kept"] = {m: r["energy_kept"] for m, r in report.items()}
    if not agreed:
        details["forced_different_bases"] = True
    return details


def _output_dtype(adapters: Sequence[Adapter]) -> torch.dtype:
    """The widest floating dtype among the parents' factors (bf16 + fp32 parents give fp32)."""
    import torch

    dtype = None
    for a in adapters:
        for module in a.meta.modules:
            keys = a.keys(module)
            for key in (keys.A, keys.B):
                d = torch_dtype(a.source.infos[key].dtype)
                dtype = d if dtype is None else torch.promote_types(dtype, d)
    return dtype or torch.float32


def _bias_sum(
    parents: Sequence[Adapter],
    idx: Sequence[int],
    module: str,
    w: Sequence[float],
    out_features: int,
    fdtype: torch.dtype,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """LoRA biases add like the weights: sum_i w_i s_i b_i (output scale is 1); a parent without one adds 0."""
    import torch

    total = torch.zeros(out_features, dtype=fdtype)
    for i in idx:
        key = parents[i].keys(module).bias
        if key:
            total += parents[i].tensor(key).to(fdtype) * (w[i] * parents[i].scale(module))
    return total.to(out_dtype)


def _common(values: Any) -> str | None:
    found = set(values)
    return found.pop() if len(found) == 1 else None
