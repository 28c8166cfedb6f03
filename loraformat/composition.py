"""Compose, rescale and inspect the spectrum of adapters straight from their factors, with no base model loaded.

- ``compose``: per module, the weighted sum ``sum_i w_i s_i B_i A_i`` of the parents' deltas.
  ``cat`` stores it exactly (rank = sum of ranks); ``linear`` is the same exact sum, losslessly compacted to at
  most min(out, in) where the stacked rank exceeds that; ``svd`` recompresses it to rank R (or ``auto:E``) with
  the QR-core SVD, which is the optimal rank-R approximation (Eckart-Young); ``ties`` / ``dare_linear`` /
  ``dare_ties`` work on the dense delta of one module at a time, then SVD back to rank R.
- ``rescale``: multiply every delta by S (``scale``) or set alpha (``alpha``), and/or truncate ranks optimally.
- ``spectrum``: singular values of each module's delta and the energy kept at a few ranks.

Outputs are native loraformat files written with the standard ``alpha/r`` rule and ``alpha = rank`` for every
composed module, so each module's scale is exactly 1 whatever rules the parents used (rsLoRA included); the
factors carry all the weight. Module paths and tensor keys stay PEFT's, so PEFT and vLLM load the file as is.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraformat import spec as fmt
from loraformat.adapter import Adapter, module_keys, open_adapter
from loraformat.errors import ComposeError, UsageError
from loraformat.io.atomic import check_output
from loraformat.io.native import data_section_hash, write_native
from loraformat.io.tensors import SafetensorsSource, torch_dtype
from loraformat.metadata import AdapterMetadata, BaseModel, ModuleEntry, Parent, Provenance
from loraformat.ops.lowrank import RankSpec, parse_rank_spec

if TYPE_CHECKING:
    import torch

    from loraformat.ops.combine import Term

METHODS = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties")
LOWRANK_METHODS = ("svd", "ties", "dare_linear", "dare_ties")  # these take --rank
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")  # these need --density
SEEDED_METHODS = ("dare_linear", "dare_ties")

Progress = Callable[[int], None]
PathLike = str | os.PathLike[str]


class _Report:
    modules: dict[str, dict[str, Any]]

    @property
    def min_energy_kept(self) -> float:
        return min((m["energy_kept"] for m in self.modules.values()), default=1.0)

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "min_energy_kept": self.min_energy_kept}


@dataclass
class ComposeResult(_Report):
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


@dataclass
class RescaleResult(_Report):
    output: str
    content_hash: str
    scale: float | None
    alpha: float | None
    rank: int | str | None
    modules: dict[str, dict[str, Any]]  # module -> {"rank_before", "rank_after", "energy_kept"}
    parameters_before: int
    parameters_after: int
    file_size_before: int
    file_size_after: int
    seconds: float


# --- argument checks -------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device) -> torch.device:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"--device {device!r} is not a torch device (use cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: only cpu and cuda are supported")
    return dev


def factor_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp32, or fp64 when an input is fp64. The QR-core path is stable in fp32 (its error against the exact
    sum stays at fp32 round-off, far below a dense fp32 SVD's; bench/compose_bench.py) and 2-5x faster than
    fp64 on CPU; the r x r core is always decomposed in fp64."""
    import torch

    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def _check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise UsageError(f"{len(weights)} weights for {n} adapters: give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise UsageError("weights must be finite numbers")
    return weights


def _check_output(out: PathLike, inputs: Sequence[Adapter], overwrite: bool) -> Path:
    out_path = Path(out)
    for a in inputs:
        for p in {Path(a.path), Path(a.source.path)}:
            with contextlib.suppress(OSError):
                if out_path.resolve() == p.resolve():
                    raise UsageError("output would overwrite an input; inputs are never modified", path=out)
    check_output(out_path, overwrite=overwrite)
    return out_path


def parent_hash(adapter: Adapter) -> str | None:
    """The parent's content hash: sha256 of its safetensors data section (as a native file records it)."""
    src = adapter.source
    if isinstance(src, SafetensorsSource):
        return data_section_hash(src.path, src.header.data_start)
    return adapter.meta.content_hash


def _lora_params(tensors: dict[str, Any], saved: dict[str, str]) -> int:
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
                        "use --force to compose them anyway", path=adapters[i].path)
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
                for attr in ("kind", "in_features", "out_features", "kernel_size", "base_tensor", "fan_in_fan_out"):
                    if getattr(ref, attr) != getattr(entry, attr):
                        raise ComposeError(
                            f"module {module}: {attr} {getattr(ref, attr)} in {adapters[j].path} but "
                            f"{getattr(entry, attr)} in {a.path}; adapters disagree about this module",
                            path=a.path)
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
        same = (other.meta.saved_tensors == ref.meta.saved_tensors and other.meta.bias == ref.meta.bias
                and sorted(other.meta.modules_to_save) == sorted(ref.meta.modules_to_save)
                and all(torch.equal(other.tensor(k), t) for k, t in tensors.items()))
        if not same:
            raise ComposeError(
                f"{ref.path} and {other.path} both carry whole saved tensors (modules_to_save or bias) that "
                "differ; they replace base weights and cannot be summed", path=other.path)
    return dict(ref.meta.saved_tensors), tensors, list(ref.meta.modules_to_save), ref.meta.bias


