"""kohya sd-scripts LoRA files (networks/lora.py), the layout Civitai, ComfyUI and A1111 exchange.

Reading rule (spec/interop/kohya.md): ``<prefix><module path with _>.lora_down.weight`` (r x in[, k, k]) is
lora_A, ``.lora_up.weight`` (out x r[, 1, 1]) is lora_B, the scalar ``.alpha`` gives scale = alpha / r, and a
missing or zero alpha means alpha = r. Prefixes name the pipeline component (names.KOHYA_PREFIXES). The
underscored path is resolved against real module names (names.py); the ``ss_*`` training metadata is kept in
the provenance so that a later kohya export writes it back, with ``sshs_*`` hashes recomputed on every write.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from loraformat.constants import (
    FORMAT_KEY,
    FORMAT_VALUE,
    KOHYA_DETAILS_KEY,
    KOHYA_PLAIN_WORDS,
    KOHYA_PREFIXES,
    KOHYA_TRAINING_PREFIX,
    PEFT_PREFIX,
    Format,
    LayerKind,
)
from loraformat.errors import AdapterError, UsageError
from loraformat.io.header import SafetensorsHeader, TensorInfo
from loraformat.io.names import (
    NameIndex,
    base_indexes,
    family,
    split_component,
    template_index,
)
from loraformat.metadata import AdapterMetadata, ModuleEntry, Provenance

if TYPE_CHECKING:
    import torch

ROLES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
#: kohya names CLIP text encoder modules from CLIPTextModel.text_model; transformers 5 saves CLIPTextModel
#: without that level, so a base's "encoder.layers.0..." is kohya's "text_model_encoder_layers_0_..."
CLIP_ROOT, CLIP_LAYERS = "text_model_", "encoder.layers."
_SHOWN = 5


def is_kohya_key(key: str) -> bool:
    return key.startswith(tuple(KOHYA_PREFIXES))


def _split(key: str) -> tuple[str, str, str] | None:
    """(prefix, underscored path, role) of a kohya key, or None when it does not fit the layout."""
    prefix = max((p for p in KOHYA_PREFIXES if key.startswith(p)), key=len, default=None)
    if prefix is None:
        return None
    for suffix, role in ROLES.items():
        if key.endswith(suffix) and len(key) > len(prefix) + len(suffix):
            stem = key[len(prefix) : -len(suffix)]
            if "." not in stem:
                return prefix, stem, role
    return None


def _shown(items: Iterable[str]) -> str:
    items = sorted(items)
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def _scalar(path: str, info: TensorInfo) -> float:
    """The value of a one-element alpha tensor, decoded from the file's bytes (no torch needed)."""
    formats = {"F32": "<f", "F64": "<d", "F16": "<e"}
    with open(path, "rb") as f:
        f.seek(info.start)
        raw = f.read(info.end - info.start)
    if info.dtype == "BF16":
        return float(struct.unpack("<f", b"\x00\x00" + raw)[0])
    if info.dtype in formats:
        return float(struct.unpack(formats[info.dtype], raw)[0])
    if info.dtype in ("I64", "I32"):
        return float(int.from_bytes(raw, "little", signed=True))
    raise AdapterError(f"alpha tensor {info.name!r} has dtype {info.dtype}, not a number", path=path)


def _group(header: SafetensorsHeader, path: str) -> dict[tuple[str, str], dict[str, str]]:
    groups: dict[tuple[str, str], dict[str, str]] = {}
    unknown = []
    for key in header.tensors:
        parts = _split(key)
        if parts is None:
            unknown.append(key)
            continue
        groups.setdefault(parts[:2], {})[parts[2]] = key
    if unknown:
        raise AdapterError(
            f"kohya file has {len(unknown)} keys outside the kohya LoRA layout (<lora_unet_|lora_te[123]_>"
            f"<path>.lora_down.weight/.lora_up.weight/.alpha): {_shown(unknown)}",
            path=path,
        )
    for (prefix, stem), roles in sorted(groups.items()):
        name = prefix + stem
        if "down" not in roles:
            raise AdapterError(f"{name}: has no lora_down.weight (lora_up or alpha without it)", path=path)
        if "up" not in roles:
            raise AdapterError(f"{name}: lora_down.weight has no matching lora_up.weight", path=path)
    return groups


def _component(prefix: str, indexes: Mapping[str, NameIndex]) -> str:
    component = KOHYA_PREFIXES[prefix]
    if component == "unet" and "unet" not in indexes and "transformer" in indexes:
        return "transformer"
    return component


