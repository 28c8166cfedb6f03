"""What a merge does with each tensor of a quantized base, or with a QLoRA-trained adapter's 16-bit targets, decided
from headers (and the small state tensors io/ already read) before any work starts:

- an FP8 or bitsandbytes 4-bit weight with terms is decoded, merged and re-encoded (``--requantize keep``) with
  its scales / quant state rewritten from the codec (``side`` tasks), or written 16-bit (``--requantize none``,
  scales and state dropped, config.json's quantization_config removed); untargeted quantized weights and their
  side tensors are copied byte for byte (or decoded, with ``none``);
- a 16-bit weight with terms under ``--dequantize-as nf4|fp4`` is decoded as dequant(quant(W)) (QLoRA-faithful).

spec/interop/fp8.md and spec/interop/nf4.md give the rules; tests/test_merge_quantized.py checks them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from loraformat.constants import QUANT_4BIT, QuantMethod, StoredLayout
from loraformat.errors import UnsupportedQuantizationError, UsageError
from loraformat.io.header import FLOAT_DTYPES, TensorInfo
from loraformat.io.quantized import QuantizedBase
from loraformat.metadata import AdapterMetadata, BaseQuantization
from loraformat.ops.codec_quant import Bnb4Spec

REQUANTIZE_CHOICES = ("keep", "none")
DEQUANTIZE_CHOICES = ("auto", "nf4", "fp4", "none")
#: compressed-tensors' static activation parameters beside FP8 weights, meaningless in a 16-bit output
FP8_ACTIVATION_SUFFIXES = (".input_scale", ".input_zero_point", ".weight_zero_point")
_ST_OF_TORCH = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass(frozen=True)
class QuantTask:
    """How one weight is decoded and encoded: its stored layout, and whether it is written back quantized."""

    layout: StoredLayout  # FP8 / BNB4 (stored quantized), or DENSE for a QLoRA round trip
    logical_shape: tuple[int, ...]
    stored_shape: tuple[int, ...]
    requantize: bool  # write the quantized layout back (else 16-bit)
    whole: bool  # decoded and encoded in one block
    row_group: int = 1  # rows sharing scales: blocks are whole multiples of it
    streamed: bool = False  # whole, but merged in sub-blocks of row groups once the decoder is prepared
    side: dict[str, str] = field(default_factory=dict)  # codec side role -> output tensor name
    info: Any = None  # io.fp8.Fp8Weight / io.nf4.Nf4Weight
    spec: Bnb4Spec | None = None  # the 4-bit quantization (stored, or QLoRA's round trip)

    @property
    def decode_only(self) -> bool:
        """A quantized weight without terms written 16-bit still has to be decoded."""
        return self.layout != StoredLayout.DENSE and not self.requantize


@dataclass(frozen=True)
class Special:
    """The plan's decision for one base tensor."""

    shape: tuple[int, ...] = ()
    out_dtype: str = ""
    quant: QuantTask | None = None
    side_of: str | None = None
    drop: bool = False


@dataclass
class QuantOptions:
    base: QuantizedBase | None  # the base's quantized layout, or None for a 16-bit base
    requantize: bool = True
    roundtrip: Bnb4Spec | None = None  # --dequantize-as for a 16-bit base
    side_owner: dict[str, tuple[str, str]] = field(default_factory=dict)  # side tensor -> (weight, role)
    targeted: set[str] = field(default_factory=set)  # quantized weights that receive terms

    def config_drop(self) -> dict[str, None]:
        return {"quantization_config": None} if self.base is not None and not self.requantize else {}

    def describe(self) -> dict[str, Any]:
        q = self.base.quant if self.base is not None else None
        return {
            "base": q.to_dict() if q is not None else None,
            "requantize": ("keep" if self.requantize else "none") if self.base is not None else None,
            "dequantize_as": self.roundtrip.quant_type if self.roundtrip is not None else "none",
        }


def _fp8_task(opts: QuantOptions, name: str, info: TensorInfo, targeted: bool) -> QuantTask:
    assert opts.base is not None and opts.base.fp8 is not None
    w = opts.base.fp8.weights[name]
    kind = w.layout.kind
    return QuantTask(
        StoredLayout.FP8,
        info.shape,
        info.shape,
        opts.requantize,
        whole=kind == "tensor",
        row_group=w.layout.row_group,
        side={"scale": w.scale_name} if opts.requantize and targeted else {},
        info=w,
    )


