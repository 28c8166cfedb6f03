"""``loraformat inspect``: what an adapter is, from its header alone (no tensor data read, no torch import).

Parameter counts come from the tensor shapes in the header; the reduction is measured against full fine-tuning
of exactly the targeted base weights (spec/v1.md §Container's worked example: a 512x64 weight at rank 8 trains
4,608 parameters instead of 32,768, 86% fewer).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from loraformat.adapter import Adapter, open_adapter
from loraformat.constants import KOHYA_DETAILS_KEY, KOHYA_TRAINING_PREFIX, Format


def inspect(
    path: str | os.PathLike[str],
    *,
    config: str | os.PathLike[str] | dict[str, Any] | None = None,
    allow_pickle: bool = False,
    base: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Describe an adapter as a JSON-ready dict (``base`` resolves kohya names). Raises the typed open errors
    for a broken adapter."""
    with open_adapter(path, config=config, allow_pickle=allow_pickle, base=base) as adapter:
        return describe(adapter)


@dataclass
class _Counts:
    """Per-module rows and parameter counts of an adapter (its LoRA factors, DoRA magnitudes and LoRA biases,
    and the full fine-tuning it replaces)."""

    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    targets: dict[str, Counter[str]] = field(default_factory=dict)
    lora: int = 0
    extra: int = 0
    full: int = 0


def _count(adapter: Adapter) -> _Counts:
    meta, infos, c = adapter.meta, adapter.source.infos, _Counts()
    for name, entry in sorted(meta.modules.items()):
        keys = adapter.keys(name)
        n = sum(infos[k].numel for k in (keys.A, keys.B))
        c.lora += n
        c.extra += sum(infos[k].numel for k in (keys.magnitude, keys.bias) if k is not None and k in infos)
        c.full += math.prod(entry.base_shape)
        c.targets.setdefault(entry.kind, Counter())[name.rsplit(".", 1)[-1]] += 1
        c.modules[name] = {
            "kind": entry.kind,
            "rank": entry.rank,
            "alpha": entry.alpha,
            "scale": meta.scale(name),
            "in_features": entry.in_features,
            "out_features": entry.out_features,
            "base_tensor": entry.base_tensor,
            "fan_in_fan_out": entry.fan_in_fan_out,
            "parameters": n,
        }
    return c


def describe(adapter: Adapter) -> dict[str, Any]:
    meta = adapter.meta
    infos = adapter.source.infos
    c = _count(adapter)
    lora, extra, full, targets, modules = c.lora, c.extra, c.full, c.targets, c.modules
    saved = sum(infos[k].numel for k in meta.saved_tensors if k in infos)
    trainable = lora + extra
    reduction = 1 - trainable / full if full else 0.0
    bm = meta.base_model
    native = adapter.source_format == Format.LORAFORMAT
    return {
        "path": adapter.path,
        "file": adapter.source.path,
        "file_size": adapter.file_size,
        "source_format": adapter.source_format,
        "spec_version": meta.spec_version if native else None,
        "name": meta.name,
        "description": meta.description,
        "task": meta.task,
        "license": meta.license,
        "created": meta.created if native else None,
        "created_by": meta.created_by,
        "base_model": {
            "id": bm.id,
            "revision": bm.revision,
            "structure_hash": bm.structure_hash,
            "content_hash": bm.content_hash,
            "hash_algorithm": bm.hash_algorithm,
            "target_digests": len(bm.target_digests),
            "quantization": bm.quantization.to_dict() if bm.quantization else None,
        },
        "content_hash": meta.content_hash if native else None,
        "scaling": meta.scaling,
        "ranks": meta.ranks,
        "alphas": meta.alphas,
        "scales": sorted({meta.scale(m) for m in meta.modules}),
        "dora": meta.dora,
        "bias": meta.bias,
        "lora_bias": meta.lora_bias,
        "fan_in_fan_out": any(m.fan_in_fan_out for m in meta.modules.values()),
        "modules_to_save": list(meta.modules_to_save),
        "targets": {kind: dict(sorted(c.items())) for kind, c in sorted(targets.items())},
        "module_count": len(meta.modules),
        "vllm_max_lora_rank": _vllm_cap(adapter),
        "parameters": {
            "lora": lora,
            "dora_and_bias": extra,
            "trainable": trainable,
            "full_fine_tuning": full,
            "reduction": reduction,
            "summary": reduction_text(trainable, full),
            "saved_tensors": saved,
        },
        "tensors": len(infos),
        "dtypes": dict(sorted(Counter(i.dtype for i in infos.values()).items())),
        "provenance": meta.provenance.to_dict() if meta.provenance else None,
        "components": _components(adapter),
        "kohya_training": _kohya_training(adapter),
        "modules": modules,
    }


