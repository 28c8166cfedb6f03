"""diffusers LoRA files (``pytorch_lora_weights.safetensors``): what ``save_lora_weights`` /
``save_lora_adapter`` write and ``load_lora_weights`` / ``load_lora_adapter`` read.

Reading rule (spec/interop/diffusers.md): keys are ``<component>.<module path>.<suffix>`` with component one of
names.PIPELINE_COMPONENTS (or no component at all for one model's ``save_lora_adapter`` file); suffixes are PEFT's
``lora_A.weight`` / ``lora_B.weight`` (+ ``lora_magnitude_vector``, ``lora_B.bias``, ``lora_embedding_A/B``),
or the older ``lora.down/up.weight`` and ``lora_linear_layer.down/up.weight``. Rank and alpha come from
``__metadata__["lora_adapter_metadata"]`` (each component's LoraConfig, keys prefixed ``<component>.``) with
PEFT's own pattern rule; without it, a ``<module>.alpha`` scalar, else alpha = rank (diffusers' convention:
scale 1).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from loraformat.constants import (
    DIFFUSERS_METADATA_KEY,
    FORMAT_KEY,
    FORMAT_VALUE,
    KOHYA_DETAILS_KEY,
    KOHYA_TRAINING_PREFIX,
    PEFT_PREFIX,
    PIPELINE_COMPONENTS,
    Format,
)
from loraformat.errors import AdapterError, UsageError
from loraformat.io.header import SafetensorsHeader, TensorInfo
from loraformat.io.kohya import _alpha, _shown
from loraformat.io.names import split_component
from loraformat.io.peft import metadata_from_peft, peft_config_from_metadata
from loraformat.metadata import AdapterMetadata, Provenance

if TYPE_CHECKING:
    import torch


#: file suffix -> canonical (PEFT) suffix
SUFFIXES = {
    ".lora_A.weight": ".lora_A.weight",
    ".lora_B.weight": ".lora_B.weight",
    ".lora_B.bias": ".lora_B.bias",
    ".lora_magnitude_vector": ".lora_magnitude_vector",
    ".lora_embedding_A": ".lora_embedding_A",
    ".lora_embedding_B": ".lora_embedding_B",
    ".lora.down.weight": ".lora_A.weight",
    ".lora.up.weight": ".lora_B.weight",
    ".lora_linear_layer.down.weight": ".lora_A.weight",
    ".lora_linear_layer.up.weight": ".lora_B.weight",
}
ALPHA_SUFFIX = ".alpha"
#: diffusers' oldest attention-processor names (processor.to_q_lora.down.weight) -> module leaf, per family
_OLD_LEAVES = {
    "unet": {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"},
    "text_encoder": {
        "to_q_lora": "q_proj",
        "to_k_lora": "k_proj",
        "to_v_lora": "v_proj",
        "to_out_lora": "out_proj",
    },
}


def is_diffusers_key(key: str) -> bool:
    return (
        any(key.endswith(s) for s in (*SUFFIXES, ALPHA_SUFFIX)) or "_lora.down." in key or "_lora.up." in key
    )


def _old_style(component: str | None, rest: str) -> tuple[str, str] | None:
    """'down_blocks...attn1.processor.to_q_lora.down.weight' -> (module, canonical suffix)."""
    for role, suffix in (("down", ".lora_A.weight"), ("up", ".lora_B.weight")):
        tail = f"_lora.{role}.weight"
        if rest.endswith(tail):
            head, _, leaf = rest[: -len(".down.weight" if role == "down" else ".up.weight")].rpartition(".")
            leaves = _OLD_LEAVES["text_encoder" if (component or "").startswith("text_encoder") else "unet"]
            if leaf in leaves:
                return head.replace(".processor", "") + "." + leaves[leaf], suffix
    return None


def _canonical(key: str) -> tuple[str | None, str, str] | None:
    """(component, module, canonical suffix or '.alpha') of a diffusers key, or None if it does not fit."""
    component, rest = split_component(key)
    for suffix, canonical in (*SUFFIXES.items(), (ALPHA_SUFFIX, ALPHA_SUFFIX)):
        if rest.endswith(suffix) and len(rest) > len(suffix):
            return component, rest[: -len(suffix)], canonical
    old = _old_style(component, rest)
    return (component, *old) if old else None


def _configs(raw: Mapping[str, str], path: str) -> dict[str | None, dict[str, Any]]:
    """Each component's LoraConfig dict from lora_adapter_metadata (None: an unprefixed, one-model file)."""
    text = raw.get(DIFFUSERS_METADATA_KEY)
    if not text:
        return {}
    try:
        packed = json.loads(text)
    except ValueError as exc:
        raise AdapterError(f"{DIFFUSERS_METADATA_KEY} is not valid JSON ({exc})", path=path) from None
    if not isinstance(packed, dict):
        raise AdapterError(f"{DIFFUSERS_METADATA_KEY} is not a JSON object", path=path)
    out: dict[str | None, dict[str, Any]] = {}
    for key, value in packed.items():
        head, _, rest = key.partition(".")
        if head in PIPELINE_COMPONENTS and rest:
            out.setdefault(head, {})[rest] = value
        else:
            out.setdefault(None, {})[key] = value
    return out


