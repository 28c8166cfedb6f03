"""Which quantized layout a base checkpoint uses, from config.json and the tensors, checked before any merge
work: FP8 (loraformat/io/fp8.py) or bitsandbytes 4-bit (loraformat/io/nf4.py); anything else quantized is
refused with one line naming the format. A plain 16-bit checkpoint gives None.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraformat.constants import QUANT_4BIT, QuantMethod
from loraformat.errors import UnsupportedQuantizationError
from loraformat.io.checkpoint import Checkpoint, read_config
from loraformat.io.fp8 import Fp8Base, detect_fp8, load_scale
from loraformat.io.nf4 import Nf4Weight, detect_nf4
from loraformat.metadata import BaseQuantization
from loraformat.quantization import from_quantization_config


@dataclass
class QuantizedBase:
    quant: BaseQuantization
    quant_method: str  # config.json quantization_config.quant_method
    fp8: Fp8Base | None = None
    nf4: dict[str, Nf4Weight] = field(default_factory=dict)

    def logical_shapes(self) -> dict[str, tuple[int, ...]]:
        """Weight name -> the (out, in) shape a LoRA module targets (packed 4-bit weights are stored flat)."""
        if self.fp8 is not None:
            return {n: w.shape for n, w in self.fp8.weights.items()}
        return {n: w.shape for n, w in self.nf4.items()}

    def companions(self) -> dict[str, str]:
        """Side tensor (scale, quant state) -> the weight it belongs to."""
        if self.fp8 is not None:
            return self.fp8.scale_names
        return {c: w.name for w in self.nf4.values() for c in w.tensor_names if c != w.name}


def open_quantized(ck: Checkpoint, *, check_scales: bool = True) -> QuantizedBase | None:
    """The base's quantized layout, or None for a plain floating-point checkpoint; ``check_scales`` reads every
    FP8 scale (kilobytes) so that NaN or zero scales are refused before anything is written."""
    config = read_config(ck) or {}
    qc = config.get("quantization_config")
    if qc is None:  # FP8 tensors without a config are copied as they are, and refused as targets (plan.py)
        return None
    quant = from_quantization_config(qc)
    if quant is None:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if quant.method == QuantMethod.BNB_INT8:
        raise UnsupportedQuantizationError(
            "bitsandbytes 8-bit (LLM.int8) checkpoints cannot be merged; use the 16-bit base", path=ck.path
        )
    base = QuantizedBase(quant, method)
    if quant.method in QUANT_4BIT:
        base.nf4 = detect_nf4(ck)
        want = QUANT_4BIT[QuantMethod(quant.method)]
        for w in base.nf4.values():
            if w.quant_type != want:
                raise UnsupportedQuantizationError(
                    f"config.json says {want} but {w.state_name!r} is {w.quant_type}", path=ck.path
                )
        quant.block_size = next(iter(base.nf4.values())).block_size
        return base
    base.fp8 = detect_fp8(ck, quant, method)
    if check_scales:
        for fw in base.fp8.weights.values():
            load_scale(ck, fw)
    return base


def attach(ck: Checkpoint, *, check_scales: bool = True) -> QuantizedBase | None:
    """Open the quantized layout and record its logical weight shapes on ``ck`` for the target checks."""
    qb = open_quantized(ck, check_scales=check_scales)
    if qb is not None:
        ck.logical_shapes.update(qb.logical_shapes())
    return qb
