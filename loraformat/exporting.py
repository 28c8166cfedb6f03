"""``loraformat convert --for ENGINE``: a file each engine's own reading rule turns into exactly the adapter.

vLLM and PEFT read a PEFT directory: per-module ranks and alphas go into rank_pattern / alpha_pattern, which
both honour (measured, spec/interop/vllm.md); ``uniform`` instead writes one rank and one alpha (ranks
zero-padded, each module's scale folded into lora_B) for readers that only take the global r / lora_alpha.
llama.cpp reads one GGUF file with one alpha and each tensor's rank: every module's scale is folded into lora_B
and its q/k rows are permuted as llama.cpp's converter permutes the base (spec/interop/llamacpp.md).
``max_rank`` brings an adapter under a server's cap by the optimal (Eckart-Young) truncation of each larger
module and reports the energy kept. What an engine cannot represent is refused, naming the modules; nothing is
written then.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraformat.adapter import Adapter, open_adapter
from loraformat.constants import ScalingRule
from loraformat.conversion import ConvertResult, write_peft_dir
from loraformat.engines import LLAMA_CPP, PEFT, VLLM, check_engine
from loraformat.engines import llamacpp as llama_rule
from loraformat.engines import vllm as vllm_rule
from loraformat.errors import BaseMismatchError, EngineRefusedError, UsageError
from loraformat.metadata import AdapterMetadata, Provenance

if TYPE_CHECKING:
    import torch

    from loraformat.engines.llamacpp import GgufTarget


@dataclass
class ExportResult(ConvertResult):
    engine: str | None = None
    alpha: float | None = None  # GGUF adapter.lora.alpha, or the uniform alpha
    folded: list[str] = field(default_factory=list)  # modules whose scale went into lora_B
    padded: list[str] = field(default_factory=list)  # modules zero-padded to the uniform rank
    permuted: list[str] = field(default_factory=list)  # modules whose lora_B rows were permuted (q/k)
    max_lora_rank: int | None = None  # vLLM: the server cap this adapter needs
    truncated: dict[str, dict[str, float]] = field(default_factory=dict)  # module -> from, to, energy_kept
    energy_kept: float = 1.0  # of the whole adapter's squared Frobenius norm (sum over modules of s^2 |BA|^2)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --- tensors and metadata in memory ----------------------------------------------------------------------


@dataclass
class Factors:
    """One module's A and B, float32, with the metadata entry they belong to (rank and alpha may change)."""

    A: torch.Tensor
    B: torch.Tensor


def _load(adapter: Adapter) -> dict[str, Factors]:
    import torch

    return {
        m: Factors(adapter.lora_A(m).to(torch.float32), adapter.lora_B(m).to(torch.float32))
        for m in adapter.modules
    }


def _refuse(engine: str, problems: list[tuple[str, str]], path: str) -> None:
    if problems:
        listed = "; ".join(f"{where}: {why}" for where, why in problems)
        raise EngineRefusedError(f"{engine} cannot represent this adapter: {listed}", path=path)


def truncate(meta: AdapterMetadata, factors: dict[str, Factors], max_rank: int, result: ExportResult) -> None:
    """Optimal rank-``max_rank`` truncation of every larger module (QR-core SVD of B @ A), keeping each
    module's delta ``s * B @ A`` as close as the rank allows; the new scale is folded into the factors."""
    from loraformat.ops.lowrank import energy_kept, qr_core_svd

    total = kept = 0.0
    for name, entry in sorted(meta.modules.items()):
        f = factors[name]
        s = meta.scale(name)
        if entry.rank <= max_rank:
            norm = float((f.B.double() @ f.A.double()).square().sum()) if entry.rank else 0.0
            total += s * s * norm
            kept += s * s * norm
            continue
        svd = qr_core_svd(f.A.reshape(f.A.shape[0], -1), f.B.reshape(f.B.shape[0], -1))
        energy = float(svd.S.double().square().sum())
        k = max(1, min(max_rank, int(svd.S.shape[0])))
        share = energy_kept(svd.S, k)
        old_rank = entry.rank
        entry.rank = k
        new_s = meta.scale(name)
        A, B = svd.factors(k, coef=s / new_s)
        factors[name] = Factors(A.reshape(k, *f.A.shape[1:]), B.reshape(B.shape[0], k, *f.B.shape[2:]))
        total += s * s * energy
        kept += s * s * energy * share
        result.truncated[name] = {"from": old_rank, "to": k, "energy_kept": share}
    result.energy_kept = kept / total if total > 0 else 1.0


def make_uniform(meta: AdapterMetadata, factors: dict[str, Factors], result: ExportResult) -> None:
    """One rank (the largest, others zero-padded) and one alpha with the standard rule: each module's own scale
    is folded into B, so ``alpha / r`` read globally gives every module exactly its delta."""
    from loraformat.ops.normalize import fold_scale, global_fold_factor, pad_rank

    rank = max(e.rank for e in meta.modules.values())
    alpha = llama_rule.global_alpha(meta)
    for name, entry in sorted(meta.modules.items()):
        f = factors[name]
        factor = global_fold_factor(meta.scale(name), rank, alpha)
        if factor != 1.0:
            result.folded.append(name)
        if entry.rank != rank:
            result.padded.append(name)
        A, B = pad_rank(f.A, f.B, rank)
        factors[name] = Factors(A, fold_scale(B, factor))
        entry.rank, entry.alpha = rank, alpha
    meta.scaling = ScalingRule.STANDARD
    result.alpha = alpha


