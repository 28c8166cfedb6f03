"""FP8 base checkpoints (spec/interop/fp8.md): find each F8_E4M3 weight and its scale tensor from config.json's
``quantization_config`` and the headers, and check that the tensors agree with the config before a merge reads
anything else. Reads only headers and the (small) scale tensors; the math lives in loraformat/ops/fp8.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from loraformat.errors import UnsupportedQuantizationError
from loraformat.io.checkpoint import Checkpoint
from loraformat.io.header import TensorInfo
from loraformat.metadata import BaseQuantization
from loraformat.ops.fp8 import SCALE_DTYPES, Fp8Layout, scale_problem, scale_values, stored_scales
from loraformat.quantization import fp8_block

FP8_DTYPE = "F8_E4M3"
BLOCK_SCALE_SUFFIX = "weight_scale_inv"  # transformers' fp8 / DeepSeek-V3: W = q * scale_inv
CT_SCALE_SUFFIX = "weight_scale"  # compressed-tensors: W = q * scale


@dataclass(frozen=True)
class Fp8Weight:
    """One FP8 weight of the base and its scale tensor."""

    name: str
    scale_name: str
    layout: Fp8Layout
    shape: tuple[int, int]


@dataclass
class Fp8Base:
    quant: BaseQuantization
    weights: dict[str, Fp8Weight]  # by weight name

    @property
    def scale_names(self) -> dict[str, str]:
        """scale tensor name -> its weight's name."""
        return {w.scale_name: w.name for w in self.weights.values()}


def read_array(path: str, info: TensorInfo, dtype: Any) -> np.ndarray:
    """A small tensor's stored values as a numpy array (scales and bitsandbytes state: kilobytes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, info.nbytes, info.start)
    finally:
        os.close(fd)
    return np.frombuffer(data, dtype=dtype).reshape(info.shape)


def _refuse(message: str, path: str | os.PathLike[str] | None = None) -> UnsupportedQuantizationError:
    return UnsupportedQuantizationError(f"FP8 base: {message}", path=path)


def detect_fp8(ck: Checkpoint, quant: BaseQuantization, quant_method: str) -> Fp8Base:
    """Pair every F8_E4M3 weight with its scale and check both against the config (spec/interop/fp8.md)."""
    suffix = BLOCK_SCALE_SUFFIX if quant_method == "fp8" else CT_SCALE_SUFFIX
    block = fp8_block(quant) if quant.scale_layout == "block" else (128, 128)
    weights: dict[str, Fp8Weight] = {}
    for name, (shard, info) in sorted(ck.locations.items()):
        if info.dtype == "F8_E5M2":
            raise _refuse(f"{name!r} is F8_E5M2; only E4M3 weights can be merged", shard.path)
        if name.endswith("." + suffix):
            weight = ck.info(name[: -len(suffix)] + "weight")
            if weight is None or weight.dtype != FP8_DTYPE:
                raise _refuse(f"scale {name!r} belongs to no F8_E4M3 weight", shard.path)
        if info.dtype != FP8_DTYPE:
            continue
        if len(info.shape) != 2:
            raise _refuse(f"{name!r} is {list(info.shape)}; FP8 weights are 2-D (out, in)", shard.path)
        scale_name = (name[: -len("weight")] if name.endswith(".weight") else name + ".") + suffix
        scale = ck.info(scale_name)
        if scale is None:
            raise _refuse(f"{name!r} has no scale tensor {scale_name!r}", shard.path)
        if scale.dtype not in SCALE_DTYPES:
            raise _refuse(f"scale {scale_name!r} is {scale.dtype}, not F32, BF16 or F16", shard.path)
        layout = Fp8Layout(str(quant.scale_layout), block, scale.dtype)
        rows, cols = info.shape
        if not layout.accepts(scale.shape, rows, cols):
            raise _refuse(
                f"scale {scale_name!r} is {list(scale.shape)} but {quant.scale_layout} scales of a "
                f"{rows}x{cols} weight are {list(layout.scale_shape(rows, cols))} (the config says "
                f"{quant.scale_layout}{' ' + 'x'.join(map(str, block)) if quant.scale_layout == 'block' else ''})",
                shard.path,
            )
        weights[name] = Fp8Weight(name, scale_name, layout, (rows, cols))
    if not weights:
        raise _refuse("config.json says FP8 but no tensor is F8_E4M3", ck.path)
    return Fp8Base(quant, weights)


def load_scale(ck: Checkpoint, w: Fp8Weight) -> np.ndarray:
    """The weight's scales as fp32, refusing NaN, infinite, zero or negative values."""
    shard, info = ck.locations[w.scale_name]
    values = scale_values(read_array(shard.path, info, SCALE_DTYPES[info.dtype]), info.dtype)
    problem = scale_problem(values)
    if problem:
        raise _refuse(f"scale {w.scale_name!r} {problem}", shard.path)
    return values


def scale_bytes(scale: np.ndarray, w: Fp8Weight) -> bytes:
    """Fresh scales in the stored dtype (and shape: per-tensor and per-channel keep [1]/[] and [out]/[out, 1])."""
    return np.ascontiguousarray(stored_scales(scale, w.layout.scale_dtype)).tobytes()
