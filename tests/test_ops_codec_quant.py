"""The QLoRA round-trip codec against bitsandbytes itself: it reads the stored 16-bit bytes in place (or decodes
them first for other dtypes), runs on the merge's bounded torch threads, and writes dequant(quant(W)) widened."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")

from loraformat.ops.codec_quant import Bnb4RoundtripCodec, Bnb4Spec  # noqa: E402
from loraformat.ops.nf4 import roundtrip_4bit  # noqa: E402

SHAPE = (96, 130)
STORED = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _raw(w: torch.Tensor, writeable: bool) -> np.ndarray:
    raw = w.contiguous().view(torch.uint8).reshape(-1).numpy().copy()
    raw.flags.writeable = writeable
    return raw


@pytest.mark.parametrize("st_dtype", sorted(STORED))
@pytest.mark.parametrize("writeable", [True, False])
def test_roundtrip_codec_decodes_what_bitsandbytes_dequantizes(st_dtype: str, writeable: bool) -> None:
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(SHAPE, generator=g) * 0.02).to(STORED[st_dtype])
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    expected = F.dequantize_4bit(packed, state).float().numpy()
    spec = Bnb4Spec("nf4", 64, True, str(w.dtype).removeprefix("torch."))
    codec = Bnb4RoundtripCodec(st_dtype, spec, SHAPE)
    out = np.full(SHAPE, np.nan, np.float32)
    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a read-only array
        codec.decode(_raw(w, writeable), 0, SHAPE[0], out)
    assert np.array_equal(out, expected)
    assert torch.get_num_threads() == threads


def test_roundtrip_codec_converts_other_stored_dtypes_first() -> None:
    """F64 weights: decoded, narrowed to fp32 (what the plan asks the round trip to work in), widened back."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(SHAPE, generator=g, dtype=torch.float64) * 0.02
    codec = Bnb4RoundtripCodec("F64", Bnb4Spec("nf4", 64, True, "float32"), SHAPE)
    out = np.empty(SHAPE, np.float64)
    codec.decode(_raw(w, True), 0, SHAPE[0], out)
    expected = roundtrip_4bit(w.float(), block_size=64, double_quant=True).double().numpy()
    assert np.array_equal(out, expected)
    with pytest.raises(ValueError, match="whole tensor"):
        codec.decode(_raw(w[:10], True), 0, 10, out[:10])
