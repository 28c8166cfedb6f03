"""loraformat.ops.nf4 against bitsandbytes itself (the oracle): packed bytes, block scales, double quantization
and the dequantized weight must be bit-identical."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")

from loraformat.ops import nf4  # noqa: E402
from tests.nf4_helpers import (  # noqa: E402
    DTYPES,
    SHAPES,
    adversarial_weight,
    bnb_reference_dequant,
    same_bits,
    weight,
)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("block_size", [32, 64, 128, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_and_dequantize_match_bitsandbytes(
    quant_type: str, block_size: int, double_quant: bool, dtype: str
) -> None:
    for seed, shape in enumerate(SHAPES):
        w = weight(shape, dtype, seed)
        ref_packed, ref = F.quantize_4bit(
            w, blocksize=block_size, compress_statistics=double_quant, quant_type=quant_type
        )
        packed, state = nf4.quantize_4bit(
            w, quant_type=quant_type, block_size=block_size, double_quant=double_quant
        )
        assert torch.equal(packed, ref_packed), (shape, "packed indices")
        assert torch.equal(state.absmax, ref.absmax), (shape, "block scales")
        assert torch.equal(state.code, ref.code) and torch.equal(state.code.signbit(), ref.code.signbit())
        if double_quant:
            assert state.offset == float(ref.offset)
            assert torch.equal(state.nested_absmax, ref.state2.absmax)
            assert torch.equal(state.nested_code, ref.state2.code)
        ours = nf4.dequantize_4bit(packed, state)
        assert ours.dtype == w.dtype and ours.shape == w.shape
        assert torch.equal(ours, bnb_reference_dequant(ref_packed, ref).reshape(w.shape))
        if block_size <= shape[1] or shape[1] % 2:
            assert torch.equal(ours, F.dequantize_4bit(ref_packed, ref).reshape(w.shape)), (shape, "dequant")


def test_roundtrip_is_what_qlora_trains_against() -> None:
    """dequant(quant(W)) as bitsandbytes' Linear4bit computes it for a bf16 Llama-shaped weight."""
    w = weight((256, 512), "bfloat16", 7)
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
    w = weight((64, 64), "bfloat16", 1)
    _, ref = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    _, state = nf4.quantize_4bit(w, block_size=64, double_quant=True)
    expected = {k: v for k, v in ref.as_dict().items() if not isinstance(v, torch.Tensor)}
    expected["shape"] = list(expected["shape"])
    assert nf4.state_summary(state) == expected


def test_bad_block_size_is_refused() -> None:
    with pytest.raises(ValueError, match="block size"):
        nf4.quantize_4bit(torch.zeros(4, 4), block_size=48)


def _reference_bucket(x: torch.Tensor, quant_type: str) -> torch.Tensor:
    """The stored 4-bit index of scaled values as bitsandbytes' own kernel picks it (bucketize, then the order)."""
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    bounds, order = _get_4bit_quantize_bounds(quant_type, x.device)
    q = torch.bucketize(x, bounds, out_int32=True)
    return (q if quant_type == "nf4" else order[q]).to(torch.uint8)


def _bits(*patterns: int) -> torch.Tensor:
    return torch.tensor(patterns, dtype=torch.int64).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cell_search_is_bucketize_for_every_float(quant_type: str) -> None:
    """Exhaustive in effect: a cell without a midpoint is an interval on which bucketize is constant, so its two
    ends decide it; every float of the cells holding a midpoint, and +-inf / NaN, are checked one by one."""
    cells = nf4._cells(quant_type)
    ends = nf4._cell_ends().reshape(-1)
    split = torch.nonzero(~torch.isinf(cells.bound) & ~torch.isnan(cells.bound)).flatten()
    assert 0 < split.numel() <= 15
    low16 = torch.arange(1 << 16, dtype=torch.int64)
    high = ((split.to(torch.int64) ^ 0x8000) << 16)[:, None]
    inside = ((high | low16) - ((high | low16) >= 1 << 31) * (1 << 32)).to(torch.int32).view(torch.float32)
    odd = torch.cat(
        [
            torch.tensor([0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, -math.nan, 1e-45, -1e-45]),
            _bits(0x7F800001, 0x7FBFFFFF, -0x00400001, -0x007FFFFF),  # NaNs with payloads, both signs
        ]
    )
    x = torch.cat([ends, inside.reshape(-1), odd])
    search = nf4._Search(quant_type, x.numel())
    slots = search.slots(x)
    q = cells.index[slots]
    assert torch.equal(q, _reference_bucket(x, quant_type))
    assert torch.equal(cells.value[slots], nf4.code4(quant_type)[q.long()])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [1024, 3 * 65536 + 64 * 5 + 17])  # one chunk; several plus a partial block