def _bnb4_task(opts: QuantOptions, name: str, info: TensorInfo, targeted: bool) -> QuantTask:
    assert opts.base is not None
    w = opts.base.nf4[name]
    if w.shape[-1] % 2 or len(w.shape) != 2:
        raise UnsupportedQuantizationError(
            f"4-bit weight {name!r} of shape {list(w.shape)} is not (out, even in)"
        )
    side: dict[str, str] = {}
    if opts.requantize and targeted:
        side = {r: w.companions[r] for r in ("absmax", "nested_absmax") if r in w.companions}
        side["state"] = w.state_name
    spec = Bnb4Spec(w.quant_type, w.block_size, w.double_quant, w.dtype)
    return QuantTask(
        StoredLayout.BNB4, w.shape, info.shape, opts.requantize, whole=True, side=side, info=w, spec=spec
    )


def quantized_task(
    opts: QuantOptions, name: str, info: TensorInfo, terms: list[Any], out_dtype: str | None, replaced: bool
) -> Special | None:
    """The decision for ``name``, or None when it is an ordinary tensor for the usual rules."""
    quantized_target = bool(terms) and (opts.roundtrip is not None or opts.base is not None)
    if quantized_target and any(t.term.magnitude is not None for t in terms):
        raise UnsupportedQuantizationError(
            f"{name!r}: DoRA adapters cannot be merged into a quantized base or a QLoRA round trip (DoRA "
            "renormalises whole rows of the merged weight, which the quantized codecs do not do); merge into the "
            "16-bit base with --dequantize-as none"
        )
    base = opts.base
    if base is not None:
        weights = base.fp8.weights if base.fp8 is not None else base.nf4
        if name in weights:
            if replaced:
                raise UnsupportedQuantizationError(f"an adapter replaces the quantized weight {name!r}")
            targeted = bool(terms)
            make = _fp8_task if base.fp8 is not None else _bnb4_task
            task = make(opts, name, info, targeted)
            if opts.requantize:
                if not targeted:
                    return None  # raw copy, as its side tensors
                return Special(info.shape, info.dtype, task)
            dense = out_dtype or (_ST_OF_TORCH[task.spec.dtype] if task.spec is not None else "BF16")
            return Special(task.logical_shape, dense, task)
        if base.fp8 is not None and not opts.requantize and name.endswith(FP8_ACTIVATION_SUFFIXES):
            return Special(drop=True)  # a 16-bit checkpoint has no activation quantization parameters
        owner = opts.side_owner.get(name)
        if owner is not None:
            weight, _role = owner
            if not opts.requantize:
                return Special(drop=True)
            if weight in opts.targeted:
                return Special(info.shape, info.dtype, side_of=weight)
            return None
    if opts.roundtrip is not None and terms and info.dtype in FLOAT_DTYPES and len(info.shape) == 2:
        spec = Bnb4Spec(
            opts.roundtrip.quant_type,
            opts.roundtrip.block_size,
            opts.roundtrip.double_quant,
            {v: k for k, v in _ST_OF_TORCH.items()}.get(info.dtype, "float32"),
        )
        group = spec.block_size // math.gcd(info.shape[1], spec.block_size)  # rows of whole 4-bit blocks
        task = QuantTask(
            StoredLayout.DENSE,
            info.shape,
            info.shape,
            False,
            whole=True,
            row_group=group,
            streamed=True,
            spec=spec,
        )
        return Special(info.shape, out_dtype or info.dtype, task)
    return None


def side_owners(base: QuantizedBase) -> dict[str, tuple[str, str]]:
    """Every side tensor -> (its weight, its role)."""
    out: dict[str, tuple[str, str]] = {}
    if base.fp8 is not None:
        for w in base.fp8.weights.values():
            out[w.scale_name] = (w.name, "scale")
        return out
    for nw in base.nf4.values():
        for role, comp in nw.companions.items():
            out[comp] = (nw.name, role)
        out[nw.state_name] = (nw.name, "state")
    return out


def recorded_4bit(metas: list[AdapterMetadata]) -> BaseQuantization | None:
    """The bitsandbytes 4-bit training base the adapters record (the same one, or a usage error)."""
    found = [m.base_model.quantization for m in metas if m.base_model.quantization is not None]
    four = [q for q in found if q.method in QUANT_4BIT]
    if not four:
        return None
    first = four[0]
    for q in four[1:]:
        if (q.method, q.block_size, q.double_quant) != (first.method, first.block_size, first.double_quant):
            raise UsageError(
                "the adapters record different 4-bit training bases; choose one with --dequantize-as nf4|fp4|none"
            )
    return first


