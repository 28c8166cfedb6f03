"""Plan a merge from headers alone: check every input, then decide for each base tensor what happens to it and
where its bytes go in the output. No tensor data is read and torch is not imported here, so every refusal
(missing target, wrong shape, structure hash, dtype, conflicting adapters) comes before any work is done.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from loraformat import spec
from loraformat.adapter import Adapter
from loraformat.base import base_problems, infer_fan_in_fan_out
from loraformat.constants import LayerKind
from loraformat.errors import BaseMismatchError, UnsupportedDtypeError, UsageError
from loraformat.io.checkpoint import Checkpoint
from loraformat.io.header import DTYPE_BITS, FLOAT_DTYPES
from loraformat.io.tensors import SafetensorsSource
from loraformat.merging.layout import CopyRun, OutShard, base_order, copy_runs, layout
from loraformat.merging.quantplan import QuantOptions, QuantTask, mark_targeted, quantized_task
from loraformat.metadata import AdapterMetadata
from loraformat.ops.term import Term, needs_whole_tensor
from loraformat.rules import check_not_an_input, first_problem

#: --dtype choices -> safetensors dtype (None: keep each tensor's dtype)
DTYPES: dict[str, str | None] = {
    "keep": None,
    "bf16": "BF16",
    "fp16": "F16",
    "fp32": "F32",
    "bfloat16": "BF16",
    "float16": "F16",
    "float32": "F32",
}
#: safetensors dtype -> the name transformers writes into config.json
_CONFIG_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass(frozen=True)
class Bytes:
    """Where a tensor's raw bytes lie in a file."""

    path: str
    start: int
    nbytes: int
    dtype: str


@dataclass(frozen=True)
class PlannedTerm:
    """One adapter's term for one base tensor, holding tensor keys; loaded when the tensor is merged."""

    adapter: int  # index into Plan.adapters
    module: str
    term: Term[str]


@dataclass
class TensorTask:
    """One output tensor."""

    name: str
    shape: tuple[int, ...]
    src_dtype: str  # dtype of the bytes the merge starts from (the base, or the replacement)
    out_dtype: str
    base: Bytes
    replacement: tuple[int, str] | None = None  # (adapter index, tensor key) of a saved tensor replacing it
    replacement_bytes: Bytes | None = None  # its bytes in the adapter file (None: in memory only)
    terms: list[PlannedTerm] = field(default_factory=list)
    digests: list[tuple[str, str]] = field(default_factory=list)  # (expected hex digest, adapter label)
    shard: int = 0  # index into Plan.shards
    offset: int = 0  # absolute offset in the output shard
    quant: QuantTask | None = None  # a quantized weight, or a QLoRA round trip (merging/quantplan.py)
    side_of: str | None = None  # a scale / quant-state tensor whose new bytes the named weight's codec makes

    @property
    def logical_shape(self) -> tuple[int, ...]:
        """The shape the merge computes in (a packed 4-bit weight's (out, in))."""
        return self.quant.logical_shape if self.quant is not None else self.shape

    @property
    def src_shape(self) -> tuple[int, ...]:
        """The shape of the stored bytes the merge starts from (what the base's digest covers)."""
        return self.quant.stored_shape if self.quant is not None else self.shape

    @property
    def out_nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BITS[self.out_dtype] // 8

    @property
    def whole(self) -> bool:
        """Must be merged in one block: DoRA with per-column channels (Conv1D, embedding) needs column norms
        over every row."""
        return needs_whole_tensor([t.term for t in self.terms]) or (
            self.quant is not None and self.quant.whole
        )

    @property
    def action(self) -> str:
        """copy: raw bytes of the base; copy-replacement: raw bytes of a saved tensor; compute: decode + merge;
        side: bytes produced by another tensor's codec (fresh scales, quant state)."""
        if self.side_of is not None:
            return "side"
        if (
            self.terms
            or self.src_dtype != self.out_dtype
            or (self.quant is not None and self.quant.decode_only)
        ):
            return "compute"
        if self.replacement is not None:
            return "copy-replacement" if self.replacement_bytes is not None else "compute"
        return "copy"