def _group(header: SafetensorsHeader) -> tuple[dict[str | None, dict[str, str]], dict[str, str], list[str]]:
    """Per component: canonical stripped key -> file key; alpha keys per qualified module; unplaced keys."""
    groups: dict[str | None, dict[str, str]] = {}
    alphas: dict[str, str] = {}
    unknown: list[str] = []
    for key in header.tensors:
        parts = _canonical(key)
        if parts is None:
            unknown.append(key)
            continue
        component, module, suffix = parts
        if suffix == ALPHA_SUFFIX:
            alphas[f"{component}.{module}" if component else module] = key
            continue
        canonical = f"{PEFT_PREFIX}{module}{suffix}"
        bucket = groups.setdefault(component, {})
        if canonical in bucket:
            raise AdapterError(
                f"{key} and {bucket[canonical]} are the same tensor of {module}", path=header.path
            )
        bucket[canonical] = key
    return groups, alphas, unknown


def read_diffusers(header: SafetensorsHeader, *, name: str) -> tuple[AdapterMetadata, dict[str, str]]:
    """The module table of a diffusers LoRA file and the canonical-key -> file-key map."""
    path = header.path
    groups, alphas, unknown = _group(header)
    if unknown:
        raise AdapterError(
            f"{len(unknown)} keys fit no diffusers LoRA layout (<component>.<module>.lora_A/lora_B.weight, "
            f".lora.down/up.weight, .lora_linear_layer.down/up.weight): {_shown(unknown)}",
            path=path,
        )
    if None in groups and len(groups) > 1:
        raise AdapterError(
            "mixes keys with a component prefix (" + ", ".join(sorted(c for c in groups if c)) + ") and keys "
            f"without one ({_shown(groups[None].values())})",
            path=path,
        )
    configs = _configs(header.metadata, path)
    parts, names = [], {}
    for component, keys in sorted(groups.items(), key=lambda kv: kv[0] or ""):
        infos = {k: TensorInfo(k, *_shape_of(header, v), 0, 0) for k, v in keys.items()}
        config = configs.get(component)
        part = metadata_from_peft(config or {"r": 1, "lora_alpha": 1}, infos, name=name, path=path)
        qual = f"{component}." if component else ""
        if config is None:
            _tensor_ranks_and_alphas(header, keys, alphas, part, qual)
        parts.append((qual, part))
        names.update({PEFT_PREFIX + qual + k[len(PEFT_PREFIX) :]: v for k, v in keys.items()})
    if alphas:
        raise AdapterError(
            f"alpha scalars for modules without LoRA tensors: {_shown(alphas.values())}", path=path
        )
    meta = _combine(parts, name, path)
    training = {k: v for k, v in header.metadata.items() if k.startswith(KOHYA_TRAINING_PREFIX)}
    if training and meta.provenance is not None:
        meta.provenance.details[KOHYA_DETAILS_KEY] = training
    return meta, names


