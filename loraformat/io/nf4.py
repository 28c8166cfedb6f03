"""bitsandbytes 4-bit checkpoints as transformers saves them (spec/interop/nf4.md): find each packed weight and
its quant_state companions, read the small state tensors, and write a re-quantized state back in the same
layout. No quantization math here (loraformat/ops/nf4.py).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from loraformat.errors import UnsupportedQuantizationError
from loraformat.io.checkpoint import Checkpoint
from loraformat.io.fp8 import read_array

STATE_SUFFIX = ".quant_state.bitsandbytes__"
#: companion tensor roles beside ``<m>.weight``, as bitsandbytes' QuantState.as_dict(packed=True) names them
ROLES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_TORCH_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Nf4Weight:
    """One packed 4-bit weight and everything its dequantization needs, located in the checkpoint."""

    name: str
    quant_type: str  # nf4 | fp4
    block_size: int
    shape: tuple[int, ...]  # the logical weight shape
    dtype: str  # torch dtype name the weight dequantizes to
    companions: dict[str, str]  # role -> tensor name
    state_name: str
    state: dict[str, Any]  # the decoded JSON of the state tensor

    @property
    def double_quant(self) -> bool:
        return "nested_absmax" in self.companions

    @property
    def tensor_names(self) -> list[str]:
        return [self.name, *self.companions.values(), self.state_name]


def _refuse(message: str, path: str | os.PathLike[str] | None = None) -> UnsupportedQuantizationError:
    return UnsupportedQuantizationError(f"bitsandbytes 4-bit base: {message}", path=path)


def _state(ck: Checkpoint, state_name: str) -> dict[str, Any]:
    shard, info = ck.locations[state_name]
    if info.dtype != "U8" or len(info.shape) != 1 or info.nbytes > 1 << 16:
        raise _refuse(f"{state_name!r} is not a small U8 JSON tensor", shard.path)
    try:
        state = json.loads(read_array(shard.path, info, np.uint8).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _refuse(f"{state_name!r} does not hold JSON", shard.path) from None
    if not isinstance(state, dict):
        raise _refuse(f"{state_name!r} is not a JSON object", shard.path)
    return state


def _expect(ck: Checkpoint, name: str, dtype: str, shape: tuple[int, ...], what: str) -> None:
    info = ck.info(name)
    if info is None:
        raise _refuse(f"{what} {name!r} is missing", ck.path)
    if info.dtype != dtype or info.shape != shape:
        raise _refuse(
            f"{what} {name!r} is {info.dtype} {list(info.shape)}, expected {dtype} {list(shape)}",
            ck.shard_of(name).path,
        )


def _weight(ck: Checkpoint, state_name: str) -> Nf4Weight:
    name, quant_type = state_name.split(STATE_SUFFIX)
    state = _state(ck, state_name)
    try:
        shape = tuple(int(d) for d in state["shape"])
        block = int(state["blocksize"])
        dtype = str(state["dtype"])
    except (KeyError, TypeError, ValueError):
        raise _refuse(f"{state_name!r} lacks shape, blocksize or dtype", ck.path) from None
    if (
        state.get("quant_type") != quant_type
        or quant_type not in ("nf4", "fp4")
        or dtype not in _TORCH_DTYPES
    ):
        raise _refuse(f"{state_name!r}: quant type {state.get('quant_type')!r}, dtype {dtype!r}", ck.path)
    numel = math.prod(shape)
    blocks = -(numel // -block)
    _expect(ck, name, "U8", ((numel + 1) // 2, 1), "packed weight")
    companions = {r: f"{name}.{r}" for r in ROLES if ck.info(f"{name}.{r}") is not None}
    _expect(ck, companions.get("quant_map", f"{name}.quant_map"), "F32", (16,), "quant map")
    nested = "nested_absmax" in companions or "nested_offset" in state
    if nested:
        nblock = int(state.get("nested_blocksize", 256))
        _expect(ck, f"{name}.absmax", "U8", (blocks,), "double-quantized absmax")
        _expect(ck, f"{name}.nested_absmax", "F32", (-(blocks // -nblock),), "nested absmax")
        _expect(ck, f"{name}.nested_quant_map", "F32", (256,), "nested quant map")
        if not isinstance(state.get("nested_offset"), (int, float)):
            raise _refuse(f"{state_name!r} has no numeric nested_offset", ck.path)
    else:
        _expect(ck, f"{name}.absmax", "F32", (blocks,), "absmax")
    return Nf4Weight(name, quant_type, block, shape, dtype, companions, state_name, state)


def detect_nf4(ck: Checkpoint) -> dict[str, Nf4Weight]:
    """Every packed 4-bit weight of the checkpoint, by weight name; refuses an incomplete or contradicting one."""
    found = {}
    for state_name in sorted(n for n in ck.locations if STATE_SUFFIX in n):
        w = _weight(ck, state_name)
        found[w.name] = w
    if not found:
        raise _refuse("config.json says bitsandbytes 4-bit but no tensor has a quant_state", ck.path)
    return found


def read_state_arrays(ck: Checkpoint, w: Nf4Weight) -> dict[str, np.ndarray]:
    """The companion tensors (absmax, maps, nested absmax) as numpy arrays."""
    out = {}
    for role, name in w.companions.items():
        shard, info = ck.locations[name]
        out[role] = read_array(shard.path, info, np.uint8 if info.dtype == "U8" else np.float32)
    return out


def state_json_bytes(w: Nf4Weight, nested_offset: float | None, stored_nbytes: int) -> bytes:
    """The state tensor rewritten with a new nested_offset (the exact value of its fp32), compact and
    space-padded to its stored length so that the output keeps the base's layout (bitsandbytes parses it with
    json.loads, which ignores the trailing spaces)."""
    state = dict(w.state)
    if nested_offset is not None:
        state["nested_offset"] = float(np.float32(nested_offset))
    data = json.dumps(state, separators=(",", ":")).encode("utf-8")
    if len(data) > stored_nbytes:
        raise _refuse(f"the re-quantized state of {w.name!r} does not fit its stored {stored_nbytes} bytes")
    return data + b" " * (stored_nbytes - len(data))