def resolve_options(
    base: QuantizedBase | None, metas: list[AdapterMetadata], dequantize_as: str, requantize: str
) -> QuantOptions | None:
    """--dequantize-as / --requantize against what the base is and what the adapters record."""
    if dequantize_as not in DEQUANTIZE_CHOICES:
        raise UsageError(
            f"--dequantize-as must be one of {', '.join(DEQUANTIZE_CHOICES)}, not {dequantize_as!r}"
        )
    if requantize not in REQUANTIZE_CHOICES:
        raise UsageError(f"--requantize must be keep or none, not {requantize!r}")
    roundtrip = None
    if base is None:
        recorded = recorded_4bit(metas)
        if dequantize_as == "auto" and recorded is not None:
            dequantize_as = QUANT_4BIT[QuantMethod(recorded.method)]
        if dequantize_as in ("nf4", "fp4"):
            block = (
                recorded.block_size if recorded is not None and isinstance(recorded.block_size, int) else 64
            )
            dq = bool(recorded.double_quant) if recorded is not None else False
            roundtrip = Bnb4Spec(dequantize_as, block, dq, "")
    elif dequantize_as in ("nf4", "fp4"):
        raise UsageError("--dequantize-as applies to a 16-bit base; this base is already quantized")
    if base is None and roundtrip is None:
        return None
    opts = QuantOptions(base, requantize == "keep", roundtrip)
    if base is not None:
        opts.side_owner = side_owners(base)
    return opts


def mark_targeted(opts: QuantOptions, terms: dict[str, list[Any]]) -> None:
    if opts.base is None:
        return
    weights = opts.base.fp8.weights if opts.base.fp8 is not None else opts.base.nf4
    opts.targeted = {n for n in weights if terms.get(n)}


def make_codecs(task: Any, ck: Any, kernel: Any) -> tuple[Any, Any]:
    """(decoder, encoder) of a quantized task: one codec for both when it is written back quantized (so that it
    measures the re-quantization error), a dense encoder for 16-bit output."""
    from loraformat.io.fp8 import load_scale
    from loraformat.io.nf4 import read_state_arrays
    from loraformat.ops.codec_quant import Bnb4Codec, Bnb4RoundtripCodec, Fp8Codec

    q: QuantTask = task.quant
    if q.layout == StoredLayout.DENSE:
        from loraformat.merging.devices import torch_cpu_capability

        assert q.spec is not None
        rt = Bnb4RoundtripCodec(task.src_dtype, q.spec, q.logical_shape, torch_cpu_capability())
        return rt, kernel.codec(StoredLayout.DENSE, task.out_dtype)
    if q.layout == StoredLayout.FP8:
        codec: Any = Fp8Codec(q.info.layout, load_scale(ck, q.info), q.info.shape)
    else:
        assert q.spec is not None
        w = q.info
        offset = w.state.get("nested_offset") if w.double_quant else None
        codec = Bnb4Codec(q.spec, w.shape, read_state_arrays(ck, w), offset)
    return codec, codec if q.requantize else kernel.codec(StoredLayout.DENSE, task.out_dtype)


def side_tensors(task: Any, codec: Any, by_name: dict[str, Any]) -> dict[str, bytes]:
    """Output tensor name -> bytes of the side tensors (fresh scales, quant state) of a re-quantized weight that
    is done; ``by_name``: the output tasks of this merge by name (a split merge's worker has only its shards')."""
    assert task.quant is not None
    if not task.quant.side:
        return {}
    missing = [n for n in task.quant.side.values() if n not in by_name]
    if missing:  # a split merge's worker got the weight but not its scales
        raise UnsupportedQuantizationError(
            f"{missing[0]!r} lies in another shard than its weight {task.name!r}: a split merge writes a "
            "re-quantized weight and its scales together; pass --max-shard-size, whose shards keep them so"
        )
    return side_bytes(task, codec, {n: by_name[n].out_nbytes for n in task.quant.side.values()})


def side_bytes(task: Any, codec: Any, sizes: dict[str, int]) -> dict[str, bytes]:
    """Output tensor name -> bytes for the side tensors of a re-quantized weight (``sizes``: their stored sizes)."""
    from loraformat.io.nf4 import state_json_bytes

    q: QuantTask = task.quant
    out = {}
    for role, name in q.side.items():
        if role == "state":
            out[name] = state_json_bytes(q.info, codec.new_offset, sizes[name])
        else:
            out[name] = codec.side[role]
        if len(out[name]) != sizes[name]:
            raise UnsupportedQuantizationError(
                f"re-quantized {name!r} has {len(out[name])} bytes, not {sizes[name]}"
            )
    return out
