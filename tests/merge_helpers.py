"""Oracles and comparisons shared by the merge tests: PEFT's own merge, ulp distances, raw tensor bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from loraformat.io.checkpoint import open_checkpoint
from loraformat.ops.term import Term, lora_factors, rows_cols


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place of the common dtype (bf16, fp16, fp32, fp64).

    The bit patterns are mapped to integers that increase with the value (negative floats mirrored), so the
    difference counts the representable numbers between a and b; +0 and -0 are the same point.
    """
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    int_of = {
        torch.bfloat16: torch.int16,
        torch.float16: torch.int16,
        torch.float32: torch.int32,
        torch.float64: torch.int64,
    }[a.dtype]
    bits = a.dtype.itemsize * 8

    def ordered(x: torch.Tensor) -> torch.Tensor:
        i = x.contiguous().view(int_of).to(torch.int64)
        mag = i & ((1 << (bits - 1)) - 1)
        return torch.where(i < 0, -mag, mag)

    return (ordered(a) - ordered(b)).abs()


def max_ulp(a: torch.Tensor, b: torch.Tensor) -> int:
    return int(ulp_distance(a, b).max()) if a.numel() else 0


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory or file (any sharding), copied into memory."""
    from safetensors.torch import load_file

    ck = open_checkpoint(path)
    out: dict[str, torch.Tensor] = {}
    for shard in ck.shards:
        out.update(load_file(shard.path))
    return out


def raw_bytes(path: Path, name: str) -> bytes:
    ck = open_checkpoint(path)
    shard, info = ck.locations[name]
    with open(shard.path, "rb") as f:
        f.seek(info.start)
        return f.read(info.nbytes)


def peft_merged(
    base: Path, adapters: list[Path], weights: list[float] | None = None
) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload on CPU: the state dict our merge must reproduce (names as in the base)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], 1):
        peft_model.load_adapter(path, adapter_name=f"a{i}")
    if len(adapters) > 1:
        peft_model.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    merged = peft_model.merge_and_unload()
    state = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    return state


def logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    with torch.no_grad():
        return model(ids).logits.float()


def peft_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    model.eval()
    with torch.no_grad():
        return model(ids).logits.float()


def assert_close_to(ours: torch.Tensor, ref: torch.Tensor, name: str, *, max_ulps: int = 1) -> None:
    """bf16/fp16: at most ``max_ulps`` apart (PEFT may round twice); fp32/fp64: tight allclose."""
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    ref = ref.to(ours.dtype)
    if ours.dtype in (torch.bfloat16, torch.float16):
        d = max_ulp(ours, ref)
        assert d <= max_ulps, f"{name}: {d} ulps apart"
    else:
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def fp64_reference(
    base: dict[str, torch.Tensor], adapters: list[Any], weights: list[float]
) -> dict[str, Any]:
    """W + sum_i w_i s_i B_i A_i computed independently in fp64 for plain linear adapters (Adapter objects)."""
    out = {k: v.double() for k, v in base.items()}
    for adapter, w in zip(adapters, weights, strict=True):
        for module, entry in adapter.modules.items():
            A = adapter.lora_A(module).double()
            B = adapter.lora_B(module).double()
            out[entry.base_tensor] = out[entry.base_tensor] + w * adapter.scale(module) * (B @ A)
    return out


def exact_and_bound(
    W: torch.Tensor, terms: list[Term], out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged weight in fp64 and the documented bound of a kernel's error (ops/kernel.py): a full ulp of
    the output (the one rounding, plus the fp32 error pushing a value across a boundary) + for each term
    (r + 2) * eps * (|L| @ |s R|) (its product and the scaled factor) + eps * |work| for each addition."""
    work_dtype = torch.float64 if torch.float64 in (W.dtype, out_dtype) else torch.float32
    eps = torch.finfo(work_dtype).eps
    exact = W.double().reshape(rows_cols(W.shape))
    err = torch.zeros_like(exact)
    for t in terms:
        L, R = lora_factors(t.A.double(), t.B.double(), t.kind, t.fan_in_fan_out)
        exact = exact + L @ (t.scale * R)
        err += (t.A.shape[0] + 2) * eps * (L.abs() @ (abs(t.scale) * R.abs()))
    err += len(terms) * eps * exact.abs()
    rounded = exact.to(out_dtype)
    ulp = (
        torch.nextafter(rounded.abs(), torch.tensor(float("inf"), dtype=out_dtype)) - rounded.abs()
    ).double()
    return exact.reshape(W.shape), (err + ulp).reshape(W.shape)


def assert_within_bound(got: torch.Tensor, W: torch.Tensor, terms: list[Term]) -> None:
    exact, bound = exact_and_bound(W, terms, got.dtype)
    excess = (got.double() - exact).abs() - bound
    assert excess.max() <= 0, f"{int((excess > 0).sum())} elements beyond the bound, worst {excess.max():.3g}"