def _components(adapter: Adapter) -> dict[str, int]:
    """Modules per diffusion-pipeline component, for adapters from the diffusion world (a GPT-2 adapter's
    ``transformer.h.0...`` paths are not a pipeline component)."""
    from loraformat.io.names import split_component

    diffusion = (Format.KOHYA, Format.DIFFUSERS)
    prov = adapter.meta.provenance
    if adapter.source_format not in diffusion and (prov is None or prov.source_format not in diffusion):
        return {}
    counts = Counter(split_component(m)[0] for m in adapter.meta.modules)
    return {c: n for c, n in sorted(counts.items()) if c is not None}


def _kohya_training(adapter: Adapter) -> dict[str, Any] | None:
    """ss_* training metadata (of the file, or kept in the provenance of a converted one), in plain words."""
    from loraformat.io import kohya
    from loraformat.io.native import data_section_hash
    from loraformat.io.tensors import SafetensorsSource

    raw = adapter.raw_metadata
    prov = adapter.meta.provenance
    if not any(k.startswith(KOHYA_TRAINING_PREFIX) for k in raw) and prov is not None:
        raw = prov.details.get(KOHYA_DETAILS_KEY) or {}
    if not any(k.startswith(KOHYA_TRAINING_PREFIX) for k in raw) and "sshs_model_hash" not in raw:
        return None
    src = adapter.source
    data_hash = None
    if "sshs_model_hash" in raw and isinstance(src, SafetensorsSource) and raw is adapter.raw_metadata:
        data_hash = data_section_hash(src.path, src.header.data_start)
    return kohya.describe_training(raw, data_hash)


def _vllm_cap(adapter: Adapter) -> int | None:
    """The max_lora_rank a vLLM server needs for this adapter (None: above vLLM's largest, 512)."""
    from loraformat.engines.vllm import config_max_rank, round_up_rank

    config = adapter.peft_config if adapter.source_format != "loraformat" else None
    return round_up_rank(config_max_rank(adapter.meta, config))


def reduction_text(trainable: int, full: int) -> str:
    """'4,608 vs 32,768: 86% fewer' — trainable parameters against full fine-tuning of the targeted weights."""
    if not full:
        return f"{trainable:,} trainable"
    pct = (1 - trainable / full) * 100
    word = "fewer" if pct >= 0 else "more"
    return f"{trainable:,} vs {full:,}: {abs(pct):.0f}% {word}"


def quantization_text(q: dict[str, Any] | None) -> str:
    """'bnb-nf4 (block 64, double quant, compute bfloat16; from config)', or '16-bit weights (not quantized)'."""
    if not q:
        return "16-bit weights (no quantization recorded)"
    details = []
    block = q.get("block_size")
    if block is not None:
        details.append(
            "block " + ("x".join(str(b) for b in block) if isinstance(block, list) else str(block))
        )
    if q.get("scale_layout"):
        details.append(f"{q['scale_layout']} scales")
    if q.get("double_quant"):
        details.append("double quant")
    if q.get("compute_dtype"):
        details.append(f"compute {q['compute_dtype']}")
    text = ", ".join(details) + (f"; from {q['source']}" if q.get("source") else "")
    return f"{q.get('method')}" + (f" ({text})" if text else "")


def _short(h: str | None) -> str:
    return h[:16] + "…" if h else "-"


def _join(values: list[Any]) -> str:
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) or "-"


