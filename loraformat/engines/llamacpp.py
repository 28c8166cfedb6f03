"""llama.cpp's reading rule for LoRA adapters (spec/interop/llamacpp.md; llama-cpp-python 0.3.36, which vendors
llama.cpp: src/llama-adapter.cpp, src/llama-adapter.h, convert_hf_to_gguf.py, convert_lora_to_gguf.py).

- A GGUF adapter has ``general.type = adapter``, ``general.architecture`` equal to the base's (else "model arch
  and LoRA arch mismatch"), ``adapter.type = lora`` and ``adapter.lora.alpha`` (f32, 0 when absent).
- Tensors are ``<base GGUF tensor name>.lora_a`` / ``.lora_b``; lora_a has the base tensor's ne[0] (in) and
  lora_b its ne[1] (out); for ``token_embd`` A and B are flipped (the converter writes lora_a transposed).
- Scale per tensor pair: ``adapter_scale * alpha / rank`` with rank read from lora_b (``get_scale``); alpha 0
  means ``adapter_scale`` alone. One alpha for the file, the rank per tensor: a per-module scale must be folded
  into lora_b.
- The base converter permutes the q/k rows of Llama-family models (``LlamaModel.permute``); lora_b must get the
  same permutation.

The tensor names come from gguf-py's own TensorNameMap for the architecture; the architecture of a Hugging Face
base comes from its config.json ``architectures`` through the converter classes listed below.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from loraformat.constants import LayerKind
from loraformat.errors import BaseMismatchError
from loraformat.metadata import AdapterMetadata, ModuleEntry
from loraformat.ops.normalize import global_fold_factor

ENGINE_VERSION = "llama-cpp-python 0.3.36 (vendored llama.cpp)"

#: HF architecture -> (GGUF architecture, q/k rows permuted), as the converter classes of llama.cpp's
#: conversion/llama.py (LlamaModel, undo_permute = True) and conversion/qwen.py (Qwen2Model, Qwen3Model) do
HF_ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}
#: GGUF architecture -> q/k rows permuted by the converter (for a GGUF base)
GGUF_ARCHITECTURES = {arch: permuted for arch, permuted in HF_ARCHITECTURES.values()}


@dataclass(frozen=True)
class GgufTarget:
    """What the export needs to know of the base: its GGUF architecture and attention heads, and (from a GGUF
    base) the shapes of its tensors in numpy order, to check the adapter fits before writing anything."""

    arch: str
    block_count: int
    n_head: int
    n_head_kv: int
    permute_qk: bool
    source: str
    tensor_shapes: dict[str, tuple[int, ...]] | None = None


@dataclass(frozen=True)
class TensorPlan:
    """How one module becomes a lora_a / lora_b pair in the GGUF file."""

    module: str
    name: str  # the base tensor's GGUF name, e.g. blk.0.attn_q.weight
    factor: float  # folded into lora_b
    permute: tuple[int, int] | None  # (n_head, n_head_kv) for LlamaModel.permute of lora_b rows
    transpose_a: bool  # token_embd: lora_a is written transposed


def target_from_hf_config(config: dict[str, Any], source: str) -> GgufTarget:
    """The GGUF target of a Hugging Face base from its config.json."""
    archs = config.get("architectures") or []
    hf_arch = archs[0] if archs and isinstance(archs[0], str) else None
    if hf_arch not in HF_ARCHITECTURES:
        supported = ", ".join(sorted(HF_ARCHITECTURES))
        raise BaseMismatchError(
            f"architecture {hf_arch!r} is not supported for GGUF export (supported: {supported})", path=source
        )
    arch, permuted = HF_ARCHITECTURES[hf_arch]
    n_head = int(config["num_attention_heads"])
    return GgufTarget(
        arch=arch,
        block_count=int(config["num_hidden_layers"]),
        n_head=n_head,
        n_head_kv=int(config.get("num_key_value_heads") or n_head),
        permute_qk=permuted,
        source=source,
    )


def global_alpha(meta: AdapterMetadata) -> float:
    """The file's one alpha: the most common module alpha (ties: the smallest), so that for a plain adapter
    every module's fold factor is exactly 1 and lora_b is written unchanged."""
    counts = Counter(m.alpha for m in meta.modules.values())
    top = max(counts.values())
    return float(min(a for a, n in counts.items() if n == top))


