"""PEFT interop: adapter_config.json <-> the resolved loraformat module table.

Reading resolves rank_pattern/alpha_pattern exactly as PEFT does (``re.match(rf"(.*\\.)?({key})$", module)``,
first matching key wins). Writing emits exact, anchored patterns only where ranks or alphas differ per module,
so PEFT rebuilds the very same table.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from loraformat import spec
from loraformat.errors import AdapterError
from loraformat.io.header import TensorInfo
from loraformat.metadata import AdapterMetadata, BaseModel, ModuleEntry, Provenance

_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "embA",
    ".lora_embedding_B": "embB",
    ".lora_magnitude_vector": "magnitude",
    ".lora_B.bias": "bias",
}


def resolve_pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first key (in dict order) that matches the module path wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _typed(config: dict[str, Any], key: str, types: tuple[type, ...], default: Any, path: str) -> Any:
    value = config.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types:
        raise AdapterError(f"adapter_config.json: {key} must be {types[0].__name__}, got {value!r}", path=path)
    if not isinstance(value, types):
        raise AdapterError(f"adapter_config.json: {key} must be {types[0].__name__}, got {value!r}", path=path)
    return value


def split_tensor_keys(keys: list[str], *, path: str) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Group PEFT tensor keys per module ({module: {role: key}}) and collect whole saved tensors
    ({key: base tensor name})."""
    modules: dict[str, dict[str, str]] = {}
    saved: dict[str, str] = {}
    for key in keys:
        if not key.startswith(spec.PEFT_PREFIX):
            raise AdapterError(f"tensor {key!r} does not start with {spec.PEFT_PREFIX!r} (PEFT naming)", path=path)
        rest = key[len(spec.PEFT_PREFIX):]
        for suffix, role in _SUFFIXES.items():
            if rest.endswith(suffix):
                modules.setdefault(rest[: -len(suffix)], {})[role] = key
                break
        else:
            if ".lora_" in rest:
                raise AdapterError(f"tensor {key!r} is a LoRA tensor of an unknown kind", path=path)
            saved[key] = rest.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
    return modules, saved


