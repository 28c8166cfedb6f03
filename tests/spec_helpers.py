"""Builders for native loraformat files used by the validate / inspect / spec tests: small hand-made adapters
and rewritten copies of real converted ones with one thing broken."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loraformat.adapter import parse_native_metadata
from loraformat.constants import METADATA_KEY, PEFT_PREFIX
from loraformat.io.header import read_header
from loraformat.io.native import write_native
from loraformat.metadata import AdapterMetadata, ModuleEntry


def one_module_adapter(
    path: Path,
    *,
    out_features: int = 512,
    in_features: int = 64,
    rank: int = 8,
    alpha: float = 16,
    zero_b: bool = False,
    seed: int = 0,
) -> Path:
    """A native adapter over one linear weight (out x in): the spec's worked example by default."""
    import torch

    g = torch.Generator().manual_seed(seed)
    module = "model.layers.0.mlp.up_proj"
    meta = AdapterMetadata(
        modules={module: ModuleEntry("linear", rank, alpha, in_features, out_features, f"{module}.weight")},
        name="worked-example",
    )
    b = torch.zeros(out_features, rank) if zero_b else torch.randn(out_features, rank, generator=g)
    tensors = {
        f"{PEFT_PREFIX}{module}.lora_A.weight": torch.randn(rank, in_features, generator=g),
        f"{PEFT_PREFIX}{module}.lora_B.weight": b,
    }
    write_native(path, meta, tensors)
    return path


def load_native(path: Path) -> tuple[AdapterMetadata, dict[str, Any]]:
    from safetensors.torch import load_file

    meta = parse_native_metadata(read_header(path).metadata, path=str(path))
    return meta, load_file(str(path))


def rewrite(
    src: Path,
    dst: Path,
    *,
    meta: Callable[[AdapterMetadata], None] | None = None,
    tensors: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Copy a native adapter through write_native after editing its metadata and/or tensors in place."""
    m, t = load_native(src)
    m = copy.deepcopy(m)
    if meta:
        meta(m)
    if tensors:
        tensors(t)
    write_native(dst, m, t, check=False)  # broken on purpose: bypass the writer's own checks
    return dst


def document(path: Path) -> dict[str, Any]:
    return json.loads(read_header(path).metadata[METADATA_KEY])
