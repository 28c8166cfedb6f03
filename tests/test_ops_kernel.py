"""The merge kernels (loraformat.ops.kernel*): both against PEFT's own layers, both within the bound
ops/kernel.py documents of the exact result (and so of each other), each one's bits independent of how the rows
are partitioned into blocks, and the numpy codecs bit-exact against torch's conversions."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from loraformat.constants import LayerKind, StoredLayout
from loraformat.ops import kernel_numpy
from loraformat.ops.bf16 import round_bf16_in_place
from loraformat.ops.kernel_numpy import NumpyKernel
from loraformat.ops.kernel_torch import TorchKernel, torch_dtype
from loraformat.ops.term import Term, needs_whole_tensor, rows_cols
from tests.merge_helpers import assert_within_bound, max_ulp, ulp_distance

KERNELS = [NumpyKernel(), TorchKernel("cpu")]


def stored_bytes(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().copy()


def merge(kernel, W: torch.Tensor, terms: list[Term], out_dtype=None, *, step=0, sub=0) -> torch.Tensor:
    """W' through ``kernel`` in blocks of ``step`` rows (0: one block), ``sub`` rows at a time."""
    st_in = {
        v: k
        for k, v in {
            "BF16": torch.bfloat16,
            "F16": torch.float16,
            "F32": torch.float32,
            "F64": torch.float64,
        }.items()
    }[W.dtype]
    out_dtype = out_dtype or W.dtype
    st_out = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64"}[
        out_dtype
    ]
    cd = kernel.compute_dtype(st_in, st_out)
    dec, enc = kernel.codec(StoredLayout.DENSE, st_in), kernel.codec(StoredLayout.DENSE, st_out)
    factors = [
        kernel.prepare(t.map(lambda x: kernel.load(stored_bytes(x), _st(x), tuple(x.shape), cd)))
        for t in terms
    ]
    rows, cols = rows_cols(W.shape)
    src = stored_bytes(W)
    out = np.zeros(rows * enc.row_nbytes(cols), np.uint8)
    step = step or rows
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        s = kernel.from_host(src[r0 * dec.row_nbytes(cols) :], (r1 - r0) * dec.row_nbytes(cols))
        o = kernel.from_host(out[r0 * enc.row_nbytes(cols) :], (r1 - r0) * enc.row_nbytes(cols))
        kernel.merge_block(s, dec, o, enc, factors, r0, r1, cols, sub_rows=sub)
    return torch.from_numpy(out).view(out_dtype).reshape(W.shape)