def _tensors(adapter: Adapter, meta: AdapterMetadata, factors: dict[str, Factors]) -> dict[str, Any]:
    """Every tensor of the output: the (possibly rewritten) factors under the adapter's keys, plus the rest."""
    from loraformat.adapter import module_keys

    out: dict[str, Any] = {}
    replaced: set[str] = set()
    for name, entry in meta.modules.items():
        old = adapter.keys(name)
        replaced.update((old.A, old.B))
        keys = module_keys(name, entry, dora=meta.dora, lora_bias=meta.lora_bias)
        f = factors[name]
        if (tuple(f.A.shape), tuple(f.B.shape)) == (
            tuple(adapter.source.infos[old.A].shape),
            tuple(adapter.source.infos[old.B].shape),
        ) and name not in _changed(meta, adapter):
            out[keys.A], out[keys.B] = adapter.tensor(old.A), adapter.tensor(old.B)
        else:
            out[keys.A], out[keys.B] = f.A.contiguous(), f.B.contiguous()
    for key in adapter.source.infos:
        if key not in replaced:
            out[key] = adapter.tensor(key)
    return out


def _changed(meta: AdapterMetadata, adapter: Adapter) -> set[str]:
    """Modules whose rank, alpha or scaling rule differ from the input's: their factors were rewritten."""
    old = adapter.meta
    return {
        n
        for n, e in meta.modules.items()
        if (e.rank, e.alpha) != (old.modules[n].rank, old.modules[n].alpha) or meta.scaling != old.scaling
    }


# --- the API ---------------------------------------------------------------------------------------------


def export(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    engine: str | None,
    to: str,
    base: str | os.PathLike[str] | None = None,
    max_rank: int | None = None,
    uniform: bool = False,
    config: str | os.PathLike[str] | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
) -> ExportResult:
    """Write ``src`` for ``engine`` as ``to`` ("peft" directory or "gguf" file); see the module docstring."""
    engine = check_engine(engine) if engine is not None else (LLAMA_CPP if to == "gguf" else PEFT)
    if max_rank is not None and max_rank < 1:
        raise UsageError(f"--max-rank must be a positive integer, not {max_rank}")
    with open_adapter(src, config=config, allow_pickle=allow_pickle) as adapter:
        meta = copy.deepcopy(adapter.meta)
        result = ExportResult(
            str(dst), to, "", len(meta.modules), base is not None, adapter.source_format, engine=engine
        )
        if engine == VLLM:
            _refuse(VLLM, vllm_rule.unsupported(meta), adapter.path)
            refused = [(m, "vLLM expects no LoRA here") for m in vllm_rule.refused_targets(meta, None)]
            _refuse(VLLM, refused, adapter.path)
        elif engine == LLAMA_CPP:
            _refuse(LLAMA_CPP, llama_rule.unsupported(meta), adapter.path)
        target = _gguf_target(base, meta) if to == "gguf" else None
        if base is not None and to != "gguf":
            _stamp(meta, adapter, base)
        factors = _load(adapter)
        if max_rank is not None:
            truncate(meta, factors, max_rank, result)
        if to == "gguf":
            assert target is not None
            _write_gguf(meta, factors, target, Path(dst), result, adapter, overwrite)
            result.base_stamped = False  # a GGUF adapter has no place for loraformat's base hashes
            return result
        if uniform:
            make_uniform(meta, factors, result)
        if engine == VLLM:
            rank = max(e.rank for e in meta.modules.values())
            result.max_lora_rank = vllm_rule.round_up_rank(rank)
            if result.max_lora_rank is None:
                raise EngineRefusedError(
                    f"rank {rank} is above vLLM's largest max_lora_rank 512: use --max-rank 512", path=src
                )
        tensors = _tensors(adapter, meta, factors)
    meta.provenance = Provenance(
        method="convert",
        source_format=adapter.source_format,
        details=_details(result, max_rank, uniform),
    )
    meta.created_by = {}
    result.content_hash = write_peft_dir(dst, meta, tensors, overwrite=overwrite)
    return result


def _stamp(meta: AdapterMetadata, adapter: Adapter, base: str | os.PathLike[str]) -> None:
    """As plain convert --base: check every target fits, then record the base identity and hashes."""
    from loraformat.base import base_problems, infer_fan_in_fan_out, stamp
    from loraformat.hashing import hash_base
    from loraformat.io.checkpoint import open_checkpoint

    ck = open_checkpoint(base)
    infer_fan_in_fan_out(meta, ck)
    problems = base_problems(meta, ck)
    if problems:
        _, where, message = problems[0]
        raise BaseMismatchError(f"does not fit base {base}: {where}: {message}", path=adapter.path)
    stamp(meta, ck, hash_base(ck))


