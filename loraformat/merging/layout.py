"""Where each output tensor goes: the output shards (the base's own, or huggingface_hub's plan for
--max-shard-size, a re-quantized weight kept with its fresh scales), their headers with the merge record, and
the byte ranges copied verbatim. Headers only, no tensor data."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraformat import __version__
from loraformat.constants import FORMAT_KEY, FORMAT_VALUE, MERGE_RECORD_KEY
from loraformat.errors import UsageError
from loraformat.io.checkpoint import INDEX_NAME, Checkpoint
from loraformat.io.header import DTYPE_BITS, TensorInfo, encode_header

if TYPE_CHECKING:
    from loraformat.adapter import Adapter
    from loraformat.merging.plan import TensorTask


@dataclass
class OutShard:
    name: str
    header: bytes
    size: int  # total file size
    tensors: list[str]
    metadata: dict[str, str]


@dataclass
class CopyRun:
    """A byte range copied verbatim (coalesced over neighbouring untouched tensors)."""

    src: str
    src_offset: int
    shard: int
    dst_offset: int
    nbytes: int


def base_order(ck: Checkpoint) -> list[tuple[str, TensorInfo, str]]:
    """(name, info, shard path) of every base tensor in file order: the order an untouched output keeps."""
    order = []
    for shard in ck.shards:
        for info in sorted(shard.tensors.values(), key=lambda i: i.start):
            order.append((info.name, info, shard.path))
    return order


def _merge_metadata(adapters: list[Adapter], weights: list[float]) -> str:
    return json.dumps(
        {
            "tool": f"loraformat {__version__}",
            "adapters": [
                {"name": a.meta.name, "content_hash": a.meta.content_hash, "weight": w}
                for a, w in zip(adapters, weights, strict=True)
            ],
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def layout(
    ck: Checkpoint,
    tasks: list[TensorTask],
    max_shard_size: int | str | None,
    out_dtype: str | None,
    adapters: list[Adapter],
    weights: list[float],
) -> tuple[list[OutShard], dict[str, Any] | None]:
    """Shard names and tensor placement: the base's own, or huggingface_hub's plan for --max-shard-size."""
    by_name = {t.name: t for t in tasks}
    if max_shard_size is None:
        groups = [
            (
                Path(s.path).name,
                [n for n, _, p in base_order(ck) if p == s.path and n in by_name],
                dict(s.metadata),
            )
            for s in ck.shards
        ]
        sharded = ck.index is not None
    else:
        from huggingface_hub.serialization import split_state_dict_into_shards_factory

        owner = _side_owners(tasks)
        try:
            split = split_state_dict_into_shards_factory(
                _owners_first(tasks, owner),
                get_storage_size=lambda t: t.out_nbytes,
                get_storage_id=lambda t: owner.get(t.name),  # a re-quantized weight and its scales: one shard
                filename_pattern="model{suffix}.safetensors",
                max_shard_size=max_shard_size,
            )
        except ValueError as exc:
            raise UsageError(f"--max-shard-size: {exc}") from None
        meta0 = dict(ck.shards[0].metadata) if ck.shards else {}
        groups = [(fname, names, dict(meta0)) for fname, names in split.filename_to_tensors.items()]
        sharded = split.is_sharded
    merged_from = _merge_metadata(adapters, weights)
    shards: list[OutShard] = []
    for shard_index, (fname, names, metadata) in enumerate(groups):
        if (
            out_dtype is not None
        ):  # keep tensors aligned after a dtype change: wider dtypes first, as safetensors
            position = {n: k for k, n in enumerate(names)}
            names = sorted(names, key=lambda n: (-DTYPE_BITS[by_name[n].out_dtype], position[n]))
        metadata[FORMAT_KEY] = FORMAT_VALUE
        metadata[MERGE_RECORD_KEY] = merged_from
        header, offsets = encode_header(
            [(n, by_name[n].out_dtype, by_name[n].shape) for n in names], metadata
        )
        for n, (begin, _end) in zip(names, offsets, strict=True):
            by_name[n].shard, by_name[n].offset = shard_index, len(header) + begin
        size = len(header) + (offsets[-1][1] if offsets else 0)
        shards.append(OutShard(fname, header, size, names, metadata))
    index = None
    if sharded:
        extra = dict((ck.index or {}).get("metadata") or {})
        extra["total_size"] = sum(t.out_nbytes for t in tasks)
        index = {"metadata": extra, "weight_map": {n: shards[by_name[n].shard].name for n in sorted(by_name)}}
    names_seen = [s.name for s in shards]
    if len(set(names_seen)) != len(names_seen) or INDEX_NAME in names_seen:
        raise UsageError("the output shard names collide")  # pragma: no cover - defensive
    return shards, index


def _side_owners(tasks: list[TensorTask]) -> dict[str, str]:
    """Re-quantized weight or side tensor (fresh scales, quantization state) -> the weight's name: the merge
    writes the side tensors when it finishes the weight, so a split merge's worker needs them in its shard."""
    owner: dict[str, str] = {}
    for t in tasks:
        if t.quant is not None and t.quant.side:
            owner[t.name] = t.name
            owner.update(dict.fromkeys(t.quant.side.values(), t.name))
    return owner


def _owners_first(tasks: list[TensorTask], owner: dict[str, str]) -> dict[str, TensorTask]:
    """Tasks by name, each side tensor right after its weight: huggingface_hub's planner sizes a group of
    tensors sharing a storage id by its first member, so the weight must come first."""
    sides: dict[str, list[TensorTask]] = {}
    for t in tasks:
        if owner.get(t.name, t.name) != t.name:
            sides.setdefault(owner[t.name], []).append(t)
    ordered: dict[str, TensorTask] = {}
    for t in tasks:
        if owner.get(t.name, t.name) == t.name:
            ordered[t.name] = t
            ordered.update((side.name, side) for side in sides.get(t.name, []))
    return ordered


def copy_runs(tasks: list[TensorTask]) -> list[CopyRun]:
    runs: list[CopyRun] = []
    for t in tasks:
        action = t.action
        if action in ("compute", "side"):
            continue
        src = t.base if action == "copy" else t.replacement_bytes
        assert src is not None
        if src.nbytes == 0:
            continue
        last = runs[-1] if runs else None
        if (
            last is not None
            and last.src == src.path
            and last.shard == t.shard
            and last.src_offset + last.nbytes == src.start
            and last.dst_offset + last.nbytes == t.offset
        ):
            last.nbytes += src.nbytes
        else:
            runs.append(CopyRun(src.path, src.start, t.shard, t.offset, src.nbytes))
    return runs