def _st(t: torch.Tensor) -> str:
    return {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64"}[t.dtype]


# --- against PEFT ------------------------------------------------------------------------------------------------


class Net(nn.Module):
    """One layer of every kind PEFT merges: Linear, Embedding, Conv2d 1x1 and 3x3, Conv1d k=3."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 10)
        self.emb = nn.Embedding(20, 8)
        self.c1 = nn.Conv2d(4, 6, 1)
        self.c3 = nn.Conv2d(6, 5, 3, padding=1)
        self.k1d = nn.Conv1d(3, 7, 3)


def _peft(net: nn.Module, **kwargs) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    cfg = LoraConfig(
        r=3, lora_alpha=5, init_lora_weights=False, target_modules=["lin", "emb", "c1", "c3", "k1d"], **kwargs
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(net, cfg)
    with torch.no_grad():  # DoRA magnitudes away from the norms, so that DoRA actually rescales
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.5).add_(0.1)
    return model


def _term(layer: nn.Module, magnitude: bool = False) -> Term:
    s = layer.scaling["default"]
    mag = layer.lora_magnitude_vector["default"].weight.data.clone() if magnitude else None
    if hasattr(layer, "lora_embedding_A") and "default" in layer.lora_embedding_A:
        A, B = layer.lora_embedding_A["default"].data, layer.lora_embedding_B["default"].data
        return Term(LayerKind.EMBEDDING, A, B, s, magnitude=mag)
    A, B = layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data
    return Term(LayerKind.CONV if A.dim() > 2 else LayerKind.LINEAR, A, B, s, magnitude=mag)


@pytest.mark.parametrize("module", ["lin", "emb", "c1", "c3", "k1d"])
def test_both_kernels_merge_like_peft_within_the_bound(module):
    torch.manual_seed(0)
    model = _peft(Net())
    layer = getattr(model.base_model.model, module)
    W = layer.get_base_layer().weight.data.clone()
    term = _term(layer)
    ours = [merge(k, W, [term], step=3, sub=2) for k in KERNELS]
    layer.merge()
    for got in ours:
        torch.testing.assert_close(got, layer.get_base_layer().weight.data, rtol=1e-6, atol=1e-6)
        assert_within_bound(got, W, [term])


def test_fan_in_fan_out_transposes_like_peft():
    """GPT-2's Conv1D stores (in, out): the delta is (B A)^T, for PEFT and for us."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    class G(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = Conv1D(9, 6)  # nf=9 outputs, nx=6 inputs: weight (6, 9)

    torch.manual_seed(1)
    model = get_peft_model(
        G(),
        LoraConfig(
            r=2, lora_alpha=3, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False
        ),
    )
    layer = model.base_model.model.c_attn
    A, B = layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data
    W = layer.get_base_layer().weight.data.clone()
    term = Term(LayerKind.LINEAR, A, B, layer.scaling["default"], fan_in_fan_out=True)
    ours = [merge(k, W, [term], step=2) for k in KERNELS]
    layer.merge()
    for got in ours:
        torch.testing.assert_close(got, layer.get_base_layer().weight.data)
        assert_within_bound(got, W, [term])


@pytest.mark.parametrize("module", ["lin", "emb", "c1", "c3"])
def test_dora_matches_peft_merge(module):
    torch.manual_seed(0)
    model = _peft(Net(), use_dora=True)
    layer = getattr(model.base_model.model, module)
    W = layer.get_base_layer().weight.data.clone()
    term = _term(layer, magnitude=True)
    whole = needs_whole_tensor([term])
    ours = merge(TorchKernel(), W, [term], step=0 if whole else 2, sub=0 if whole else 1)
    layer.merge()
    torch.testing.assert_close(ours, layer.get_base_layer().weight.data, rtol=1e-5, atol=1e-6)


def test_dora_fan_in_fan_out_normalises_columns():
    """Conv1D + DoRA: one magnitude per output feature, i.e. per column of the stored (in, out) weight."""
    torch.manual_seed(2)
    W = torch.randn(6, 4)  # (in, out)
    A, B = torch.randn(2, 6), torch.randn(4, 2)
    mag = torch.rand(4) + 0.5
    term = Term(LayerKind.LINEAR, A, B, 1.5, fan_in_fan_out=True, magnitude=mag)
    assert needs_whole_tensor([term]) and term.axis == 1
    out = merge(TorchKernel(), W, [term])
    torch.testing.assert_close(out.norm(dim=0), mag)


def test_numpy_kernel_leaves_dora_and_exotic_dtypes_to_torch():
    k = NumpyKernel()
    assert k.unsupported(["BF16", "F32"], dora=True) == "DoRA"
    assert k.unsupported(["F8_E4M3"], dora=False) == "dtype F8_E4M3"
    assert k.unsupported(["BF16", "F16", "F32", "F64"], dora=False) is None
    assert TorchKernel().unsupported(["F8_E4M3"], dora=True) is None


def test_weighted_sum_is_exact_in_fp32_and_rounded_once():
    torch.manual_seed(4)
    W = torch.randn(64, 48).to(torch.bfloat16)
    parts = [
        (torch.randn(4, 48), torch.randn(64, 4), 0.7 * 2.0),
        (torch.randn(8, 48), torch.randn(64, 8), -0.3),
    ]
    ref = W.double() + sum(s * (B.double() @ A.double()) for A, B, s in parts)
    terms = [Term(LayerKind.LINEAR, A, B, s) for A, B, s in parts]
    ours = [merge(k, W, terms, step=10, sub=3) for k in KERNELS]
    for got in ours:
        assert got.dtype == torch.bfloat16 and max_ulp(got, ref.to(torch.bfloat16)) <= 1
        assert_within_bound(got, W, terms)


def test_lora_bias_term():
    bias, bB = torch.randn(10), torch.randn(10)
    for k in KERNELS:
        out = merge(k, bias, [Term(LayerKind.BIAS, None, bB, 0.5)])
        torch.testing.assert_close(out, bias + 0.5 * bB)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError):
        NumpyKernel().prepare(Term("attention", np.zeros((1, 2)), np.zeros((2, 1)), 1.0))


DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 17),
    cols=st.integers(1, 9),
    rank=st.integers(1, 4),
    step=st.integers(1, 17),
    sub=st.integers(0, 5),
    fifo=st.booleans(),
    scale=st.sampled_from([0.25, 2.0, 1.0, 0.7, -1.3]),
    dtypes=st.tuples(st.sampled_from(DTYPES), st.sampled_from(DTYPES)),
    seed=st.integers(0, 2**16),
)
def test_kernels_within_the_bound_for_any_partition(rows, cols, rank, step, sub, fifo, scale, dtypes, seed):
    """Each kernel, whatever the blocks and sub-blocks: within the documented bound of the exact merge, and the
    same bits when run again on the same blocks (a rerun, a split merge's worker). Power-of-two scales
    included: no kernel takes a shortcut."""
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = (cols, rows) if fifo else (rows, cols)
    W = torch.randn(rows, cols, generator=g).to(dtypes[0])
    A, B = torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g)
    term = Term(LayerKind.LINEAR, A, B, scale, fan_in_fan_out=fifo)
    for k in KERNELS:
        got = merge(k, W, [term], dtypes[1], step=step, sub=sub)
        assert_within_bound(got, W, [term])
        again = merge(k, W, [term], dtypes[1], step=step, sub=sub)
        assert torch.equal(got.view(torch.uint8), again.view(torch.uint8)), k.name


def test_kernels_differ_only_in_the_last_bit_and_rarely():
    """The kernels' products sum the rank in their BLAS's order: on a realistic block (bf16 weights, rank 16,
    scale 2) a bf16 output differs between them in at most one ulp and in well under 0.1 % of the elements."""
    g = torch.Generator().manual_seed(7)
    W = (0.02 * torch.randn(512, 1024, generator=g)).to(torch.bfloat16)
    A, B = 0.01 * torch.randn(16, 1024, generator=g), 0.01 * torch.randn(512, 16, generator=g)
    term = Term(LayerKind.LINEAR, A, B, 2.0)
    a, b = (merge(k, W, [term], step=100, sub=64) for k in KERNELS)
    d = ulp_distance(a, b)
    assert int(d.max()) <= 1 and float((d > 0).float().mean()) < 1e-3


# --- numpy codecs against torch's conversions ---------------------------------------------------------------------


def _bits32(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.uint32)


def _interesting_f32() -> np.ndarray:
    """Random bit patterns (every exponent: subnormals, huge, inf, NaN) plus hand-picked edge cases."""
    rng = np.random.default_rng(0)
    random_bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    normal = rng.standard_normal(50_000).astype(np.float32).view(np.uint32)
    hi = rng.integers(0, 2**16, size=20_000, dtype=np.uint32) << 16
    ties = np.concatenate([hi | 0x8000, hi | 0x7FFF, hi | 0x8001, hi])  # exact ties (odd and even), near ties
    edges = _bits32(
        [
            0x00000000,
            0x80000000,  # +-0
            0x00000001,
            0x00008000,
            0x00018000,
            0x0000FFFF,
            0x007FFFFF,
            0x807FFFFF,  # subnormals, ties among them
            0x3F808000,
            0x3F818000,
            0x3F80FFFF,
            0x3F807FFF,  # ties to even / odd, just above and below
            0x7F7FFFFF,
            0xFF7FFFFF,
            0x7F7F8000,
            0x7F7F7FFF,  # max finite rounds to inf, a tie below it
            0x7F800000,
            0xFF800000,  # inf
            0x7F800001,
            0x7FC00000,
            0x7FFFFFFF,
            0xFFFFFFFF,
            0xFF800001,
            0x7FBFFFFF,  # NaNs (signalling, quiet, sign)
        ]
    )
    return np.concatenate([random_bits, normal, ties, edges]).view(np.float32)