def _details(result: ExportResult, max_rank: int | None, uniform: bool) -> dict[str, Any]:
    details: dict[str, Any] = {"for": result.engine}
    if max_rank is not None:
        details.update(max_rank=max_rank, energy_kept=result.energy_kept, truncated=result.truncated)
    if uniform:
        details.update(uniform=True, folded=result.folded, padded=result.padded)
    return details


# --- GGUF ------------------------------------------------------------------------------------------------


def _gguf_target(base: str | os.PathLike[str] | None, meta: AdapterMetadata) -> GgufTarget:
    """The architecture and heads of the base (a Hugging Face directory or a GGUF file); GGUF needs one."""
    if base is None:
        raise UsageError(
            "--to gguf needs --base: the base model directory (config.json) or its GGUF file, for the "
            "architecture, the attention heads and the tensor names"
        )
    p = Path(base)
    if p.suffix == ".gguf":
        from loraformat.io.gguf import read_gguf_target

        return read_gguf_target(p)
    cfg = p / "config.json" if p.is_dir() else p.parent / "config.json"
    if not cfg.is_file():
        raise BaseMismatchError("has no config.json: give the base model directory or its .gguf", path=p)
    try:
        data = json.loads(cfg.read_text("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BaseMismatchError(f"config.json is not valid JSON ({exc})", path=cfg) from None
    target = llama_rule.target_from_hf_config(data, str(p))
    from loraformat.base import base_problems
    from loraformat.io.checkpoint import open_checkpoint

    problems = base_problems(meta, open_checkpoint(p))
    if problems:
        _, where, message = problems[0]
        raise BaseMismatchError(f"does not fit: {where}: {message}", path=p)
    return target


def _write_gguf(
    meta: AdapterMetadata,
    factors: dict[str, Factors],
    target: GgufTarget,
    dst: Path,
    result: ExportResult,
    adapter: Adapter,
    overwrite: bool,
) -> None:
    from loraformat.io.gguf import write_gguf_adapter
    from loraformat.ops.normalize import fold_scale, permute_rows

    alpha, plans, unmapped = llama_rule.plan(meta, target)
    _refuse(
        LLAMA_CPP,
        [(m, f"no llama.cpp tensor for it in architecture {target.arch}") for m in unmapped],
        adapter.path,
    )
    arrays = []
    for p in plans:
        f = factors[p.module]
        B = fold_scale(f.B, p.factor)
        if p.factor != 1.0:
            result.folded.append(p.module)
        if p.permute is not None:
            B = permute_rows(B, *p.permute)
            result.permuted.append(p.module)
        A = f.A.T if p.transpose_a else f.A
        _check_shape(target, p.name, meta.modules[p.module], p.transpose_a, adapter.path)
        arrays += [(p.name + ".lora_a", A.contiguous().numpy()), (p.name + ".lora_b", B.contiguous().numpy())]
    strings = {"general.name": meta.name}
    if meta.content_hash:
        strings["loraformat.source_content_hash"] = meta.content_hash
    result.alpha = alpha
    result.content_hash = write_gguf_adapter(
        dst, arch=target.arch, alpha=alpha, tensors=arrays, strings=strings, overwrite=overwrite
    )


def _check_shape(target: GgufTarget, name: str, entry: Any, transpose_a: bool, path: str) -> None:
    """Against a GGUF base: the base tensor exists with (out, in) = the module's (llama.cpp checks this)."""
    if target.tensor_shapes is None:
        return
    shape = target.tensor_shapes.get(name)
    if shape is None:
        raise BaseMismatchError(f"the GGUF base has no tensor {name} for this adapter", path=target.source)
    want = (entry.in_features, entry.out_features) if transpose_a else (entry.out_features, entry.in_features)
    if tuple(shape) != want:
        raise BaseMismatchError(
            f"GGUF base tensor {name} is {list(shape)}, the adapter needs {list(want)}", path=target.source
        )


def format_export(result: ExportResult) -> str:
    """The human summary of an export: what was written and every exact rewrite or loss it took."""
    lines = [
        f"wrote {result.output} ({result.to} for {result.engine}, {result.modules} modules, "
        f"sha256 {result.content_hash[:16]})"
    ]
    if result.alpha is not None:
        lines.append(f"  alpha {result.alpha:g} for every module")
    for what, names in (
        ("scale folded into lora_B", result.folded),
        ("zero-padded to one rank", result.padded),
        ("q/k rows permuted as llama.cpp's converter", result.permuted),
    ):
        if names:
            lines.append(f"  {what}: {len(names)} modules")
    if result.max_lora_rank is not None:
        lines.append(f"  vLLM needs --max-lora-rank {result.max_lora_rank}")
    if result.truncated:
        lines.append(
            f"  truncated {len(result.truncated)} modules: {result.energy_kept:.4%} of the energy kept "
            f"(worst module {min(t['energy_kept'] for t in result.truncated.values()):.4%})"
        )
    return "\n".join(lines)