@dataclass
class Plan:
    ck: Checkpoint
    adapters: list[Adapter]
    metas: list[AdapterMetadata]  # per adapter, fan_in_fan_out inferred against this base
    weights: list[float]
    labels: list[str]
    tasks: list[TensorTask]
    shards: list[OutShard]
    copy_runs: list[CopyRun]
    index: dict[str, Any] | None  # the output index.json, when sharded
    aux_files: list[Path]
    out_dtype: str | None
    verify: bool
    unverified_adapters: list[str]
    quant: QuantOptions | None = None
    config_drop: dict[str, None] = field(default_factory=dict)

    @property
    def data_bytes(self) -> int:
        return sum(t.out_nbytes for t in self.tasks)

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    def subset(self, shard_indices: list[int]) -> Plan:
        """The plan of only these output shards (renumbered in order), for one worker of a split merge: the
        same tasks, offsets and headers, so the files it writes are byte for byte those of the whole merge."""
        keep = sorted(set(shard_indices))
        renumber = {old: new for new, old in enumerate(keep)}
        tasks = [replace(t, shard=renumber[t.shard]) for t in self.tasks if t.shard in renumber]
        return replace(
            self,
            tasks=tasks,
            shards=[self.shards[i] for i in keep],
            copy_runs=copy_runs(tasks),
            index=None,
            aux_files=[],
        )

    def config_patch(self) -> dict[str, str | None]:
        """config.json keys to rewrite when --dtype changed the weights' dtype (None: remove the key, as
        quantization_config after --requantize none)."""
        patch: dict[str, str | None] = dict(self.config_drop)
        if self.out_dtype is None:
            return patch
        return {**patch, "torch_dtype": _CONFIG_DTYPE[self.out_dtype], "dtype": _CONFIG_DTYPE[self.out_dtype]}


def resolve_dtype(dtype: str) -> str | None:
    key = dtype.lower()
    if key not in DTYPES:
        raise UsageError(f"--dtype must be one of keep, bf16, fp16, fp32, not {dtype!r}")
    return DTYPES[key]


def check_paths(ck: Checkpoint, adapters: list[Adapter], out: Path) -> None:
    """Inputs are never written: OUT may not be an input, contain one (--overwrite would delete it), or lie
    inside an input directory."""
    inputs: list[str | os.PathLike[str]] = [
        ck.root if ck.path.is_dir() else ck.path,
        *(s.path for s in ck.shards),
        *(a.path for a in adapters),
    ]
    check_not_an_input(out, inputs)


def _terms_for(
    index: int, adapter: Adapter, meta: AdapterMetadata, weight: float, ck: Checkpoint
) -> dict[str, list[PlannedTerm]]:
    out: dict[str, list[PlannedTerm]] = {}
    for module, entry in sorted(meta.modules.items()):
        keys = adapter.keys(module)
        s = spec.scale_for(meta.scaling, entry.rank, entry.alpha) * weight
        term = Term(LayerKind(entry.kind), keys.A, keys.B, s, entry.fan_in_fan_out, keys.magnitude)
        out.setdefault(entry.base_tensor, []).append(PlannedTerm(index, module, term))
        if keys.bias is not None:
            bias_name = (
                entry.base_tensor[: -len(".weight")] + ".bias"
                if entry.base_tensor.endswith(".weight")
                else entry.base_tensor + ".bias"
            )
            info = ck.info(bias_name)
            if info is None or info.shape != (entry.out_features,):
                found = "missing" if info is None else f"{list(info.shape)}"
                raise BaseMismatchError(
                    f"{module}: lora_bias needs a base bias {bias_name!r} of shape "
                    f"[{entry.out_features}] ({found})",
                    path=adapter.path,
                )
            bias = Term(LayerKind.BIAS, None, keys.bias, s)
            out.setdefault(bias_name, []).append(PlannedTerm(index, module, bias))
    return out


def _label(adapter: Adapter, i: int) -> str:
    return f"#{i + 1} {adapter.path}"


@dataclass
class _Gathered:
    """What the adapters of a merge contribute, by base tensor name, before any task exists."""

    labels: list[str]
    metas: list[AdapterMetadata] = field(default_factory=list)
    terms: dict[str, list[PlannedTerm]] = field(default_factory=dict)
    replacements: dict[str, tuple[int, str]] = field(
        default_factory=dict
    )  # base name -> (adapter, saved key)
    digests: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # base name -> (digest, label)
    unverified: list[str] = field(default_factory=list)


def _gather(ck: Checkpoint, adapters: list[Adapter], weights: list[float], verify: bool) -> _Gathered:
    """Check every adapter against the base and collect its terms, replaced tensors and recorded digests."""
    g = _Gathered([_label(a, i) for i, a in enumerate(adapters)])
    for i, (adapter, w) in enumerate(zip(adapters, weights, strict=True)):
        meta = copy.deepcopy(adapter.meta)
        infer_fan_in_fan_out(meta, ck)
        problems = base_problems(meta, ck)
        if problems:
            raise BaseMismatchError(first_problem(problems), path=adapter.path)
        if meta.dora and w != 1.0:
            raise UsageError(
                f"adapter {g.labels[i]} uses DoRA, whose magnitude vector cannot be weighted "
                f"(weight {w:g}); merge it with weight 1"
            )
        g.metas.append(meta)
        for name, specs in _terms_for(i, adapter, meta, w, ck).items():
            g.terms.setdefault(name, []).extend(specs)
        _gather_replacements(g, i, adapter, meta, ck)
        recorded = meta.base_model.target_digests
        if verify:
            if not recorded:
                g.unverified.append(g.labels[i])
            for name, hexdigest in sorted(recorded.items()):
                if ck.info(name) is not None:
                    g.digests.setdefault(name, []).append((hexdigest, g.labels[i]))
    return g