def _tensor_ranks_and_alphas(
    header: SafetensorsHeader,
    keys: dict[str, str],
    alphas: dict[str, str],
    part: AdapterMetadata,
    qual: str,
) -> None:
    """Without lora_adapter_metadata: rank from lora_A's rows, alpha from a ``.alpha`` scalar or = rank."""
    for module, entry in part.modules.items():
        prefix = PEFT_PREFIX + module
        a_key = keys.get(f"{prefix}.lora_A.weight") or keys.get(f"{prefix}.lora_embedding_A")
        shape = header.tensors[a_key].shape if a_key else ()
        entry.rank = shape[0] if shape else entry.rank
        alpha_key = alphas.pop(qual + module, "")
        entry.alpha = _alpha(header.path, header.tensors.get(alpha_key), entry.rank, qual + module)


def _shape_of(header: SafetensorsHeader, key: str) -> tuple[str, tuple[int, ...]]:
    info = header.tensors[key]
    return info.dtype, info.shape


def _combine(parts: list[tuple[str, AdapterMetadata]], name: str, path: str) -> AdapterMetadata:
    """One module table from the components' tables (scaling, DoRA and lora_bias must agree)."""
    first = parts[0][1]
    for attr in ("scaling", "dora", "lora_bias"):
        values = {getattr(p, attr) for _, p in parts}
        if len(values) > 1:
            raise AdapterError(f"components disagree on {attr} ({sorted(map(str, values))})", path=path)
    modules = {}
    for qual, part in parts:
        for module, entry in part.modules.items():
            entry.base_tensor = qual + entry.base_tensor
            modules[qual + module] = entry
    return AdapterMetadata(
        modules=modules,
        scaling=first.scaling,
        dora=first.dora,
        lora_bias=first.lora_bias,
        name=name,
        created_by={"tool": "diffusers", "version": "unknown"},
        provenance=Provenance(method="convert", source_format=Format.DIFFUSERS),
    )


# --- writing -------------------------------------------------------------------------------------------------


def component_metadata(meta: AdapterMetadata) -> dict[str | None, AdapterMetadata]:
    """The adapter split per component, module names relative to the component's model."""
    import copy

    out: dict[str | None, AdapterMetadata] = {}
    for module, entry in meta.modules.items():
        component, rest = split_component(module)
        part = out.setdefault(component, copy.copy(meta))
        if part.modules is meta.modules:
            part.modules = {}
        part.modules[rest] = entry
    return out


def diffusers_tensors(meta: AdapterMetadata, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The diffusers state dict: canonical ``base_model.model.<component>.<path>.<suffix>`` keys lose the PEFT
    prefix, which leaves diffusers' own ``<component>.<path>.<suffix>``."""
    if meta.saved_tensors:
        raise UsageError(
            "diffusers LoRA files carry no saved whole tensors (modules_to_save, biases); "
            "convert --to peft or loraformat"
        )
    return {k[len(PEFT_PREFIX) :]: t for k, t in tensors.items()}


def adapter_metadata_entry(meta: AdapterMetadata) -> dict[str, Any]:
    """``lora_adapter_metadata``: each component's LoraConfig (PEFT's pattern rule), keys prefixed as diffusers'
    _pack_dict_with_prefix does; an unprefixed adapter gets its config unprefixed."""
    packed: dict[str, Any] = {}
    for component, part in component_metadata(meta).items():
        config = peft_config_from_metadata(part)
        for drop in ("base_model_name_or_path", "revision", "task_type", "modules_to_save", "inference_mode"):
            config.pop(drop, None)
        config["peft_type"] = "LORA"
        for key, value in config.items():
            packed[f"{component}.{key}" if component else key] = value
    return packed


def write_diffusers(
    path: str | os.PathLike[str],
    meta: AdapterMetadata,
    tensors: Mapping[str, torch.Tensor],
    *,
    overwrite: bool = False,
) -> str:
    """Write a diffusers LoRA file atomically (kohya training metadata kept); returns its content hash."""
    from loraformat.io.kohya import training_metadata
    from loraformat.io.native import encode_tensors, write_encoded

    encoded = encode_tensors(diffusers_tensors(meta, tensors))
    metadata = {
        FORMAT_KEY: FORMAT_VALUE,
        DIFFUSERS_METADATA_KEY: json.dumps(adapter_metadata_entry(meta), indent=2, sort_keys=True),
    }
    if meta.provenance and KOHYA_DETAILS_KEY in meta.provenance.details:
        metadata.update(training_metadata(meta))
    write_encoded(path, encoded, metadata, overwrite=overwrite)
    return encoded.content_hash