#: PEFT saves an adapted embedding's base weight under this suffix; llama.cpp's converter skips it (it is the
#: base's own tensor), and so does the export
BASE_LAYER = ".base_layer.weight"


def unsupported(meta: AdapterMetadata) -> list[tuple[str, str]]:
    """(location, reason) for everything a llama.cpp LoRA cannot represent."""
    out: list[tuple[str, str]] = []
    if meta.dora:
        out.append(("dora", "DoRA (llama.cpp applies plain LoRA pairs only)"))
    saved = meta.modules_to_save or [k for k in sorted(meta.saved_tensors) if not k.endswith(BASE_LAYER)]
    if saved:
        names = ", ".join(saved)
        out.append(("modules_to_save", f"saved full tensors ({names}): llama.cpp loads only lora_a/lora_b"))
    if meta.lora_bias or meta.bias != "none":
        out.append(("bias", f"bias={meta.bias!r}, lora_bias={meta.lora_bias}: llama.cpp has no LoRA bias"))
    for name, entry in sorted(meta.modules.items()):
        if entry.kind == LayerKind.CONV:
            out.append((name, "a conv layer: llama.cpp adapts matrices only"))
    return out


def plan(meta: AdapterMetadata, target: GgufTarget) -> tuple[float, list[TensorPlan], list[str]]:
    """(alpha, one TensorPlan per module, modules with no GGUF tensor for this architecture)."""
    import gguf

    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(target.arch)
    if arch_enum is None:
        raise BaseMismatchError(f"gguf-py does not know architecture {target.arch!r}", path=target.source)
    names = gguf.get_tensor_name_map(arch_enum, target.block_count)
    alpha = global_alpha(meta)
    plans: list[TensorPlan] = []
    unmapped: list[str] = []
    for module, entry in sorted(meta.modules.items()):
        base_tensor = entry.base_tensor.removeprefix("base_model.model.")
        name = names.get_name(base_tensor, try_suffixes=(".weight", ".bias"))
        if name is None:
            unmapped.append(module)
            continue
        plans.append(
            TensorPlan(
                module=module,
                name=name,
                factor=global_fold_factor(meta.scale(module), entry.rank, alpha),
                permute=_permutation(base_tensor, target),
                transpose_a=entry.kind == LayerKind.EMBEDDING,
            )
        )
    return alpha, plans, unmapped


def _permutation(base_tensor: str, target: GgufTarget) -> tuple[int, int] | None:
    """The converter's rule: q_proj rows permuted with (n_head, n_head), k_proj with (n_head, n_head_kv)."""
    if not target.permute_qk:
        return None
    if base_tensor.endswith("q_proj.weight"):
        return (target.n_head, target.n_head)
    if base_tensor.endswith("k_proj.weight"):
        return (target.n_head, target.n_head_kv)
    return None


def expected_shapes(entry: ModuleEntry, transpose_a: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """numpy shapes of (lora_a, lora_b) as written, for an entry of rank r."""
    if transpose_a:  # token_embd: A (r x vocab) written as (vocab x r); B is (hidden x r)
        return (entry.in_features, entry.rank), (entry.out_features, entry.rank)
    return (entry.rank, entry.in_features), (entry.out_features, entry.rank)


def converter_scale(meta: AdapterMetadata, config: dict[str, Any] | None, module: str) -> float:
    """The scale llama.cpp ends up applying when its own convert_lora_to_gguf.py converts the PEFT directory:
    the config's global ``lora_alpha`` over the module's rank; ``use_rslora`` and ``alpha_pattern`` are never
    read."""
    raw = (config or {}).get("lora_alpha")
    alpha = float(raw) if isinstance(raw, (int, float)) else global_alpha(meta)
    return alpha / meta.modules[module].rank
