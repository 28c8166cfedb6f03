"""Base checkpoints on disk: one .safetensors file, a directory with model.safetensors, or shards with
model.safetensors.index.json. Headers only; tensors are located, never loaded here."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraformat.errors import HeaderError, InputNotFoundError, PickleRefusedError
from loraformat.io.header import SafetensorsHeader, TensorInfo, read_header
from loraformat.io.untrusted_json import load_json

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
_SKIP_DIRS = {".git", ".cache", "__pycache__", ".huggingface"}


@dataclass
class Checkpoint:
    path: Path  # what the user gave
    root: Path  # the directory holding the shards
    shards: list[SafetensorsHeader]
    index: dict[str, Any] | None = None
    locations: dict[str, tuple[SafetensorsHeader, TensorInfo]] = field(default_factory=dict)
    aux_files: list[Path] = field(default_factory=list)  # every non-weight file, relative to root
    #: weight name -> the shape a LoRA module sees, where it differs from the stored one (packed 4-bit
    #: weights); filled by loraformat.io.quantized.attach
    logical_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: the shard index's file name: transformers' model.safetensors.index.json, or diffusers'
    #: diffusion_pytorch_model.safetensors.index.json (a merge writes its index under the same name)
    index_name: str = INDEX_NAME

    @property
    def total_bytes(self) -> int:
        return sum(s.data_size for s in self.shards)

    def info(self, name: str) -> TensorInfo | None:
        loc = self.locations.get(name)
        return loc[1] if loc else None

    def logical_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape a module targeting ``name`` must have (the stored shape unless quantized packed)."""
        if name in self.logical_shapes:
            return self.logical_shapes[name]
        info = self.info(name)
        return info.shape if info is not None else None

    def shard_of(self, name: str) -> SafetensorsHeader:
        return self.locations[name][0]


CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
MAX_CONFIG_BYTES = 16 << 20  # config files are small; a larger one is not read


def read_config(ck: Checkpoint) -> dict[str, Any] | None:
    """The checkpoint's config.json as a dict, or None when absent, too large or not a JSON object."""
    path = ck.root / CONFIG_NAME
    try:
        if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
            return None
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_model_card(adapter_path: str | os.PathLike[str]) -> str | None:
    """README.md of an adapter directory (or beside an adapter file), or None."""
    p = Path(adapter_path)
    path = (p if p.is_dir() else p.parent) / CARD_NAME
    try:
        if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
            return None
        return path.read_text("utf-8", errors="replace")
    except OSError:
        return None


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError("no such file or directory", path=p)
    index_name = _index_name(p)
    root, files, index = _weight_files(p, index_name)
    shards = [read_header(f) for f in files]
    locations: dict[str, tuple[SafetensorsHeader, TensorInfo]] = {}
    for shard in shards:
        for name, info in shard.tensors.items():
            if name in locations:
                raise HeaderError(f"tensor {name!r} appears in two shards", path=shard.path)
            locations[name] = (shard, info)
    if index is not None:
        for name, shard_name in index["weight_map"].items():
            loc = locations.get(name)
            if loc is None or Path(loc[0].path).name != shard_name:
                raise HeaderError(
                    f"weight_map says {name!r} is in {shard_name} but it is not", path=p / (index_name or "")
                )
    aux = _aux_files(root, files, index_name) if p.is_dir() else []
    return Checkpoint(
        path=p,
        root=root,
        shards=shards,
        index=index,
        locations=locations,
        aux_files=aux,
        index_name=index_name or INDEX_NAME,
    )


def _weight_files(p: Path, index_name: str | None) -> tuple[Path, list[Path], Any]:
    """(root, weight files, parsed index or None) of a .safetensors file, a sharded directory with its index,
    or a directory with one weights file; pickles are refused, shard names must stay inside the directory."""
    index = None
    if p.is_file():
        if p.suffix != ".safetensors":
            if p.suffix in (".bin", ".pt", ".pth", ".ckpt"):
                raise PickleRefusedError(
                    "base is a pickle checkpoint; convert it to safetensors first", path=p
                )
            raise InputNotFoundError("is not a .safetensors file or a model directory", path=p)
        root, files = p.parent, [p]
    elif index_name is not None:
        root = p
        index = load_json((p / index_name).read_bytes(), what="", error=HeaderError, path=p / index_name)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise HeaderError(
                "is not a valid safetensors index (needs a weight_map object)", path=p / index_name
            )
        for n in weight_map.values():
            if not isinstance(n, str) or "/" in n or "\\" in n or n.startswith("."):
                raise HeaderError(
                    f"weight_map names a shard {n!r} outside the directory", path=p / index_name
                )
        names = sorted(set(weight_map.values()))
        files = [p / n for n in names]
    elif (p / SINGLE_NAME).exists():
        root, files = p, [p / SINGLE_NAME]
    else:
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            root, files = p, found
        elif any((p / n).exists() for n in PICKLE_NAMES):
            raise PickleRefusedError("base has only pickle weights; convert it to safetensors first", path=p)
        else:
            raise InputNotFoundError(f"holds no {SINGLE_NAME} or {INDEX_NAME}", path=p)

    return root, files, index


def _aux_files(root: Path, files: list[Path], index_name: str | None) -> list[Path]:
    """Every other file under the directory (config, tokenizer, ...), relative: copied beside a merge's output."""
    aux: list[Path] = []
    weight_files = {f.name for f in files} | {index_name or INDEX_NAME}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".tmp"))
        rel = Path(dirpath).relative_to(root)
        for fn in sorted(filenames):
            if rel == Path(".") and fn in weight_files:
                continue
            if fn.endswith(".safetensors") or fn.startswith(".") or fn in PICKLE_NAMES:
                continue
            aux.append(rel / fn)
    return aux


def _index_name(p: Path) -> str | None:
    """The shard index of a model directory: transformers' name, else the one other ``*.safetensors.index.json``
    (diffusers' components use diffusion_pytorch_model.safetensors.index.json)."""
    if not p.is_dir():
        return None
    if (p / INDEX_NAME).exists():
        return INDEX_NAME
    others = sorted(f.name for f in p.glob("*.safetensors.index.json") if not f.name.startswith("."))
    return others[0] if len(others) == 1 else None


def read_tensor(ck: Checkpoint, name: str) -> torch.Tensor:
    """One tensor of the checkpoint, through safetensors' safe_open, opened for this tensor only.

    A handle kept open keeps every page it has touched mapped into the process, so reading a whole model
    through one handle grows the resident set to the model's size; opening per tensor (a header parse, far
    cheaper than the read) keeps it bounded by the tensor at hand.
    """
    from safetensors import safe_open

    shard = ck.shard_of(name)
    with safe_open(shard.path, framework="pt") as f:
        return f.get_tensor(name)
