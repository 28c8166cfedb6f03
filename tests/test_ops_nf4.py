"""loraformat.ops.nf4 against bitsandbytes itself (the oracle): packed bytes, block scales, double quantization
and the dequantized weight must be bit-identical."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")

from loraformat.ops import nf4  # noqa: E402

SHAPES = [(64, 64), (96, 40), (33, 7), (48, 130)]
DTYPES = ["bfloat16", "float16", "float32"]


def _weight(shape: tuple[int, ...], dtype: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(getattr(torch, dtype))


def _bnb_reference_dequant(packed: torch.Tensor, state: object) -> torch.Tensor:
    """bitsandbytes' own pure-torch dequantize kernel (the one it uses on CPU for odd shapes), for the cases where
    its AVX-512 kernel is wrong (a block longer than a row, e.g. 64x64 with block 128: spec/interop/nf4.md)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    absmax = (
        F.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    )
    return fn(packed.reshape(-1), absmax, state.code, state.blocksize, state.shape, state.dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("block_size", [32, 64, 128, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_and_dequantize_match_bitsandbytes(
    quant_type: str, block_size: int, double_quant: bool, dtype: str
) -> None:
    for seed, shape in enumerate(SHAPES):
        w = _weight(shape, dtype, seed)
        ref_packed, ref = F.quantize_4bit(
            w, blocksize=block_size, compress_statistics=double_quant, quant_type=quant_type
        )
        packed, state = nf4.quantize_4bit(
            w, quant_type=quant_type, block_size=block_size, double_quant=double_quant
        )
        assert torch.equal(packed, ref_packed), (shape, "packed indices")
        assert torch.equal(state.absmax, ref.absmax), (shape, "block scales")
        assert torch.equal(state.code, ref.code)
        if double_quant:
            assert state.offset == float(ref.offset)
            assert torch.equal(state.nested_absmax, ref.state2.absmax)
            assert torch.equal(state.nested_code, ref.state2.code)
        ours = nf4.dequantize_4bit(packed, state)
        assert ours.dtype == w.dtype and ours.shape == w.shape
        assert torch.equal(ours, _bnb_reference_dequant(ref_packed, ref).reshape(w.shape))
        if block_size <= shape[1] or shape[1] % 2:
            assert torch.equal(ours, F.dequantize_4bit(ref_packed, ref).reshape(w.shape)), (shape, "dequant")


def test_roundtrip_is_what_qlora_trains_against() -> None:
    """dequant(quant(W)) as bitsandbytes' Linear4bit computes it for a bf16 Llama-shaped weight."""
    w = _weight((256, 512), "bfloat16", 7)
    packed, ref = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    expected = F.dequantize_4bit(packed, ref)
    got = nf4.roundtrip_4bit(w, quant_type="nf4", block_size=64, double_quant=True)
    assert torch.equal(got, expected)
    assert not torch.equal(got, w)  # the grid really moved the weight


def test_blockwise8_matches_bitsandbytes_lookup_table() -> None:
    """Double quantization's 8-bit step, including values near the midpoints where a nearest-value search
    and bitsandbytes' 65536-point table disagree, and an all-zero block."""
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(300_000, generator=g) * 0.01, torch.zeros(256)])
    q_ref, st = F.quantize_blockwise(x, blocksize=256)
    q, absmax = nf4.quantize_blockwise8(x, nf4.dynamic_map(), 256)
    assert torch.equal(q, q_ref) and torch.equal(absmax, st.absmax)
    assert torch.equal(nf4.dynamic_map(), F.create_dynamic_map())


def test_state_summary_matches_the_packed_quant_state() -> None:
    w = _weight((64, 64), "bfloat16", 1)
    _, ref = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    _, state = nf4.quantize_4bit(w, block_size=64, double_quant=True)
    expected = {k: v for k, v in ref.as_dict().items() if not isinstance(v, torch.Tensor)}
    expected["shape"] = list(expected["shape"])
    assert nf4.state_summary(state) == expected


def test_bad_block_size_is_refused() -> None:
    with pytest.raises(ValueError, match="block size"):
        nf4.quantize_4bit(torch.zeros(4, 4), block_size=48)
