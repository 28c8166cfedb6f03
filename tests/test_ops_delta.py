"""loraformat.ops.delta against PEFT's own layers (get_delta_weight, merge) and against itself in row blocks."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from loraformat.constants import LayerKind
from loraformat.ops import delta
from tests.merge_helpers import max_ulp


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


def _factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, str]:
    if hasattr(layer, "lora_embedding_A") and "default" in layer.lora_embedding_A:
        return (
            layer.lora_embedding_A["default"].data,
            layer.lora_embedding_B["default"].data,
            LayerKind.EMBEDDING,
        )
    A, B = layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data
    return A, B, LayerKind.CONV if A.dim() > 2 else LayerKind.LINEAR


@pytest.fixture(scope="module")
def peft_net() -> nn.Module:
    torch.manual_seed(0)
    return _peft(Net())


@pytest.mark.parametrize("module", ["lin", "emb", "c1", "c3", "k1d"])
def test_delta_weight_matches_peft_get_delta_weight(peft_net, module):
    layer = getattr(peft_net.base_model.model, module)
    A, B, kind = _factors(layer)
    ours = delta.delta_weight(A, B, layer.scaling["default"], kind)
    theirs = layer.get_delta_weight("default")
    assert ours.shape == layer.get_base_layer().weight.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("module", ["lin", "emb", "c1", "c3", "k1d"])
def test_row_factors_equal_the_whole_delta(peft_net, module):
    """L @ R over the (rows, cols) view is the same delta PEFT computes (conv kxk included)."""
    layer = getattr(peft_net.base_model.model, module)
    A, B, kind = _factors(layer)
    s = layer.scaling["default"]
    term = delta.lora_term(A, B, s, kind)
    whole = delta.delta_weight(A, B, s, kind)
    rows, cols = delta.rows_cols(whole.shape)
    torch.testing.assert_close(term.delta_rows(0, rows), whole.reshape(rows, cols), rtol=1e-6, atol=1e-7)


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
    ours = delta.delta_weight(A, B, layer.scaling["default"], fan_in_fan_out=True)
    assert ours.shape == (6, 9)
    torch.testing.assert_close(ours, layer.get_delta_weight("default"))
    rows = delta.lora_term(A, B, layer.scaling["default"], fan_in_fan_out=True).delta_rows(2, 5)
    torch.testing.assert_close(rows, ours[2:5])


@pytest.mark.parametrize("module", ["lin", "emb", "c1", "c3"])
def test_dora_matches_peft_merge(module):
    torch.manual_seed(0)
    model = _peft(Net(), use_dora=True)
    layer = getattr(model.base_model.model, module)
    A, B, kind = _factors(layer)
    W = layer.get_base_layer().weight.data.clone()
    mag = layer.lora_magnitude_vector["default"].weight.data.clone()
    s = layer.scaling["default"]
    ours = delta.merge_weight(W, [delta.AdapterDelta(A, B, s, kind, magnitude=mag)])
    layer.merge()
    theirs = layer.get_base_layer().weight.data
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # the streaming form: row blocks for per-row channels, one whole block for per-column ones
    term = delta.lora_term(A, B, s, kind, magnitude=mag)
    rows, cols = delta.rows_cols(W.shape)
    work = W.reshape(rows, cols).clone()
    step = rows if delta.needs_whole_tensor([term]) else 2
    for r0 in range(0, rows, step):
        delta.merge_rows_(work[r0 : r0 + step], [term], r0, min(rows, r0 + step))
    torch.testing.assert_close(work.reshape(W.shape), theirs, rtol=1e-5, atol=1e-6)


def test_dora_fan_in_fan_out_normalises_columns():
    """Conv1D + DoRA: one magnitude per output feature, i.e. per column of the stored (in, out) weight."""
    torch.manual_seed(2)
    W = torch.randn(6, 4)  # (in, out)
    A, B = torch.randn(2, 6), torch.randn(4, 2)
    mag = torch.rand(4) + 0.5
    out = delta.merge_weight(W, [delta.AdapterDelta(A, B, 1.5, fan_in_fan_out=True, magnitude=mag)])
    torch.testing.assert_close(out.norm(dim=0), mag)
    term = delta.lora_term(A, B, 1.5, fan_in_fan_out=True, magnitude=mag)
    assert delta.needs_whole_tensor([term])
    with pytest.raises(ValueError):
        delta.merge_rows_(W[2:4].clone(), [term], 2, 4)
    torch.testing.assert_close(delta.merge_rows_(W.clone(), [term], 0, 6), out)


def test_weighted_sum_is_exact_in_fp32_and_rounded_once():
    torch.manual_seed(4)
    W = torch.randn(64, 48).to(torch.bfloat16)
    parts = [
        (torch.randn(4, 48), torch.randn(64, 4), 0.7 * 2.0),
        (torch.randn(8, 48), torch.randn(64, 8), -0.3),
    ]
    ref = W.double() + sum(s * (B.double() @ A.double()) for A, B, s in parts)
    ours = delta.merge_weight(W, [delta.AdapterDelta(A, B, s) for A, B, s in parts])
    assert ours.dtype == torch.bfloat16
    assert max_ulp(ours, ref.to(torch.bfloat16)) <= 1
    # the same through row blocks, in fp32 work rows
    terms = [delta.lora_term(A, B, s) for A, B, s in parts]
    work = W.float()
    for r0 in range(0, 64, 10):
        delta.merge_rows_(work[r0 : r0 + 10], terms, r0, min(64, r0 + 10))
    assert torch.equal(work.to(torch.bfloat16), ours)


def test_lora_bias_term():
    bias = torch.randn(10)
    bB = torch.randn(10)
    work = bias.clone().unsqueeze(1)
    delta.merge_rows_(work, [delta.bias_term(bB, 0.5)], 0, 10)
    torch.testing.assert_close(work.squeeze(1), bias + 0.5 * bB)
    torch.testing.assert_close(delta.lora_bias_delta(bB, 0.5), 0.5 * bB)


def test_compute_dtype():
    assert delta.compute_dtype(torch.bfloat16, torch.float16) == torch.float32
    assert delta.compute_dtype(torch.float64, torch.bfloat16) == torch.float64
    W = torch.randn(5, 3, dtype=torch.float64)
    out = delta.merge_weight(W, [delta.AdapterDelta(torch.randn(1, 3), torch.randn(5, 1), 1.0)])
    assert out.dtype == torch.float64


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError):
        delta.delta_weight(torch.zeros(1, 2), torch.zeros(2, 1), 1.0, "attention")
    with pytest.raises(ValueError):
        delta.lora_term(torch.zeros(1, 2), torch.zeros(2, 1), 1.0, "attention")


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 17),
    cols=st.integers(1, 9),
    rank=st.integers(1, 4),
    step=st.integers(1, 17),
    fifo=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_row_partition_gives_the_whole_tensor_merge(rows, cols, rank, step, fifo, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (cols, rows) if fifo else (rows, cols)
    W = torch.randn(rows, cols, generator=g)
    out_f, in_f = shape
    A, B = torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g)
    expected = W + delta.delta_weight(A, B, 0.25, fan_in_fan_out=fifo)
    term = delta.lora_term(A, B, 0.25, fan_in_fan_out=fifo)
    work = W.clone()
    for r0 in range(0, rows, step):
        delta.merge_rows_(work[r0 : r0 + step], [term], r0, min(rows, r0 + step))
    torch.testing.assert_close(work, expected, rtol=1e-5, atol=1e-5)
