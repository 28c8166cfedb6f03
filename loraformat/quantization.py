"""``base_model.quantization`` (spec/v1.md §8.1): what it is read from, and when it is consistent.

Three sources, in the order ``convert`` applies them (a later one wins): a PEFT adapter's model card (PEFT wrote
the bitsandbytes config it trained with under "Training procedure"), the base's config.json
``quantization_config`` (a checkpoint saved quantized: bitsandbytes, transformers' ``fp8``, compressed-tensors),
and ``--base-quantization`` given by hand. Pure functions of already-read text and dicts: no I/O here.
"""

from __future__ import annotations

import re
from typing import Any

from loraformat.constants import COMPUTE_DTYPES, FP8_SCALE_LAYOUTS, QUANT_4BIT, QUANT_METHODS, QuantMethod
from loraformat.errors import UnsupportedQuantizationError, UsageError
from loraformat.metadata import BaseQuantization

BNB_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
}
CARD_PREFIX = "The following `bitsandbytes` quantization config was used during training:"


def _dtype(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).removeprefix("torch.").lower()
    return _DTYPE_ALIASES.get(text, text)


def _truthy(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


def from_bnb_config(qc: dict[str, Any], source: str) -> BaseQuantization | None:
    """transformers' BitsAndBytesConfig as saved in config.json (or listed in a PEFT card); None when neither
    4-bit nor 8-bit loading is on."""
    if _truthy(qc.get("load_in_4bit")) or _truthy(qc.get("_load_in_4bit")):
        quant_type = str(qc.get("bnb_4bit_quant_type") or "fp4").lower()
        method = {"nf4": QuantMethod.BNB_NF4.value, "fp4": QuantMethod.BNB_FP4.value}.get(quant_type)
        if method is None:
            raise UnsupportedQuantizationError(
                f"bitsandbytes 4-bit quant type {quant_type!r} is not nf4 or fp4"
            )
        block = qc.get("bnb_4bit_blocksize", 64)  # transformers always quantizes in blocks of 64
        return BaseQuantization(
            method=method,
            block_size=int(block) if block not in (None, "None") else 64,
            double_quant=_truthy(qc.get("bnb_4bit_use_double_quant", False)),
            compute_dtype=_dtype(qc.get("bnb_4bit_compute_dtype")) or "float32",
            source=source,
        )
    if _truthy(qc.get("load_in_8bit")) or _truthy(qc.get("_load_in_8bit")):
        return BaseQuantization(method=QuantMethod.BNB_INT8.value, source=source)
    return None


def _ct_weights(qc: dict[str, Any]) -> dict[str, Any]:
    groups = qc.get("config_groups") or {}
    schemes = [g.get("weights") or {} for g in groups.values() if isinstance(g, dict)]
    if not schemes or not all(isinstance(s, dict) for s in schemes):
        raise UnsupportedQuantizationError("compressed-tensors config has no weight quantization scheme")
    first = schemes[0]
    if any(s != first for s in schemes[1:]):
        raise UnsupportedQuantizationError("compressed-tensors config mixes several weight schemes")
    return first


def from_compressed_tensors(qc: dict[str, Any], source: str) -> BaseQuantization:
    """Only 8-bit float weights ("float-quantized"); int4/int8 (GPTQ-like pack-quantized) are refused."""
    fmt = qc.get("format")
    w = _ct_weights(qc)
    if (
        fmt not in ("float-quantized", "naive-quantized")
        or w.get("type") != "float"
        or w.get("num_bits") != 8
    ):
        raise UnsupportedQuantizationError(
            f"compressed-tensors format {fmt!r} with {w.get('num_bits')}-bit {w.get('type')} weights "
            "(only float-quantized FP8 weights can be merged)"
        )
    if not w.get("symmetric", True) or w.get("dynamic"):
        raise UnsupportedQuantizationError("compressed-tensors FP8 weights must be static and symmetric")
    strategy = w.get("strategy")
    if strategy not in FP8_SCALE_LAYOUTS:
        raise UnsupportedQuantizationError(
            f"compressed-tensors FP8 strategy {strategy!r} (tensor, channel, block)"
        )
    block = w.get("block_structure") if strategy == "block" else None
    return BaseQuantization(
        method=QuantMethod.FP8_E4M3.value,
        scale_layout=strategy,
        block_size=[int(b) for b in block] if block else None,
        source=source,
    )


def from_quantization_config(qc: Any, source: str = "config") -> BaseQuantization | None:
    """config.json ``quantization_config`` -> the recorded form; refuses what loraformat cannot merge (GPTQ, AWQ,
    int4 formats) and what it does not know, naming the method."""
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise UnsupportedQuantizationError("quantization_config is not an object")
    method = str(qc.get("quant_method", "")).lower()
    if method == "bitsandbytes":
        return from_bnb_config(qc, source)
    if method == "fp8":
        fmt = str(qc.get("fmt", "e4m3")).lower()
        if fmt != "e4m3":
            raise UnsupportedQuantizationError(f"fp8 format {fmt!r} (only e4m3 can be merged)")
        block = qc.get("weight_block_size")
        if block is not None and (not isinstance(block, list) or len(block) != 2):
            raise UnsupportedQuantizationError(f"fp8 weight_block_size {block!r} is not [rows, cols]")
        return BaseQuantization(
            method=QuantMethod.FP8_E4M3.value,
            scale_layout="block" if block else "tensor",
            block_size=[int(b) for b in block] if block else None,
            source=source,
        )
    if method == "compressed-tensors":
        return from_compressed_tensors(qc, source)
    raise UnsupportedQuantizationError(
        f"quantization method {method or '(none)'!r} is not supported (supported: bitsandbytes nf4/fp4, "
        "fp8 e4m3 with tensor, channel or block scales, compressed-tensors float-quantized)"
    )


def from_peft_card(text: str) -> BaseQuantization | None:
    """The ``- key: value`` lines PEFT wrote under its bitsandbytes training note in README.md."""
    if CARD_PREFIX not in text:
        return None
    config: dict[str, Any] = {}
    for line in text.split(CARD_PREFIX, 1)[1].splitlines()[1:]:
        m = re.match(r"^\s*-\s*([A-Za-z0-9_]+):\s*(.*?)\s*$", line)
        if m is None:
            if config:
                break
            continue
        config[m.group(1)] = m.group(2)
    return from_bnb_config(config, "peft-card") if config else None


def parse_user_spec(text: str) -> BaseQuantization | None:
    """``--base-quantization``: ``none``, or ``METHOD[,key=value...]`` with keys block_size (``64`` or
    ``128x128``), double_quant, compute_dtype, scale_layout; e.g. ``bnb-nf4,block_size=64,double_quant=true``."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise UsageError("--base-quantization is empty (give e.g. bnb-nf4 or none)")
    if parts[0].lower() == "none" and len(parts) == 1:
        return None
    q = BaseQuantization(method=parts[0].lower(), source="user")
    if q.method in QUANT_4BIT:
        q.block_size, q.double_quant = 64, False
    for item in parts[1:]:
        key, sep, value = item.partition("=")
        key, value = key.strip().replace("-", "_"), value.strip()
        if not sep or not value:
            raise UsageError(f"--base-quantization: {item!r} is not key=value")
        if key == "block_size":
            sizes = [v for v in re.split(r"[x*]", value) if v]
            if not all(v.isdigit() for v in sizes) or len(sizes) not in (1, 2):
                raise UsageError(f"--base-quantization: block_size {value!r} is not N or RxC")
            q.block_size = int(sizes[0]) if len(sizes) == 1 else [int(v) for v in sizes]
        elif key == "double_quant":
            q.double_quant = _truthy(value)
        elif key == "compute_dtype":
            q.compute_dtype = _dtype(value)
        elif key == "scale_layout":
            q.scale_layout = value.lower()
        else:
            raise UsageError(f"--base-quantization: unknown key {key!r}")
    if q.method == QuantMethod.FP8_E4M3.value and q.scale_layout is None:
        q.scale_layout = "block" if isinstance(q.block_size, list) else "tensor"
    found = problems(q)
    if found:
        raise UsageError(f"--base-quantization: {found[0][1]}")
    return q


def problems(q: BaseQuantization) -> list[tuple[str, str]]:
    """(location, message) for each inconsistency; an unknown method is reported with location ``method``."""
    out: list[tuple[str, str]] = []
    where = "base_model.quantization"
    if q.method not in QUANT_METHODS:
        return [(f"{where}.method", f"unknown quantization method {q.method!r}")]
    if q.compute_dtype is not None and q.compute_dtype not in COMPUTE_DTYPES:
        out.append(
            (
                f"{where}.compute_dtype",
                f"compute dtype {q.compute_dtype!r} is not one of bfloat16, float16, float32",
            )
        )
    if q.method in QUANT_4BIT:
        if not isinstance(q.block_size, int) or q.block_size not in BNB_BLOCK_SIZES:
            out.append(
                (
                    f"{where}.block_size",
                    f"bitsandbytes 4-bit block size {q.block_size!r} is not one of {BNB_BLOCK_SIZES}",
                )
            )
        if q.scale_layout is not None:
            out.append((f"{where}.scale_layout", f"{q.method} has no scale_layout (it is for fp8)"))
    elif q.method.startswith("fp8-"):
        if q.scale_layout not in FP8_SCALE_LAYOUTS:
            out.append(
                (
                    f"{where}.scale_layout",
                    f"fp8 needs scale_layout tensor, channel or block, not {q.scale_layout!r}",
                )
            )
        block = q.block_size
        is_pair = (
            isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)
        )
        if (q.scale_layout == "block") != is_pair:
            out.append(
                (
                    f"{where}.block_size",
                    "fp8 block_size must be [rows, cols] exactly when scale_layout is block",
                )
            )
        if q.double_quant:
            out.append((f"{where}.double_quant", "double quantization exists only for bitsandbytes 4-bit"))
    elif q.block_size is not None or q.double_quant:
        out.append((where, f"{q.method} takes no block_size or double_quant"))
    return out


def fp8_block(q: BaseQuantization) -> tuple[int, int]:
    block = q.block_size if isinstance(q.block_size, list) else [128, 128]
    return int(block[0]), int(block[1])


def same_quantization(a: BaseQuantization, b: BaseQuantization) -> bool:
    """Whether two records describe the same quantization (the source does not matter)."""
    keys = ("method", "block_size", "double_quant", "scale_layout")
    return all(getattr(a, k) == getattr(b, k) for k in keys)