def format_text(d: dict[str, Any]) -> str:
    """The human view of :func:`describe`'s dict, one fact a line."""
    from loraformat.cli.common import human_bytes

    bm = d["base_model"]
    params = d["parameters"]
    fmt = d["source_format"] + (f" (spec {d['spec_version']})" if d["spec_version"] else "")
    targets = "; ".join(
        f"{kind}: " + ", ".join(f"{leaf} x{n}" for leaf, n in leaves.items())
        for kind, leaves in d["targets"].items()
    )
    extras = [
        x
        for x, on in (
            ("DoRA", d["dora"]),
            ("lora_bias", d["lora_bias"]),
            ("fan_in_fan_out", d["fan_in_fan_out"]),
        )
        if on
    ]
    lines = [
        f"adapter      {d['name']}  [{d['path']}]",
        f"format       {fmt}",
        f"base         {bm['id'] or '-'}" + (f" @ {bm['revision']}" if bm["revision"] else ""),
        f"  structure  {_short(bm['structure_hash'])}",
        f"  content    {_short(bm['content_hash'])}"
        + (
            f" ({bm['hash_algorithm']}, {bm['target_digests']} target digests)"
            if bm["hash_algorithm"]
            else ""
        ),
        f"  trained on {quantization_text(bm['quantization'])}",
        f"rank         {_join(d['ranks'])}",
        f"alpha        {_join(d['alphas'])}",
        f"scaling      {d['scaling']} = {_join(d['scales'])}",
        f"options      bias={d['bias']}" + (", " + ", ".join(extras) if extras else ""),
        f"targets      {d['module_count']} modules ({targets})",
        f"vllm         needs --max-lora-rank {d['vllm_max_lora_rank'] or '> 512 (above vLLM: use convert --max-rank)'}",
    ]
    if d["modules_to_save"]:
        lines.append(
            f"saved        {', '.join(d['modules_to_save'])} ({params['saved_tensors']:,} parameters)"
        )
    lines += [
        f"parameters   {params['summary']} than full fine-tuning of the targeted weights",
        f"file         {human_bytes(d['file_size'])}, {d['tensors']} tensors, "
        + ", ".join(f"{k} x{v}" for k, v in d["dtypes"].items()),
    ]
    if d["content_hash"]:
        lines.append(f"content      {d['content_hash']}")
    if d["description"]:
        lines.append(f"description  {d['description']}")
    lines += _provenance_lines(d["provenance"])
    if d.get("components"):
        lines.append("components   " + ", ".join(f"{c} ({n} modules)" for c, n in d["components"].items()))
    lines += _kohya_lines(d.get("kohya_training"))
    if d["created"]:
        by = d["created_by"]
        lines.append(
            f"created      {d['created']}" + (f" by {by.get('tool')} {by.get('version')}" if by else "")
        )
    return "\n".join(lines)


def _provenance_lines(prov: dict[str, Any] | None) -> list[str]:
    if not prov:
        return []
    parents = ", ".join(
        f"{p.get('name') or _short(p.get('content_hash'))} x{p.get('weight')}"
        for p in prov.get("parents", [])
    )
    return [
        f"provenance   {prov.get('method')}"
        + (f" from {prov['source_format']}" if prov.get("source_format") else "")
        + (f" of {parents}" if parents else "")
    ]


def _kohya_lines(training: dict[str, Any] | None) -> list[str]:
    """kohya sd-scripts' training metadata, and whether its stored model hash still matches the tensors."""
    if not training:
        return []
    lines = ["training     kohya sd-scripts metadata:"]
    lines += [f"  {k:<28} {v}" for k, v in training["fields"].items()]
    if training["other_keys"]:
        lines.append(f"  {'other ss_* keys':<28} {len(training['other_keys'])}")
    state = training["sshs_model_hash_state"]
    if training["sshs_model_hash"]:
        what = {"matches": "matches the tensor data", "stale": "STALE: does not match the tensor data"}
        lines.append(f"  {'sshs_model_hash':<28} {training['sshs_model_hash'][:16]}… {what.get(state, '')}")
    return lines
