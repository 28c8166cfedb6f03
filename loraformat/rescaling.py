"""One adapter at a time, straight from its factors: change its strength or rank, or look at its spectrum.

- ``rescale``: multiply every delta by S (``scale``) or set alpha (``alpha``), and/or truncate ranks optimally
  (QR-core SVD: the optimal rank-R approximation, only downwards).
- ``spectrum``: singular values of each module's delta and the energy kept at a few ranks, to choose a rank.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loraformat import spec as fmt
from loraformat.adapter import Adapter, open_adapter
from loraformat.composition import (
    PathLike,
    Progress,
    ReportBase,
    check_output_path,
    factor_dtype,
    lora_params,
    parent_hash,
    shape_factors,
    torch_device,
)
from loraformat.constants import ScalingRule
from loraformat.errors import ComposeError, UsageError
from loraformat.io.native import write_native
from loraformat.metadata import AdapterMetadata, ModuleEntry, Parent, Provenance
from loraformat.ops.lowrank import RankSpec, parse_rank_spec

if TYPE_CHECKING:
    import torch


@dataclass
class RescaleResult(ReportBase):
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

    start = time.perf_counter()
    if scale is not None and alpha is not None:
        raise UsageError("--scale and --alpha are exclusive: --alpha A is --scale A/alpha for each module")
    spec = parse_rank_spec(rank)
    _check_options(scale, alpha, spec)
    dev = torch_device(device)

    with open_adapter(adapter) as src:
        out_path = check_output_path(out, [src], overwrite)
        _check_adapter(src, spec)
        meta = copy.deepcopy(src.meta)
        tensors = {k: src.tensor(k) for k in src.source.infos}
        params_before = lora_params(tensors, meta.saved_tensors)
        report: dict[str, dict[str, Any]] = {}
        for module, entry in sorted(meta.modules.items()):
            report[module] = _rescale_module(
                meta, module, entry, src.keys(module), tensors, scale, alpha, spec, dev
            )
            if progress:
                progress(1)
        if spec is not None:
            meta.scaling = ScalingRule.STANDARD
        file_size_before = src.file_size
        parent = Parent(
            content_hash=parent_hash(src), weight=scale if scale is not None else 1.0, name=src.meta.name
        )

    details: dict[str, Any] = {"scale": scale, "alpha": alpha}
    if spec is not None:
        details["energy_kept"] = {m: r["energy_kept"] for m, r in report.items()}
    meta.provenance = Provenance(
        method="rescale", parents=[parent], rank=spec.to_json() if spec else None, details=details
    )
    meta.name = name or out_path.stem
    meta.created_by = {}
    meta.content_hash = None
    content_hash = write_native(out_path, meta, tensors, overwrite=overwrite)
    return RescaleResult(
        output=str(out_path),
        content_hash=content_hash,
        scale=scale,
        alpha=alpha,
        rank=spec.to_json() if spec else None,
        modules=report,
        parameters_before=params_before,
        parameters_after=lora_params(tensors, meta.saved_tensors),
        file_size_before=file_size_before,
        file_size_after=os.path.getsize(out_path),
        seconds=time.perf_counter() - start,
    )


def _check_adapter(src: Adapter, spec: RankSpec | None) -> None:
    if src.meta.dora:
        raise ComposeError(
            "is a DoRA adapter: its magnitude vector makes the delta nonlinear, so scaling "
            "or truncating the LoRA factors does not scale the delta",
            path=src.path,
        )
    top = max(src.meta.ranks)
    if spec is not None and spec.rank is not None and spec.rank > top:
        raise UsageError(
            f"--rank {spec.rank} is above the adapter's largest rank {top}: rescale only "
            "lowers ranks (padding with zeros adds nothing)"
        )


def _check_options(scale: float | None, alpha: float | None, spec: RankSpec | None) -> None:
    if scale is None and alpha is None and spec is None:
        raise UsageError("nothing to do: give --scale, --alpha or --rank")
    if scale is not None and (not math.isfinite(scale) or scale == 0):
        raise UsageError(f"--scale must be a finite non-zero number, not {scale}")
    if alpha is not None and (not math.isfinite(alpha) or alpha <= 0):
        raise UsageError(f"--alpha must be a positive number, not {alpha}")


def _rescale_module(
    meta: AdapterMetadata,
    module: str,
    entry: ModuleEntry,
    keys: Any,
    tensors: dict[str, torch.Tensor],
    scale: float | None,
    alpha: float | None,
    spec: RankSpec | None,
    dev: torch.device,
) -> dict[str, Any]:
    """One module: its new alpha (exact) or its truncated factors (``spec``), in ``entry`` and ``tensors``."""
    from loraformat.ops import lowrank

    if scale is not None:
        new_alpha, total = entry.alpha * abs(scale), meta.scale(module) * scale
    elif alpha is not None:
        new_alpha, total = float(alpha), fmt.scale_for(meta.scaling, entry.rank, alpha)
    else:
        new_alpha, total = entry.alpha, meta.scale(module)
    A0, B0 = tensors[keys.A], tensors[keys.B]
    fdtype = factor_dtype(A0.dtype, B0.dtype)
    rank_before, kept = entry.rank, 1.0
    if spec is None:  # exact: the factors stay, the change goes into alpha (which must stay > 0)
        entry.alpha = new_alpha
        factor = -1.0 if total < 0 else 1.0
    else:  # optimal truncation, written like compose output: alpha = rank, the factors carry the scale
        svd = lowrank.qr_core_svd(
            lowrank.flatten_A(A0).to(dev, fdtype), lowrank.flatten_B(B0).to(dev, fdtype)
        )
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
    return {"rank_before": rank_before, "rank_after": entry.rank, "energy_kept": kept}


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
                name: {
                    "rank": m.rank,
                    "out_features": m.out_features,
                    "in_features": m.in_features,
                    "singular_values": m.singular_values,
                    "energy": {str(r): e for r, e in m.energy.items()},
                    "rank_for": {f"{e:g}": k for e, k in m.rank_for.items()},
                }
                for name, m in self.modules.items()
            },
        }

    def format_text(self) -> str:
        width = max([len("module"), *(len(n) for n in self.modules)])
        head = f"{'module':<{width}}  rank  sigma_1    r@90% r@99%" + "".join(
            f"  E@{r:<4}" for r in self.ranks
        )
        lines = [
            f"{self.path}: singular values of each module's delta ({len(self.modules)} modules, "
            f"scaling {self.scaling}{', DoRA: direction delta only' if self.dora else ''})",
            "E@r = fraction of the delta's squared Frobenius norm kept by the best rank-r approximation",
            head,
        ]
        for name, m in self.modules.items():
            s1 = m.singular_values[0] if m.singular_values else 0.0
            lines.append(
                f"{name:<{width}}  {m.rank:>4}  {s1:<9.3e}  {m.rank_for[0.9]:>5} {m.rank_for[0.99]:>5}"
                + "".join(f"  {m.energy[r]:<6.4f}" for r in self.ranks)
            )
        lines.append(
            f"{'mean':<{width}}  {'':>4}  {'':<9}  {'':>5} {'':>5}"
            + "".join(f"  {self.mean_energy(r):<6.4f}" for r in self.ranks)
        )
        return "\n".join(lines)


def spectrum(
    adapter: PathLike, *, ranks: Sequence[int] = (4, 8, 16, 32), device: str = "cpu"
) -> SpectrumReport:
    """Per-module singular values of the delta ``s * B @ A`` (QR-core, no dense product) to help choose a rank."""
    from loraformat.ops import lowrank

    ranks = tuple(int(r) for r in ranks)
    if not ranks or any(r <= 0 for r in ranks):
        raise UsageError("spectrum ranks must be positive integers")
    dev = torch_device(device)
    modules: dict[str, ModuleSpectrum] = {}
    with open_adapter(adapter) as src:
        for module, entry in sorted(src.meta.modules.items()):
            A, B = src.lora_A(module), src.lora_B(module)
            fdtype = factor_dtype(A.dtype, B.dtype)
            A, B = lowrank.flatten_A(A).to(dev, fdtype), lowrank.flatten_B(B).to(dev, fdtype)
            S = lowrank.singular_values(A, B) * abs(src.scale(module))
            modules[module] = ModuleSpectrum(
                rank=entry.rank,
                out_features=entry.out_features,
                in_features=entry.in_features,
                singular_values=[float(x) for x in S.cpu()],
                energy={r: lowrank.energy_kept(S, r) for r in ranks},
                rank_for={e: lowrank.energy_rank(S, e) for e in (0.9, 0.99)},
            )
        return SpectrumReport(
            path=os.fspath(adapter),
            scaling=src.meta.scaling,
            dora=src.meta.dora,
            ranks=ranks,
            modules=modules,
        )
