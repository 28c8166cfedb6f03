"""The QLoRA round-trip codec against bitsandbytes itself: it reads the stored 16-bit bytes in place (or decodes
them first for other dtypes) and writes dequant(quant(W)) widened, in numpy where it knows torch's CPU
capability, else in torch on the merge's bounded torch threads."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")

from loraformat.merging.devices import torch_cpu_capability  # noqa: E402
from loraformat.ops.codec_quant import Bnb4RoundtripCodec, Bnb4Spec  # noqa: E402
from loraformat.ops.kernel_numpy import DenseCodec  # noqa: E402
from loraformat.ops.nf4 import roundtrip_4bit  # noqa: E402

SHAPE = (96, 130)
STORED = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
CAPABILITY = torch_cpu_capability()


def _raw(w: torch.Tensor, writeable: bool) -> np.ndarray:
    raw = w.contiguous().view(torch.uint8).reshape(-1).numpy().copy()
    raw.flags.writeable = writeable
    return raw


@pytest.mark.parametrize("st_dtype", sorted(STORED))
@pytest.mark.parametrize("writeable", [True, False])
@pytest.mark.parametrize("capability", [None, CAPABILITY])  # the torch round trip, then the numpy one
def test_roundtrip_codec_decodes_what_bitsandbytes_dequantizes(
    st_dtype: str, writeable: bool, capability: str | None
) -> None:
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(SHAPE, generator=g) * 0.02).to(STORED[st_dtype])
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    expected = F.dequantize_4bit(packed, state).float().numpy()
    spec = Bnb4Spec("nf4", 64, True, str(w.dtype).removeprefix("torch."))
    codec = Bnb4RoundtripCodec(st_dtype, spec, SHAPE, capability)
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


SPEC_DTYPES = ["bfloat16", "float16", "float32"]


def _torch_reference(w: torch.Tensor, spec: Bnb4Spec) -> np.ndarray:
    """The torch round trip of the weight as the spec's dtype (narrowed from the stored one through fp32)."""
    x = w.float().to(getattr(torch, spec.dtype))
    rt = roundtrip_4bit(
        x, quant_type=spec.quant_type, block_size=spec.block_size, double_quant=spec.double_quant
    )
    return rt.double().numpy()


@pytest.mark.parametrize("st_dtype", [*sorted(STORED), "F64"])
@pytest.mark.parametrize("spec_dtype", SPEC_DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_numpy_roundtrip_codec_is_the_torch_one(st_dtype: str, spec_dtype: str, double_quant: bool) -> None:
    """Whatever the stored dtype and the dtype QLoRA quantized in, into fp32, fp64 and strided work buffers (a
    partial last block: 96 x 131 is not a multiple of 64)."""
    shape = (96, 131)
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.02).to(STORED.get(st_dtype, torch.float64))
    spec = Bnb4Spec("fp4" if double_quant else "nf4", 64, double_quant, spec_dtype)
    expected = _torch_reference(w, spec)
    strided = np.full((shape[0], 2 * shape[1]), np.nan, np.float32)[:, ::2]  # through a contiguous buffer
    for out in (np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float64), strided):
        Bnb4RoundtripCodec(st_dtype, spec, shape, CAPABILITY).decode(_raw(w, False), 0, shape[0], out)
        assert np.array_equal(out, expected.astype(out.dtype)), (out.dtype, out.flags.c_contiguous)


def test_roundtrip_codec_falls_back_to_torch_where_the_capability_is_unknown() -> None:
    """Without torch's CPU capability the numpy port cannot be sure of torch's mean and 8-bit code: the codec
    then runs torch's round trip, with the same result on this machine."""
    g = torch.Generator().manual_seed(8)
    w = (torch.randn(SHAPE, generator=g) * 0.02).to(torch.bfloat16)
    spec = Bnb4Spec("nf4", 64, True, "bfloat16")
    outs = []
    for capability in (None, CAPABILITY):
        outs.append(np.empty(SHAPE, np.float32))
        Bnb4RoundtripCodec("BF16", spec, SHAPE, capability).decode(_raw(w, True), 0, SHAPE[0], outs[-1])
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[1], _torch_reference(w, spec))


@pytest.mark.parametrize("capability", [None, CAPABILITY])  # the torch round trip, then the numpy one
@pytest.mark.parametrize("cols", [128, 130])  # rows of whole 4-bit blocks; groups of 32 rows make them whole
def test_roundtrip_codec_streams_through_the_kernels_sub_blocks(capability: str | None, cols: int) -> None:
    """The numpy kernel merges a round-trip weight a few row groups at a time (in cache) once the codec has its
    statistics from the whole tensor: the same bytes as one whole pass, with terms added."""
    from loraformat.ops.kernel import Factors
    from loraformat.ops.kernel_numpy import NumpyKernel

    rows = 200
    g = torch.Generator().manual_seed(9)
    w = (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)
    L, R = (torch.randn(n, generator=g).numpy() * 0.01 for n in ((rows, 4), (4, cols)))
    spec = Bnb4Spec("nf4", 64, True, "bfloat16")
    group = 64 // math.gcd(cols, 64)
    kernel, outs = NumpyKernel(), []
    for sub_rows in (0, 3 * group):
        out = np.empty(rows * cols * 2, np.uint8)
        dec, enc = Bnb4RoundtripCodec("BF16", spec, (rows, cols), capability), DenseCodec("BF16")
        kernel.merge_block(_raw(w, False), dec, out, enc, [Factors(L, R)], 0, rows, cols, sub_rows=sub_rows)
        outs.append(out)
    assert np.array_equal(outs[0], outs[1])
    expected = _torch_reference(w, spec).astype(np.float32).reshape(rows, cols) + L @ R
    got = torch.from_numpy(outs[1].view(np.int16)).view(torch.bfloat16).float().numpy().reshape(rows, cols)
    assert np.abs(got - expected).max() <= 2**-8 * np.abs(expected).max()  # within a bf16 rounding of W + LR


def test_a_run_of_the_numpy_round_trip_must_start_on_a_block_boundary() -> None:
    from loraformat.ops.nf4_numpy import RoundTrip

    w = np.zeros(200, np.float32)
    trip = RoundTrip(w, "float32", block_size=64)
    with pytest.raises(ValueError, match="block boundary"):
        trip.values(w[10:74], 10, np.empty(64, np.float32))
    with pytest.raises(ValueError, match="block boundary"):
        trip.values(w[:100], 0, np.empty(100, np.float32))
    assert np.array_equal(trip.values(w[128:], 128, np.ones(72, np.float32)), np.zeros(72, np.float32))