def _resolve(
    groups: Iterable[tuple[str, str]], indexes: Mapping[str, NameIndex], path: str
) -> dict[tuple[str, str], str]:
    """Each (prefix, underscored path) -> 'component.dotted.path', refusing unplaced or ambiguous names."""
    out: dict[tuple[str, str], str] = {}
    unplaced: list[str] = []
    for prefix, stem in groups:
        component = _component(prefix, indexes)
        base_index = indexes.get(component) or indexes.get("*")
        index = base_index or template_index(family(component))
        found = index.candidates(stem) if index is not None else []
        if not found and base_index is not None and stem.startswith(CLIP_ROOT):
            found = base_index.candidates(stem[len(CLIP_ROOT) :])  # a CLIP saved without text_model.
        if len(found) > 1:
            raise AdapterError(
                f"{prefix}{stem}: ambiguous, it can be any of {', '.join(found)}; give the base with --base",
                path=path,
            )
        if not found:
            unplaced.append(prefix + stem)
            continue
        out[(prefix, stem)] = f"{component}.{found[0]}"
    if unplaced:
        where = (
            "the base's modules" if indexes else "the known diffusion architectures' modules (give --base)"
        )
        raise AdapterError(
            f"cannot place {len(unplaced)} kohya modules: no module of {where} matches {_shown(unplaced)}",
            path=path,
        )
    return out


def _alpha(path: str, info: TensorInfo | None, rank: int, name: str) -> float:
    if info is None:
        return float(rank)
    if math.prod(info.shape) != 1 or len(info.shape) > 1:
        raise AdapterError(f"{name}.alpha has shape {list(info.shape)}; kohya alpha is a scalar", path=path)
    value = _scalar(path, info)
    if not math.isfinite(value) or value < 0:
        raise AdapterError(f"{name}.alpha is {value}; alpha must be a finite positive number", path=path)
    return value if value != 0 else float(rank)  # sd-scripts: alpha 0 or missing means alpha = dim


def read_kohya(
    header: SafetensorsHeader, *, name: str, base_modules: Mapping[str, Iterable[str]] | None = None
) -> tuple[AdapterMetadata, dict[str, str]]:
    """The module table of a kohya file and the canonical-key -> file-key map (alpha scalars folded in)."""
    path = header.path
    groups = _group(header, path)
    placed = _resolve(groups, base_indexes(base_modules or {}), path)
    modules: dict[str, ModuleEntry] = {}
    names: dict[str, str] = {}
    for key, module in placed.items():
        roles = groups[key]
        down, up = header.tensors[roles["down"]], header.tensors[roles["up"]]
        if module in modules:
            raise AdapterError(f"{key[0]}{key[1]}: a second kohya name for module {module}", path=path)
        rank = down.shape[0] if down.shape else 0
        conv = len(down.shape) > 2
        modules[module] = ModuleEntry(
            kind=LayerKind.CONV if conv else LayerKind.LINEAR,
            rank=rank,
            alpha=_alpha(path, header.tensors.get(roles.get("alpha", "")), rank, key[0] + key[1]),
            in_features=down.shape[1] if len(down.shape) > 1 else 0,
            out_features=up.shape[0] if up.shape else 0,
            base_tensor=f"{module}.weight",
            kernel_size=list(down.shape[2:]) if conv else None,
        )
        names[f"{PEFT_PREFIX}{module}.lora_A.weight"] = roles["down"]
        names[f"{PEFT_PREFIX}{module}.lora_B.weight"] = roles["up"]
    raw = header.metadata
    training = {k: v for k, v in raw.items() if k.startswith(KOHYA_TRAINING_PREFIX)}
    meta = AdapterMetadata(
        modules=modules,
        name=raw.get("ss_output_name") or name,
        created_by={"tool": "kohya sd-scripts", "version": raw.get("ss_sd_scripts_commit_hash", "unknown")},
        provenance=Provenance(
            method="convert", source_format=Format.KOHYA, details={KOHYA_DETAILS_KEY: training}
        ),
    )
    return meta, names


# --- writing -------------------------------------------------------------------------------------------------


def kohya_prefix(component: str, components: set[str]) -> str:
    if component == "unet":
        return "lora_unet_"
    if component == "text_encoder":
        return "lora_te1_" if "text_encoder_2" in components else "lora_te_"
    if component in ("text_encoder_2", "text_encoder_3"):
        return f"lora_te{component[-1]}_"
    raise UsageError(
        f"kohya has no key prefix for diffusers {component} module names that diffusers or ComfyUI read "
        "back (kohya's SD3/Flux files use the original model's names); convert --to diffusers instead"
    )


def refuse_unsupported(meta: AdapterMetadata) -> None:
    """kohya LoRA files hold lora_down/lora_up/alpha only: refuse what they cannot carry."""
    why = [
        what
        for what, on in (
            ("DoRA magnitudes", meta.dora),
            ("lora_bias", meta.lora_bias),
            ("saved whole tensors (modules_to_save, biases)", bool(meta.saved_tensors)),
            ("embedding LoRA", any(m.kind == LayerKind.EMBEDDING for m in meta.modules.values())),
        )
        if on
    ]
    if why:
        raise UsageError(f"the kohya layout cannot carry {', '.join(why)}; convert --to diffusers or peft")
    missing = sorted(m for m in meta.modules if split_component(m)[0] is None)
    if missing:
        raise UsageError(
            f"kohya keys name a pipeline component, but {_shown(missing)} has none; convert with "
            "--component unet (or text_encoder, ...) to say which model the adapter is for"
        )


