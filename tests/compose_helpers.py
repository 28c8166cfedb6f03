"""Oracles for the compose tests: each adapter's delta as PEFT itself sees it, in fp64, read from a PeftModel.

Nothing here uses loraformat's own math: factors and scaling come from PEFT's loaded LoRA layers, so a test that
compares our output with these deltas checks us against PEFT, not against ourselves.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
from pathlib import Path
from typing import Any

import torch

from loraformat.conversion import convert
from tests.fixtures import load_base

PREFIX = "base_model.model."


def peft_deltas(adapter_dir: Path, base: Path, *, model: Any = None) -> dict[str, torch.Tensor]:
    """module path -> fp64 delta ``scaling * B @ A`` (out x in, embeddings dim x num_embeddings, conv kernels
    flattened into the input side) for every LoRA layer PEFT builds from ``adapter_dir``."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    peft_model = PeftModel.from_pretrained(model if model is not None else load_base(base), adapter_dir)
    out: dict[str, torch.Tensor] = {}
    for name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer) or "default" not in layer.scaling:
            continue
        if "default" in layer.lora_A:
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        else:
            A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
        A = A.detach().double().reshape(A.shape[0], -1)
        B = B.detach().double().reshape(B.shape[0], -1)
        out[name.removeprefix(PREFIX)] = layer.scaling["default"] * (B @ A)
    return out


def as_peft_dir(adapter: Path, tmp: Path) -> Path:
    """A PEFT directory for any adapter we wrote (native file -> adapter_config.json + weights)."""
    out = tmp / f"{adapter.stem}-peft"
    if out.exists():
        shutil.rmtree(out)
    convert(adapter, out, to="peft")
    return out


def weighted_sum(deltas: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i delta_i per module; a module an adapter lacks contributes zero."""
    out: dict[str, torch.Tensor] = {}
    for d, w in zip(deltas, weights, strict=True):
        for module, delta in d.items():
            out[module] = out.get(module, torch.zeros_like(delta)) + w * delta
    return out


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300))


def listing(directory: Path) -> list[str]:
    """Every entry of a directory, hidden temporaries included (to prove nothing was left behind)."""
    return sorted(p.name for p in directory.iterdir())


VARIANTS = ["plain", "rslora", "patterns"]  # ranks 8 / 8 rsLoRA / 2-4-8 with per-module alphas


def parents(peft_adapters, names=VARIANTS) -> list[Path]:
    return [peft_adapters[n] for n in names]


def data_hash(path: Path) -> str:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return hashlib.sha256(raw[8 + n :]).hexdigest()