def _term(adapter: Adapter, module: str, coef: float, device: torch.device, dtype: torch.dtype) -> Term:
    from loraformat.ops.combine import Term
    from loraformat.ops.lowrank import flatten_A, flatten_B

    A = flatten_A(adapter.lora_A(module)).to(device=device, dtype=dtype)
    B = flatten_B(adapter.lora_B(module)).to(device=device, dtype=dtype)
    return Term(A, B, coef * adapter.scale(module))


def shape_factors(entry: ModuleEntry, A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype,
                  dtype_b: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened factors back to the file's shapes (conv kernels unfolded), on the CPU, in ``dtype``."""
    from loraformat.adapter import expected_shapes

    want_a, want_b = expected_shapes(entry)
    return (A.reshape(want_a).to("cpu", dtype).contiguous(),
            B.reshape(want_b).to("cpu", dtype_b or dtype).contiguous())


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
    from loraformat.ops import combine

    start = time.perf_counter()
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not adapters:
        raise UsageError("give at least one adapter to compose")
    w = _check_weights(weights, len(adapters))
    spec = parse_rank_spec(rank)
    if spec is not None and method not in LOWRANK_METHODS:
        raise UsageError(f"--rank does not apply to {method} (it is exact); use --method svd to reduce the rank")
    if method in DENSITY_METHODS:
        if density is None:
            raise UsageError(f"--method {method} needs --density (fraction of entries kept, e.g. 0.5)")
        if not (0.0 < density <= 1.0):
            raise UsageError(f"--density must be in (0, 1], not {density}")
    elif density is not None:
        raise UsageError(f"--density applies to {', '.join(DENSITY_METHODS)}, not {method}")
    dev = resolve_device(device)

    with contextlib.ExitStack() as stack:
        parents = [stack.enter_context(open_adapter(p)) for p in adapters]
        out_path = _check_output(out, parents, overwrite)
        for a in parents:
            if a.meta.dora:
                raise ComposeError("is a DoRA adapter: its magnitude vector makes the delta nonlinear, so it "
                                   "cannot be composed exactly; merge it into the base instead", path=a.path)
        base, agreed = merge_base(parents, force=force)
        plan = _plan(parents)
        saved, saved_tensors, modules_to_save, bias = _saved(parents)
        lora_bias = any(a.meta.lora_bias for a in parents)
        if spec is None and method in LOWRANK_METHODS:
            spec = RankSpec(rank=max(r for a in parents for r in a.meta.ranks))
        out_dtype = _output_dtype(parents)
        fdtype = factor_dtype(out_dtype)

        modules: dict[str, ModuleEntry] = {}
        tensors: dict[str, torch.Tensor] = {}
        report: dict[str, dict[str, Any]] = {}
        for module, idx in plan.items():
            ref = parents[idx[0]].meta.modules[module]
            terms = [_term(parents[i], module, w[i], dev, fdtype) for i in idx]
            gen = combine.module_generator(seed, module, dev) if method in SEEDED_METHODS else None
            A, B, kept = combine.compose_module(method, terms, rank=spec, density=density or 1.0, generator=gen)
            k = int(A.shape[0])
            entry = ModuleEntry(kind=ref.kind, rank=k, alpha=float(k), in_features=ref.in_features,
                                out_features=ref.out_features, base_tensor=ref.base_tensor,
                                fan_in_fan_out=ref.fan_in_fan_out,
                                kernel_size=list(ref.kernel_size) if ref.kernel_size else None)
            keys = module_keys(module, entry, lora_bias=lora_bias)
            tensors[keys.A], tensors[keys.B] = shape_factors(entry, A, B, out_dtype)
            if keys.bias:
                tensors[keys.bias] = _bias_sum(parents, idx, module, w, ref.out_features, fdtype, out_dtype)
            modules[module] = entry
            report[module] = {"rank": k, "energy_kept": kept, "parents": len(idx)}
            if progress:
                progress(1)
        tensors.update(saved_tensors)
        parent_info = [Parent(content_hash=parent_hash(a), weight=wi, name=a.meta.name)
                       for a, wi in zip(parents, w, strict=True)]

    details: dict[str, Any] = {"device": dev.type}
    if method in DENSITY_METHODS:
        details["density"] = density
    if method in SEEDED_METHODS:
        details["seed"] = seed
    if method in LOWRANK_METHODS:
        details["energy_kept"] = {m: r["energy_kept"] for m, r in report.items()}
    if not agreed:
        details["forced_different_bases"] = True
    meta = AdapterMetadata(
        modules=modules, scaling=fmt.SCALING_STANDARD, dora=False, bias=bias, lora_bias=lora_bias,
        modules_to_save=modules_to_save, saved_tensors=saved, name=name or out_path.stem,
        description=f"{method} of " + ", ".join(f"{p.name} (weight {p.weight:g})" for p in parent_info),
        task=_common(a.meta.task for a in parents), license=_common(a.meta.license for a in parents),
        base_model=base,
        provenance=Provenance(method=method, parents=parent_info, rank=spec.to_json() if spec else None,
                              details=details),
    )
    content_hash = write_native(out_path, meta, tensors, overwrite=overwrite)
    return ComposeResult(
        output=str(out_path), method=method, rank=spec.to_json() if spec else None, content_hash=content_hash,
        parents=[{"path": os.fspath(p), **pi.to_dict()} for p, pi in zip(adapters, parent_info, strict=True)],
        modules=report, parameters=_lora_params(tensors, saved), file_size=os.path.getsize(out_path),
        base_kept=agreed, forced=not agreed, seconds=time.perf_counter() - start,
    )


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


def _bias_sum(parents: Sequence[Adapter], idx: Sequence[int], module: str, w: Sequence[float], out_features: int,
              fdtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
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


# --- rescale ---------------------------------------------------------------------------------------------------


def rescale(
    adapter: PathLike,
    out: PathLike,
    *,
    scale: float | None = None,
    alpha: float | None = None,
    rank: int | str | RankSpec | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    name: str | None = None,
    progress: Progress | None = None,
) -> RescaleResult:
    """Multiply every module's delta by ``scale`` or set every alpha to ``alpha``, and/or lower ranks to
    ``rank`` (optimal truncation, per module, never upwards).

    Without ``rank`` this is exact and the factors are kept bit for bit: the change goes into alpha (a negative
    scale flips B, since alpha must stay positive). With ``rank`` every module is written as compose writes
    it: standard ``alpha/r`` rule, alpha = rank, scale 1, the factors carrying the scale; so loaders that
    ignore PEFT's rank_pattern/alpha_pattern (some vLLM versions) still scale every module right. Saved
    tensors (modules_to_save, biases) replace base weights rather than add to them, so they are copied as is.
    """
    import copy

    from loraformat.ops import lowrank

    start = time.perf_counter()
    if scale is not None and alpha is not None:
        raise UsageError("--scale and --alpha are exclusive: --alpha A is --scale A/alpha for each module")
    spec = parse_rank_spec(rank)
    if scale is None and alpha is None and spec is None:
        raise UsageError("nothing to do: give --scale, --alpha or --rank")
    if scale is not None and (not math.isfinite(scale) or scale == 0):
        raise UsageError(f"--scale must be a finite non-zero number, not {scale}")
    if alpha is not None and (not math.isfinite(alpha) or alpha <= 0):
        raise UsageError(f"--alpha must be a positive number, not {alpha}")
    dev = resolve_device(device)

    with open_adapter(adapter) as src:
        out_path = _check_output(out, [src], overwrite)
        if src.meta.dora:
            raise ComposeError("is a DoRA adapter: its magnitude vector makes the delta nonlinear, so scaling "
                               "or truncating the LoRA factors does not scale the delta", path=src.path)
        top = max(src.meta.ranks)
        if spec is not None and spec.rank is not None and spec.rank > top:
            raise UsageError(f"--rank {spec.rank} is above the adapter's largest rank {top}: rescale only "
                             "lowers ranks (padding with zeros adds nothing)")
        meta = copy.deepcopy(src.meta)
        rule = meta.scaling
        tensors = {k: src.tensor(k) for k in src.source.infos}
        params_before = _lora_params(tensors, meta.saved_tensors)
        report: dict[str, dict[str, Any]] = {}
        for module, entry in sorted(meta.modules.items()):
            keys = src.keys(module)
            if scale is not None:
                new_alpha, total = entry.alpha * abs(scale), meta.scale(module) * scale
            elif alpha is not None:
                new_alpha, total = float(alpha), fmt.scale_for(rule, entry.rank, alpha)
            else:
                new_alpha, total = entry.alpha, meta.scale(module)
            A0, B0 = tensors[keys.A], tensors[keys.B]
            fdtype = factor_dtype(A0.dtype, B0.dtype)
            rank_before, kept = entry.rank, 1.0
            if spec is None:  # exact: the factors stay, the change goes into alpha (which must stay > 0)
                entry.alpha = new_alpha
                factor = -1.0 if total < 0 else 1.0
            else:  # optimal truncation, written like compose output: alpha = rank, the factors carry the scale
                svd = lowrank.qr_core_svd(lowrank.flatten_A(A0).to(dev, fdtype),
                                          lowrank.flatten_B(B0).to(dev, fdtype))
                k = lowrank.choose_rank(svd.S, spec, cap=entry.rank)
                entry.rank, entry.alpha, factor = k, float(k), total
                if k < rank_before:
                    kept = lowrank.energy_kept(svd.S, k)
                    A, B = svd.factors(k, total)
                    tensors[keys.A], tensors[keys.B] = shape_factors(entry, A, B, A0.dtype, B0.dtype)
                else:
                    tensors[keys.B] = (B0.to(fdtype) * total).to(B0.dtype)
            if spec is None and factor < 0:
                tensors[keys.B] = -B0
            if keys.bias and factor != 1.0:  # LoRA biases scale with the delta
                bias = tensors[keys.bias]
                tensors[keys.bias] = (bias.double() * factor).to(bias.dtype)
            report[module] = {"rank_before": rank_before, "rank_after": entry.rank, "energy_kept": kept}
            if progress:
                progress(1)
        if spec is not None:
            meta.scaling = fmt.SCALING_STANDARD
        file_size_before = src.file_size
        parent = Parent(content_hash=parent_hash(src), weight=scale if scale is not None else 1.0,
                        name=src.meta.name)

    details: dict[str, Any] = {"scale": scale, "alpha": alpha}
    if spec is not None:
        details["energy_kept"] = {m: r["energy_kept"] for m, r in report.items()}
    meta.provenance = Provenance(method="rescale", parents=[parent], rank=spec.to_json() if spec else None,
                                 details=details)
    meta.name = name or out_path.stem
    meta.created_by = {}
    meta.content_hash = None
    content_hash = write_native(out_path, meta, tensors, overwrite=overwrite)
    return RescaleResult(
        output=str(out_path), content_hash=content_hash, scale=scale, alpha=alpha,
        rank=spec.to_json() if spec else None, modules=report, parameters_before=params_before,
        parameters_after=_lora_params(tensors, meta.saved_tensors), file_size_before=file_size_before,
        file_size_after=os.path.getsize(out_path), seconds=time.perf_counter() - start,
    )


# --- spectrum --------------------------------------------------------------------------------------------------


@dataclass
class ModuleSpectrum:
    rank: int
    out_features: int
    in_features: int
    singular_values: list[float]  # of the scaled delta s * B @ A, descending
    energy: dict[int, float]  # rank -> fraction of ||delta||_F^2 kept by the best approximation of that rank
    rank_for: dict[float, int] = field(default_factory=dict)  # energy fraction -> smallest rank reaching it


@dataclass
class SpectrumReport:
    path: str
    scaling: str
    dora: bool
    ranks: tuple[int, ...]
    modules: dict[str, ModuleSpectrum]

    def mean_energy(self, r: int) -> float:
        values = [m.energy[r] for m in self.modules.values()]
        return sum(values) / len(values) if values else 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "scaling": self.scaling,
            "dora": self.dora,
            "ranks": list(self.ranks),
            "mean_energy": {str(r): self.mean_energy(r) for r in self.ranks},
            "modules": {
                name: {"rank": m.rank, "out_features": m.out_features, "in_features": m.in_features,
                       "singular_values": m.singular_values,
                       "energy": {str(r): e for r, e in m.energy.items()},
                       "rank_for": {f"{e:g}": k for e, k in m.rank_for.items()}}
                for name, m in self.modules.items()
            },
        }

    def format_text(self) -> str:
        width = max([len("module"), *(len(n) for n in self.modules)])
        head = f"{'module':<{width}}  rank  sigma_1    r@90% r@99%" + "".join(f"  E@{r:<4}" for r in self.ranks)
        lines = [
            f"{self.path}: singular values of each module's delta ({len(self.modules)} modules, "
            f"scaling {self.scaling}{', DoRA: direction delta only' if self.dora else ''})",
            "E@r = fraction of the delta's squared Frobenius norm kept by the best rank-r approximation",
            head,
        ]
        for name, m in self.modules.items():
            s1 = m.singular_values[0] if m.singular_values else 0.0
            lines.append(f"{name:<{width}}  {m.rank:>4}  {s1:<9.3e}  {m.rank_for[0.9]:>5} {m.rank_for[0.99]:>5}"
                         + "".join(f"  {m.energy[r]:<6.4f}" for r in self.ranks))
        lines.append(f"{'mean':<{width}}  {'':>4}  {'':<9}  {'':>5} {'':>5}"
                     + "".join(f"  {self.mean_energy(r):<6.4f}" for r in self.ranks))
        return "\n".join(lines)


def spectrum(adapter: PathLike, *, ranks: Sequence[int] = (4, 8, 16, 32), device: str = "cpu") -> SpectrumReport:
    """Per-module singular values of the delta ``s * B @ A`` (QR-core, no dense product) to help choose a rank."""
    from loraformat.ops import lowrank

    ranks = tuple(int(r) for r in ranks)
    if not ranks or any(r <= 0 for r in ranks):
        raise UsageError("spectrum ranks must be positive integers")
    dev = resolve_device(device)
    modules: dict[str, ModuleSpectrum] = {}
    with open_adapter(adapter) as src:
        for module, entry in sorted(src.meta.modules.items()):
            A, B = src.lora_A(module), src.lora_B(module)
            fdtype = factor_dtype(A.dtype, B.dtype)
            A, B = lowrank.flatten_A(A).to(dev, fdtype), lowrank.flatten_B(B).to(dev, fdtype)
            S = lowrank.singular_values(A, B) * abs(src.scale(module))
            modules[module] = ModuleSpectrum(
                rank=entry.rank, out_features=entry.out_features, in_features=entry.in_features,
                singular_values=[float(x) for x in S.cpu()],
                energy={r: lowrank.energy_kept(S, r) for r in ranks},
                rank_for={e: lowrank.energy_rank(S, e) for e in (0.9, 0.99)},
            )
        return SpectrumReport(path=os.fspath(adapter), scaling=src.meta.scaling, dora=src.meta.dora, ranks=ranks,
                              modules=modules)