@pytest.mark.parametrize("double_quant", [False, True])  # NaN / inf blocks: single quantization only
def test_adversarial_values_quantize_and_roundtrip_as_bitsandbytes(
    quant_type: str, dtype: str, numel: int, double_quant: bool
) -> None:
    w = adversarial_weight(quant_type, dtype, numel, nonfinite=not double_quant)
    ref_packed, ref = F.quantize_4bit(
        w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type
    )
    packed, state = nf4.quantize_4bit(w, quant_type=quant_type, block_size=64, double_quant=double_quant)
    assert torch.equal(packed, ref_packed)
    if double_quant:
        assert torch.equal(state.absmax, ref.absmax) and torch.equal(state.nested_absmax, ref.state2.absmax)
    else:
        assert same_bits(state.absmax, ref.absmax)
    expected = bnb_reference_dequant(ref_packed, ref)
    assert same_bits(nf4.dequantize_4bit(packed, state), expected)
    got = nf4.roundtrip_4bit(w, quant_type=quant_type, block_size=64, double_quant=double_quant)
    assert got.dtype == w.dtype and same_bits(got, expected)
    widened = torch.empty(numel, dtype=torch.float32)
    assert nf4.roundtrip_4bit(w, quant_type=quant_type, double_quant=double_quant, out=widened) is widened
    assert same_bits(widened, expected.float())


@pytest.mark.parametrize("block_size", [32, 4096])
@pytest.mark.parametrize("shape", [(300, 301), (2, 40000), (7,)])
def test_roundtrip_is_dequantize_of_quantize(block_size: int, shape: tuple[int, ...]) -> None:
    """The fused round trip against the two separate steps, including float64 input (quantized from fp32, the
    products rounded to fp32 and widened, as bitsandbytes does) and a block longer than the weight."""
    for seed, dtype in enumerate(["bfloat16", "float16", "float32", "float64"]):
        w = weight(shape, dtype, seed)
        for double_quant in (False, True):
            packed, state = nf4.quantize_4bit(w, block_size=block_size, double_quant=double_quant)
            got = nf4.roundtrip_4bit(w, block_size=block_size, double_quant=double_quant)
            assert got.shape == w.shape and torch.equal(got, nf4.dequantize_4bit(packed, state))


def test_double_quant_offset_is_the_same_on_any_thread_count() -> None:
    """torch splits the mean of a long absmax vector between its threads, and bitsandbytes' offset then depends
    on the core count (this weight: by one ulp); ours is bitsandbytes' on one thread, whatever the setting."""
    w = weight((1024, 4096), "bfloat16", 2)
    previous = torch.get_num_threads()
    try:
        offsets, ours, trips = [], [], []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            offsets.append(float(F.quantize_4bit(w, blocksize=64, compress_statistics=True)[1].offset))
            ours.append(nf4.quantize_4bit(w, block_size=64, double_quant=True)[1].offset)
            trips.append(nf4.roundtrip_4bit(w, block_size=64, double_quant=True).view(torch.int16))
    finally:
        torch.set_num_threads(previous)
    assert offsets[0] != offsets[1]  # the premise: bitsandbytes differs between one and two threads
    assert ours == [offsets[0], offsets[0]]
    assert torch.equal(trips[0], trips[1])