def test_f32_to_bf16_matches_torch_bit_for_bit():
    x = _interesting_f32()
    ours = kernel_numpy.f32_to_bf16(x)
    theirs = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    assert nan.sum() > 1000 and np.isinf(x).sum() >= 2
    assert np.array_equal(ours[~nan], theirs[~nan])
    # NaN stays NaN (the payload bits differ between torch's kernels, so only NaN-ness is compared)
    assert np.isnan(kernel_numpy.bf16_to_f32(ours[nan])).all()
    # the out= form gives the same bits
    out = np.empty(x.shape, np.uint16)
    assert kernel_numpy.f32_to_bf16(x, out) is out and np.array_equal(out, ours)
    # the integer rounding the merge uses once it checked the rows are finite: the same bits, including every
    # finite value past bfloat16's largest (it must become inf, as torch's cast makes it)
    finite = np.isfinite(x)
    fast = kernel_numpy.f32_to_bf16(np.ascontiguousarray(x[finite]), finite=True)
    assert np.array_equal(fast, theirs[finite])
    assert (fast == 0x7F80).sum() >= 2 and (fast == 0xFF80).sum() >= 1  # 0x7F7F8000, 0x7F7FFFFF, 0xFF7FFFFF


def test_round_bf16_in_place_is_f32_to_bf16_widened():
    """The in-place rounding (the QLoRA round trip's last step) gives f32_to_bf16's bits, NaN kept a NaN."""
    x = _interesting_f32()
    expected = kernel_numpy.bf16_to_f32(kernel_numpy.f32_to_bf16(x))
    for finite in (False, True):
        keep = np.isfinite(x) if finite else np.ones(x.shape, bool)
        y = np.ascontiguousarray(x[keep])
        assert round_bf16_in_place(y, np.empty(y.size, np.uint32), finite=finite) is y
        nan = np.isnan(expected[keep])
        assert np.array_equal(np.isnan(y), nan) and nan.any() != finite
        assert np.array_equal(y[~nan].view(np.uint32), expected[keep][~nan].view(np.uint32))


def test_bf16_to_f32_is_exact_for_every_pattern():
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    ours = kernel_numpy.bf16_to_f32(bits)
    theirs = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    strided = np.empty((2**16, 2), np.float32)[:, 0]  # a non-contiguous out takes the cast
    assert np.array_equal(kernel_numpy.bf16_to_f32(bits, strided).view(np.uint32), theirs.view(np.uint32))
    finite = ~np.isnan(ours)
    assert np.array_equal(kernel_numpy.f32_to_bf16(ours)[finite], bits[finite])  # round trip


@pytest.mark.parametrize("out_dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("work_dtype", [np.float32, np.float64])
def test_encode_matches_torch_conversions(out_dtype, work_dtype):
    x = _interesting_f32()
    x = x[~np.isnan(x)].astype(work_dtype)
    if work_dtype == np.float64:  # values between the fp32 grid points, and beyond the fp32 range
        x = np.concatenate([x * (1 + 2**-30), x * 3.3e20, x * 1e-30])
    tdt = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[out_dtype]
    theirs = torch.from_numpy(x.copy()).to(tdt)
    raw = np.empty(x.size * np.dtype(kernel_numpy.STORAGE[out_dtype]).itemsize, np.uint8)
    kernel_numpy.DenseCodec(out_dtype).encode(x.reshape(-1, 1), 0, x.size, raw)
    ours = raw.view(kernel_numpy.STORAGE[out_dtype])
    if out_dtype == "BF16":
        theirs_bits = theirs.view(torch.int16).numpy().view(np.uint16)
    else:
        theirs_bits = theirs.numpy().view(np.uint16 if out_dtype == "F16" else np.uint32)
        ours = ours.view(theirs_bits.dtype)
    assert np.array_equal(ours, theirs_bits)


@pytest.mark.parametrize("st_dtype", ["BF16", "F16", "F32", "F64"])
def test_decode_widens_exactly(st_dtype):
    t = torch.randn(7, 5, generator=torch.Generator().manual_seed(1)).to(torch_dtype(st_dtype))
    for kernel in KERNELS:
        for cd in {kernel.compute_dtype(st_dtype), kernel.compute_dtype("F64")}:
            got = kernel.load(stored_bytes(t), st_dtype, (7, 5), cd)
            got = torch.as_tensor(np.asarray(got)) if isinstance(got, np.ndarray) else got
            assert torch.equal(got, t.to(got.dtype))
