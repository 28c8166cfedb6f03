"""``loraformat convert``: any supported adapter layout -> a native file or a PEFT directory."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraformat.adapter import PEFT_CONFIG, PEFT_WEIGHTS, Adapter, open_adapter
from loraformat.base import base_problems, infer_fan_in_fan_out, stamp
from loraformat.errors import BaseMismatchError, UsageError
from loraformat.hashing import hash_base
from loraformat.io.atomic import atomic_dir
from loraformat.io.checkpoint import open_checkpoint
from loraformat.io.native import write_native
from loraformat.io.peft import peft_config_from_metadata
from loraformat.metadata import AdapterMetadata, Provenance

TARGETS = ("loraformat", "peft")


@dataclass
class ConvertResult:
    output: str
    to: str
    content_hash: str
    modules: int
    base_stamped: bool

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def adapter_tensors(adapter: Adapter) -> dict[str, Any]:
    """Every tensor of the adapter, in memory (adapters are small: ranks 4-32 over a few modules)."""
    return {k: adapter.tensor(k) for k in adapter.source.infos}


def write_peft_dir(out: str | os.PathLike[str], meta: AdapterMetadata, tensors: dict[str, Any], *,
                   overwrite: bool = False) -> str:
    """A PEFT adapter directory whose weights file is the native (self-describing) loraformat file."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        content_hash = write_native(tmp / PEFT_WEIGHTS, meta, tensors)
        config = peft_config_from_metadata(meta)
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", "utf-8")
    return content_hash


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str = "loraformat",
    base: str | os.PathLike[str] | None = None,
    name: str | None = None,
    base_id: str | None = None,
    description: str | None = None,
    task: str | None = None,
    license: str | None = None,
    config: str | os.PathLike[str] | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
) -> ConvertResult:
    if to not in TARGETS:
        raise UsageError(f"--to must be one of {', '.join(TARGETS)}, not {to!r}")
    if Path(src).resolve() == Path(dst).resolve():
        raise UsageError("output would overwrite the input; inputs are never modified", path=dst)
    with open_adapter(src, config=config, allow_pickle=allow_pickle) as adapter:
        meta = copy.deepcopy(adapter.meta)
        if adapter.source_format != "loraformat":
            meta.provenance = Provenance(method="convert", source_format=adapter.source_format)
        for attr, value in (("name", name), ("description", description), ("task", task), ("license", license)):
            if value is not None:
                setattr(meta, attr, value)
        if base_id is not None:
            meta.base_model.id = base_id
        if base is not None:
            ck = open_checkpoint(base)
            infer_fan_in_fan_out(meta, ck)
            problems = base_problems(meta, ck)
            if problems:
                code, where, message = problems[0]
                raise BaseMismatchError(f"{where}: {message}", path=src)
            stamp(meta, ck, hash_base(ck), base_id=base_id)
        tensors = adapter_tensors(adapter)
    meta.created_by = {}
    if to == "peft":
        content_hash = write_peft_dir(dst, meta, tensors, overwrite=overwrite)
    else:
        content_hash = write_native(dst, meta, tensors, overwrite=overwrite)
    return ConvertResult(str(dst), to, content_hash, len(meta.modules), base is not None)