def kohya_alpha(meta: AdapterMetadata, module: str) -> float:
    """The kohya alpha (scale = alpha / r) that gives the module's own scale; exact for alpha/r adapters."""
    from loraformat.ops.scaling import alpha_for_standard_rule

    entry = meta.modules[module]
    return alpha_for_standard_rule(meta.scaling, entry.rank, entry.alpha)


def kohya_tensors(meta: AdapterMetadata, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The kohya state dict of an adapter (canonical PEFT keys in ``tensors``)."""
    import torch

    refuse_unsupported(meta)
    components = {split_component(m)[0] or "" for m in meta.modules}
    out: dict[str, torch.Tensor] = {}
    for module in sorted(meta.modules):
        component, rest = split_component(module)
        assert component is not None
        if component.startswith("text_encoder") and rest.startswith(CLIP_LAYERS):
            rest = CLIP_ROOT + rest  # kohya's (and ComfyUI's, A1111's) spelling of a CLIP module
        stem = kohya_prefix(component, components) + rest.replace(".", "_")
        out[f"{stem}.lora_down.weight"] = tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"]
        out[f"{stem}.lora_up.weight"] = tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"]
        alpha = kohya_alpha(meta, module)
        dtype = torch.float32 if float(torch.tensor(alpha, dtype=torch.float32)) == alpha else torch.float64
        out[f"{stem}.alpha"] = torch.tensor(alpha, dtype=dtype)
    if len(out) != 3 * len(meta.modules):
        raise UsageError("two modules map to the same kohya name; the kohya layout cannot hold this adapter")
    return out


def training_metadata(meta: AdapterMetadata) -> dict[str, str]:
    """ss_* keys for the file: the recorded training metadata, with rank/alpha/name updated to the adapter."""
    details = meta.provenance.details if meta.provenance else {}
    kept = details.get(KOHYA_DETAILS_KEY) if isinstance(details, dict) else None
    out = {
        k: v for k, v in (kept or {}).items() if isinstance(v, str) and k.startswith(KOHYA_TRAINING_PREFIX)
    }
    ranks = Counter(m.rank for m in meta.modules.values())
    alphas = Counter(kohya_alpha(meta, m) for m in meta.modules)
    out["ss_network_module"] = out.get("ss_network_module", "networks.lora")
    out["ss_network_dim"] = str(ranks.most_common(1)[0][0])
    out["ss_network_alpha"] = _num_text(alphas.most_common(1)[0][0])
    out.setdefault("ss_output_name", meta.name)
    return out


def _num_text(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def describe_training(raw: Mapping[str, str], data_hash: str | None) -> dict[str, Any]:
    """kohya training metadata in plain words, and whether the file's sshs_model_hash is its data's."""
    shown = {KOHYA_PLAIN_WORDS[k]: raw[k] for k in KOHYA_PLAIN_WORDS if raw.get(k) not in (None, "", "None")}
    others = sorted(k for k in raw if k.startswith(KOHYA_TRAINING_PREFIX) and k not in KOHYA_PLAIN_WORDS)
    recorded = raw.get("sshs_model_hash")
    state = (
        None if recorded is None or data_hash is None else ("matches" if recorded == data_hash else "stale")
    )
    return {
        "fields": shown,
        "other_keys": others,
        "sshs_model_hash": recorded,
        "sshs_model_hash_state": state,
    }


def sshs_hashes(tensors: Mapping[str, torch.Tensor], training: Mapping[str, str]) -> dict[str, str]:
    """sd-scripts' precalculate_safetensors_hashes: hashes of a re-save carrying only the ss_* metadata, so
    they never depend on other metadata. sshs_model_hash: sha256 of the data after the header;
    sshs_legacy_hash: first 8 hex digits of sha256 of 64 KiB at offset 1 MiB."""
    import safetensors.torch

    blob = safetensors.torch.save(dict(tensors), metadata=dict(training))
    n = int.from_bytes(blob[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(blob[8 + n :]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8],
    }


def write_kohya(
    path: str | os.PathLike[str],
    meta: AdapterMetadata,
    tensors: Mapping[str, torch.Tensor],
    *,
    overwrite: bool = False,
) -> str:
    """Write the kohya file atomically; returns its sshs_model_hash (= sha256 of the data section)."""
    from loraformat.io.native import encode_tensors, write_encoded

    state = kohya_tensors(meta, tensors)
    training = training_metadata(meta)
    hashes = sshs_hashes(state, training)
    encoded = encode_tensors(state)
    metadata: dict[str, Any] = {FORMAT_KEY: FORMAT_VALUE, **training, **hashes}
    write_encoded(path, encoded, metadata, overwrite=overwrite)
    return encoded.content_hash