def metadata_from_peft(
    config: dict[str, Any], infos: dict[str, TensorInfo], *, name: str, path: str
) -> AdapterMetadata:
    """Resolve a PEFT config and the tensors' shapes into a fully explicit module table."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"adapter_config.json: peft_type {peft_type!r} is not LORA", path=path)
    r = _typed(config, "r", (int,), 8, path)
    lora_alpha = _typed(config, "lora_alpha", (int, float), 8, path)
    rank_pattern = _typed(config, "rank_pattern", (dict,), {}, path)
    alpha_pattern = _typed(config, "alpha_pattern", (dict,), {}, path)
    use_rslora = _typed(config, "use_rslora", (bool,), False, path)
    use_dora = _typed(config, "use_dora", (bool,), False, path)
    fan_in_fan_out = _typed(config, "fan_in_fan_out", (bool,), False, path)
    lora_bias = _typed(config, "lora_bias", (bool,), False, path)
    bias = _typed(config, "bias", (str,), "none", path)
    modules_to_save = _typed(config, "modules_to_save", (list,), [], path)
    if bias not in spec.BIAS_MODES:
        raise AdapterError(f"adapter_config.json: bias {bias!r} is not one of {spec.BIAS_MODES}", path=path)
    for pname, pat in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for key, value in pat.items():
            try:
                re.compile(key)
            except re.error as exc:
                raise AdapterError(f"adapter_config.json: {pname} key {key!r} is not a regex ({exc})",
                                   path=path) from None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise AdapterError(f"adapter_config.json: {pname}[{key!r}] must be a number", path=path)

    grouped, saved = split_tensor_keys(list(infos), path=path)
    modules: dict[str, ModuleEntry] = {}
    for module, roles in sorted(grouped.items()):
        a_key = roles.get("A") or roles.get("embA")
        b_key = roles.get("B") or roles.get("embB")
        if a_key is None or b_key is None:
            missing = "lora_A" if a_key is None else "lora_B"
            raise AdapterError(f"module {module!r}: {missing} tensor is missing", path=path)
        a, b = infos[a_key].shape, infos[b_key].shape
        if len(a) < 2 or len(b) < 2:
            raise AdapterError(f"module {module!r}: lora_A {list(a)} / lora_B {list(b)} have too few dims", path=path)
        rank = a[0]
        if b[1] != rank:
            raise AdapterError(f"module {module!r}: lora_A rank {rank} != lora_B rank {b[1]}", path=path)
        want_rank = resolve_pattern(rank_pattern, module, r)
        if want_rank != rank:
            raise AdapterError(
                f"module {module!r}: config says rank {want_rank} but the tensors have rank {rank}", path=path
            )
        alpha = resolve_pattern(alpha_pattern, module, lora_alpha)
        if "embA" in roles:
            kind, kernel = spec.KIND_EMBEDDING, None
        elif len(a) > 2:
            kind, kernel = spec.KIND_CONV, list(a[2:])
        else:
            kind, kernel = spec.KIND_LINEAR, None
        if use_dora and "magnitude" not in roles:
            raise AdapterError(f"module {module!r}: use_dora is set but lora_magnitude_vector is missing", path=path)
        if lora_bias and "bias" not in roles:
            raise AdapterError(f"module {module!r}: lora_bias is set but lora_B.bias is missing", path=path)
        modules[module] = ModuleEntry(
            kind=kind,
            rank=rank,
            alpha=alpha,
            in_features=a[1],
            out_features=b[0],
            base_tensor=f"{module}.weight",
            fan_in_fan_out=fan_in_fan_out and kind == spec.KIND_LINEAR,
            kernel_size=kernel,
        )
    if not modules:
        raise AdapterError("no LoRA tensors (lora_A/lora_B) found", path=path)
    return AdapterMetadata(
        modules=modules,
        scaling=spec.SCALING_RSLORA if use_rslora else spec.SCALING_STANDARD,
        dora=use_dora,
        bias=bias,
        lora_bias=lora_bias,
        modules_to_save=list(modules_to_save),
        saved_tensors=saved,
        name=name,
        task=config.get("task_type") if isinstance(config.get("task_type"), str) else None,
        created_by={"tool": "peft", "version": str(config.get("peft_version") or "unknown")},
        base_model=BaseModel(
            id=config.get("base_model_name_or_path") if isinstance(config.get("base_model_name_or_path"), str)
            else None,
            revision=config.get("revision") if isinstance(config.get("revision"), str) else None,
        ),
        provenance=Provenance(method="convert", source_format="peft"),
    )


def _anchored(module: str, others: list[str]) -> str:
    """A pattern key that PEFT's ``(.*\\.)?(KEY)$`` matches for ``module`` alone."""
    key = re.escape(module)
    if any(o != module and re.match(rf"(.*\.)?({key})$", o) for o in others):
        key = r"(?<!.)" + key  # forbid a dotted prefix: match the full path only
    return key


def peft_config_from_metadata(meta: AdapterMetadata) -> dict[str, Any]:
    """An adapter_config.json that makes PEFT rebuild exactly this module table."""
    ranks = Counter(m.rank for m in meta.modules.values())
    alphas = Counter(m.alpha for m in meta.modules.values())
    r = ranks.most_common(1)[0][0]
    alpha = alphas.most_common(1)[0][0]
    names = sorted(meta.modules)
    rank_pattern = {_anchored(n, names): m.rank for n, m in sorted(meta.modules.items()) if m.rank != r}
    alpha_pattern = {
        _anchored(n, names): _num(m.alpha) for n, m in sorted(meta.modules.items()) if m.alpha != alpha
    }
    return {
        "peft_type": "LORA",
        "task_type": meta.task if meta.task in _PEFT_TASKS else None,
        "base_model_name_or_path": meta.base_model.id,
        "revision": meta.base_model.revision,
        "r": r,
        "lora_alpha": _num(alpha),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": names,
        "use_rslora": meta.scaling == spec.SCALING_RSLORA,
        "use_dora": meta.dora,
        "fan_in_fan_out": any(m.fan_in_fan_out for m in meta.modules.values()),
        "bias": meta.bias,
        "lora_bias": meta.lora_bias,
        "modules_to_save": list(meta.modules_to_save) or None,
        "lora_dropout": 0.0,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


_PEFT_TASKS = {"CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"}


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)