def _gather_replacements(
    g: _Gathered, i: int, adapter: Adapter, meta: AdapterMetadata, ck: Checkpoint
) -> None:
    """The base tensors adapter ``i`` saves whole (modules_to_save): one adapter per tensor, same shape."""
    for key, base_name in sorted(meta.saved_tensors.items()):
        if base_name in g.replacements:
            other = g.replacements[base_name][0]
            raise UsageError(
                f"adapters {g.labels[other]} and {g.labels[i]} both replace base tensor "
                f"{base_name!r}; merge them one at a time"
            )
        info, saved = ck.info(base_name), adapter.source.infos[key]
        assert info is not None  # base_problems checked it
        if saved.shape != info.shape:
            raise BaseMismatchError(
                f"{key}: saved tensor is {list(saved.shape)} but base tensor {base_name!r} "
                f"is {list(info.shape)}",
                path=adapter.path,
            )
        g.replacements[base_name] = (i, key)


def _task(
    name: str, info: Any, path: str, g: _Gathered, adapters: list[Adapter], out_dtype: str | None
) -> TensorTask:
    """The task of one plain (not quantized) base tensor: copied, replaced, or merged from its terms."""
    rep = g.replacements.get(name)
    src_dtype, rep_bytes = info.dtype, None
    if rep is not None:
        adapter = adapters[rep[0]]
        rinfo = adapter.source.infos[rep[1]]
        src_dtype = rinfo.dtype
        if isinstance(adapter.source, SafetensorsSource):
            rep_bytes = Bytes(adapter.source.path, rinfo.start, rinfo.nbytes, rinfo.dtype)
    task_terms = g.terms.get(name, [])
    out = info.dtype if out_dtype is None or info.dtype not in FLOAT_DTYPES else out_dtype
    if task_terms or src_dtype != out:
        for dt, what in ((info.dtype, "base tensor"), (src_dtype, "replacement for")):
            if dt not in FLOAT_DTYPES:
                raise UnsupportedDtypeError(
                    f"{what} {name!r} is {dt}: cannot merge into {dt} weights (quantized or integer "
                    "checkpoints need dequantizing first, or a quantization_config in config.json saying how they are "
                    "scaled); supported: BF16, F16, F32, F64",
                    path=path,
                )
    return TensorTask(
        name=name,
        shape=info.shape,
        src_dtype=src_dtype,
        out_dtype=out,
        base=Bytes(path, info.start, info.nbytes, info.dtype),
        replacement=rep,
        replacement_bytes=rep_bytes,
        terms=task_terms,
        digests=g.digests.get(name, []),
    )


def _tasks(
    ck: Checkpoint, g: _Gathered, adapters: list[Adapter], out_dtype: str | None, quant: QuantOptions | None
) -> list[TensorTask]:
    """One task per base tensor, in the base's order (a quantized weight's side tensors may drop out)."""
    if quant is not None:
        mark_targeted(quant, g.terms)
    tasks: list[TensorTask] = []
    for name, info, path in base_order(ck):
        task_terms = g.terms.get(name, [])
        replaced = name in g.replacements
        special = quantized_task(quant, name, info, task_terms, out_dtype, replaced) if quant else None
        if special is None:
            tasks.append(_task(name, info, path, g, adapters, out_dtype))
        elif not special.drop:
            tasks.append(
                TensorTask(
                    name=name,
                    shape=special.shape,
                    src_dtype=info.dtype,
                    out_dtype=special.out_dtype,
                    base=Bytes(path, info.start, info.nbytes, info.dtype),
                    terms=task_terms,
                    digests=g.digests.get(name, []),
                    quant=special.quant,
                    side_of=special.side_of,
                )
            )
    return tasks


def build_plan(
    ck: Checkpoint,
    adapters: list[Adapter],
    weights: list[float],
    *,
    out_dtype: str | None,
    max_shard_size: int | str | None,
    verify: bool,
    quant: QuantOptions | None = None,
) -> Plan:
    """Everything a merge will do, from headers alone, checked before any data is read."""
    g = _gather(ck, adapters, weights, verify)
    tasks = _tasks(ck, g, adapters, out_dtype, quant)
    shards, index = layout(ck, tasks, max_shard_size, out_dtype, adapters, weights)
    return Plan(
        ck=ck,
        adapters=adapters,
        metas=g.metas,
        weights=weights,
        labels=g.labels,
        tasks=tasks,
        shards=shards,
        copy_runs=copy_runs(tasks),
        index=index,
        aux_files=list(ck.aux_files),
        out_dtype=out_dtype,
        verify=verify,
        unverified_adapters=g.unverified,
        quant=quant,
        config_drop=quant.config_drop() if quant else {},
    )
