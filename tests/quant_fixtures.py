"""Quantized bases made by the real libraries from a 16-bit tiny Llama: bitsandbytes 4-bit through transformers'
BitsAndBytesConfig (as transformers saves it), FP8 through compressed-tensors (its own compressor writes the
float-quantized format; the block-scaled DeepSeek layout is compressed-tensors' FP8_BLOCK values saved under
transformers' ``fp8`` names: ``weight_scale_inv`` and ``weight_block_size``). Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

TARGETS = ["Linear"]


def make_bnb4_base(src: Path, out: Path, *, quant_type: str = "nf4", double_quant: bool = True) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=config, device_map="cpu", dtype=torch.bfloat16
    )
    model.save_pretrained(out)
    return out


def _ct_quantize(model: object, scheme: str) -> None:
    """Apply a compressed-tensors preset with weight scales observed from the weights (absmax / 448)."""
    import torch
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    if (
        scheme == "FP8_TENSOR"
    ):  # per-tensor weights, dynamic per-token activations (no input scales to calibrate)
        group = preset_name_to_scheme("FP8_DYNAMIC", TARGETS)
        assert group.weights is not None
        group.weights.strategy = "tensor"
    else:
        group = preset_name_to_scheme(scheme, TARGETS)
    qc = QuantizationConfig(config_groups={"group_0": group}, ignore=["lm_head"])
    apply_quantization_config(model, qc)
    for module in model.modules():  # type: ignore[attr-defined]
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if args is None:
            continue
        w = module.weight.data.float()
        if args.strategy == "tensor":
            amax = w.abs().amax()
        elif args.strategy == "channel":
            amax = w.abs().amax(dim=1, keepdim=True)
        else:
            bo, bi = args.block_structure
            rows, cols = w.shape
            padded = torch.nn.functional.pad(w, (0, -cols % bi, 0, -rows % bo))
            amax = padded.abs().reshape(padded.shape[0] // bo, bo, -1, bi).amax(dim=(1, 3))
        scale, zp = calculate_qparams(-amax, amax, args)
        module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = zp.reshape(module.weight_zero_point.shape).to(
                module.weight_zero_point.dtype
            )


def make_ct_fp8_base(src: Path, out: Path, *, scheme: str = "FP8_DYNAMIC") -> Path:
    """compressed-tensors float-quantized: FP8_TENSOR (per-tensor), FP8_DYNAMIC (per-channel) or FP8_BLOCK."""
    from compressed_tensors.compressors import ModelCompressor
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    _ct_quantize(model, scheme)
    compressor = ModelCompressor.from_pretrained_model(model, "float-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    return out


def make_block_fp8_base(src: Path, out: Path) -> Path:
    """The DeepSeek-V3 layout: F8_E4M3 weights, F32 ``weight_scale_inv`` per 128x128 tile (partial edges)."""
    import torch
    from safetensors.torch import load_file, save_file

    make_ct_fp8_base(src, out, scheme="FP8_BLOCK")
    tensors = load_file(str(out / "model.safetensors"))
    renamed = {
        (k[: -len("weight_scale")] + "weight_scale_inv" if k.endswith(".weight_scale") else k): (
            v.float() if k.endswith(".weight_scale") else v
        )
        for k, v in tensors.items()
    }
    save_file(renamed, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    assert all(t.dtype != torch.float8_e5m2 for t in renamed.values())
    return out
