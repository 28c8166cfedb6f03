"""PEFT interop: adapter_config.json <-> the resolved loraformat module table.

Reading resolves rank_pattern/alpha_pattern exactly as PEFT does (``re.match(rf"(.*\\.)?({key})$", module)``,
first matching key wins, else ``r`` / ``lora_alpha``). The module table comes from the tensors actually saved,
so layers_to_transform/layers_pattern/target_modules need no re-implementation: PEFT only saves what it
targeted. Writing emits a minimal config with exact, anchored patterns only where ranks or alphas differ per
module, and only keys every LoraConfig since PEFT 0.7 accepts (older PEFT raises on unknown keys).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from loraformat import spec
from loraformat.constants import BIAS_MODES, PEFT_PREFIX, Format, LayerKind, ScalingRule
from loraformat.errors import AdapterError
from loraformat.io.header import TensorInfo
from loraformat.io.patterns import PatternTable, build_table, check_key_count, resolve_all
from loraformat.metadata import AdapterMetadata, BaseModel, ModuleEntry, Provenance

#: tensor-key suffix after the module path -> role
_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "embA",
    ".lora_embedding_B": "embB",
    ".lora_magnitude_vector": "magnitude",
    ".lora_B.bias": "bias",
}

#: LoraConfig fields that change what the saved tensors mean in ways loraformat 1.0 cannot describe
_UNSUPPORTED = {
    "alora_invocation_tokens": "activated LoRA (aLoRA) applies only after invocation tokens and cannot be merged",
    "use_qalora": "QALoRA pools the input; its tensors are not a plain low-rank delta",
    "layer_replication": "layer_replication changes the model structure",
    "target_parameters": "target_parameters (LoRA on raw nn.Parameters, e.g. MoE experts)",
    "trainable_token_indices": "trainable_token_indices (trainable tokens)",
    "use_bdlora": "BD-LoRA block-diagonal factors",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA singular-value adaptation",
    "monteclora_config": "MonteCLoRA sampling",
}


def resolve_pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first key (in dict order) that matches the module path wins."""
    table = build_table("pattern", patterns, "")
    return resolve_all([module], [table], [default], "")[module][0]


def _cfg_error(path: str, message: str) -> AdapterError:
    return AdapterError(f"adapter_config.json: {message}", path=path)


def _typed(config: dict[str, Any], key: str, types: tuple[type, ...], default: Any, path: str) -> Any:
    value = config.get(key, default)
    if value is None:
        return default
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise _cfg_error(path, f"{key} must be {' or '.join(t.__name__ for t in types)}, got {value!r}")
    return value


def saved_tensor_target(rest: str) -> str:
    """The base tensor a PEFT whole-tensor key (prefix removed) replaces: PEFT stores targeted layers' own
    parameters under ``<module>.base_layer.<param>`` and modules_to_save under ``<module>.<param>``
    (older PEFT: ``<module>.modules_to_save.<adapter>.<param>``)."""
    rest = re.sub(r"\.modules_to_save\.[^.]+\.", ".", rest)
    return rest.replace(".base_layer.", ".")


def split_tensor_keys(keys: list[str], *, path: str) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Group PEFT tensor keys per module ({module: {role: key}}) and collect whole saved tensors
    ({key: base tensor name}). Keys that fit neither (no PEFT prefix, an unknown ``lora_`` kind) are left out
    so that :meth:`Adapter.problems` reports them as unexpected tensors."""
    modules: dict[str, dict[str, str]] = {}
    saved: dict[str, str] = {}
    for key in keys:
        if not key.startswith(PEFT_PREFIX):
            continue
        rest = key[len(PEFT_PREFIX) :]
        for suffix, role in _SUFFIXES.items():
            if rest.endswith(suffix) and len(rest) > len(suffix):
                modules.setdefault(rest[: -len(suffix)], {})[role] = key
                break
        else:
            if ".lora_" not in rest and not rest.startswith("lora_"):
                saved[key] = saved_tensor_target(rest)
    return modules, saved


def _check_patterns(name: str, patterns: dict[str, Any], path: str, *, integer: bool) -> PatternTable:
    """Values first (cheap), then the keys as regexes (bounded: loraformat/io/patterns.py)."""
    for key, value in patterns.items():
        bad = isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
        if bad or value <= 0:
            kind = "a positive integer" if integer else "a positive number"
            raise _cfg_error(path, f"{name}[{key[:60]!r}] must be {kind}, got {value!r}")
    return build_table(name, patterns, path)


def metadata_from_peft(
    config: dict[str, Any], infos: dict[str, TensorInfo], *, name: str, path: str
) -> AdapterMetadata:
    """Resolve a PEFT config and the tensors' shapes into a fully explicit module table.

    Config values of the wrong type raise AdapterError. Disagreements between tensors and config (a missing
    B, ranks that differ) are *not* raised here: the table records what the config says and
    :meth:`loraformat.adapter.Adapter.problems` reports every disagreement, so validate can list them all.
    """
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise _cfg_error(path, f"peft_type {peft_type!r} is not LORA; only LoRA adapters are supported")
    for key, what in _UNSUPPORTED.items():
        if config.get(key) not in (None, False, [], {}):
            raise _cfg_error(path, f"{key} is set: {what}, which loraformat 1.0 does not support")
    r = _typed(config, "r", (int,), 8, path)
    lora_alpha = _typed(config, "lora_alpha", (int, float), 8, path)
    if r <= 0:
        raise _cfg_error(path, f"r must be a positive integer, got {r!r}")
    if lora_alpha <= 0:
        raise _cfg_error(path, f"lora_alpha must be positive, got {lora_alpha!r}")
    rank_pattern = _typed(config, "rank_pattern", (dict,), {}, path)
    alpha_pattern = _typed(config, "alpha_pattern", (dict,), {}, path)
    check_key_count(len(rank_pattern) + len(alpha_pattern), path)
    tables = [
        _check_patterns("rank_pattern", rank_pattern, path, integer=True),
        _check_patterns("alpha_pattern", alpha_pattern, path, integer=False),
    ]
    use_rslora = _typed(config, "use_rslora", (bool,), False, path)
    use_dora = _typed(config, "use_dora", (bool,), False, path)
    fan_in_fan_out = _typed(config, "fan_in_fan_out", (bool,), False, path)
    lora_bias = _typed(config, "lora_bias", (bool,), False, path)
    bias = _typed(config, "bias", (str,), "none", path)
    modules_to_save = _typed(config, "modules_to_save", (list,), [], path)
    if bias not in BIAS_MODES:
        raise _cfg_error(path, f"bias {bias!r} is not one of {', '.join(BIAS_MODES)}")
    if not all(isinstance(m, str) for m in modules_to_save):
        raise _cfg_error(path, f"modules_to_save must be a list of strings, got {modules_to_save!r}")

    grouped, saved = split_tensor_keys(list(infos), path=path)
    if len(grouped) > spec.MAX_MODULES:
        raise _cfg_error(
            path, f"{len(grouped)} modules, above the limit of {spec.MAX_MODULES} (spec/v1.md §16)"
        )
    resolved = resolve_all(sorted(grouped), tables, [r, lora_alpha], path)
    modules: dict[str, ModuleEntry] = {}
    for module, roles in sorted(grouped.items()):
        entry = _module_entry(module, roles, infos, resolved[module], fan_in_fan_out)
        if entry is not None:
            modules[module] = entry
    if not modules:
        raise AdapterError("no LoRA tensors (lora_A/lora_B or lora_embedding_A/B) found", path=path)
    task = config.get("task_type")
    base_id = config.get("base_model_name_or_path")
    revision = config.get("revision")
    return AdapterMetadata(
        modules=modules,
        scaling=ScalingRule.RSLORA if use_rslora else ScalingRule.STANDARD,
        dora=use_dora,
        bias=bias,
        lora_bias=lora_bias,
        modules_to_save=list(modules_to_save),
        saved_tensors=saved,
        name=name or "adapter",
        task=task if isinstance(task, str) else None,
        created_by={"tool": "peft", "version": str(config.get("peft_version") or "unknown")},
        base_model=BaseModel(
            id=base_id if isinstance(base_id, str) and base_id else None,
            revision=revision if isinstance(revision, str) and revision else None,
        ),
        provenance=Provenance(method="convert", source_format=Format.PEFT),
    )


def _module_entry(
    module: str, roles: dict[str, str], infos: dict[str, TensorInfo], rank_alpha: Any, fan_in_fan_out: bool
) -> ModuleEntry | None:
    """One module's entry from its tensors' shapes (kind, features, kernel) and its resolved rank and alpha;
    None for a stray magnitude or bias without factors (Adapter.problems reports it as unexpected)."""
    a_key = roles.get("A") or roles.get("embA")
    b_key = roles.get("B") or roles.get("embB")
    if a_key is None and b_key is None:
        return None
    a = infos[a_key].shape if a_key else ()
    b = infos[b_key].shape if b_key else ()
    if "embA" in roles or "embB" in roles:
        kind, kernel = LayerKind.EMBEDDING, None
    elif len(a) > 2:
        kind, kernel = LayerKind.CONV, list(a[2:])
    elif len(b) > 2:
        kind, kernel = LayerKind.CONV, [1] * (len(b) - 2)
    else:
        kind, kernel = LayerKind.LINEAR, None
    return ModuleEntry(
        kind=kind,
        rank=rank_alpha[0],
        alpha=rank_alpha[1],
        in_features=a[1] if len(a) > 1 else 0,  # 0: unknown, A is missing or malformed (a problem)
        out_features=b[0] if len(b) > 0 else 0,
        base_tensor=f"{module}.weight",
        # PEFT applies fan_in_fan_out to (Conv1D-)linear layers only; convert --base corrects it per layer
        fan_in_fan_out=fan_in_fan_out and kind == LayerKind.LINEAR,
        kernel_size=kernel,
    )


# --- writing -------------------------------------------------------------------------------------------------


def _dotted_tails(names: list[str]) -> set[str] | None:
    """Every proper dotted suffix of every name ("a.b.c" -> "b.c", "c"): linear in the total length. None
    when a name holds a newline ('$' and '.*' treat those specially: the regex decides then)."""
    if any("\n" in n for n in names):
        return None
    return {n[i + 1 :] for n in names for i, c in enumerate(n) if c == "."}


def _anchored(module: str, others: list[str], tails: set[str] | None) -> str:
    """A pattern key that PEFT's ``(.*\\.)?(KEY)$`` matches for ``module`` and no other module of ``others``:
    the escaped path matches exactly the paths equal to it or ending in ``.`` + it (``tails``)."""
    key = re.escape(module)
    if tails is None:
        clash = any(o != module and re.match(rf"(.*\.)?({key})$", o) for o in others)
    else:
        clash = module in tails
    return "^" + key if clash else key  # "^": nothing may precede, the full path only


def _default(counter: Counter[Any]) -> Any:
    """The most common value; ties go to the smallest so the choice does not depend on dict order."""
    top = max(counter.values())
    return min(v for v, n in counter.items() if n == top)


def peft_config_from_metadata(meta: AdapterMetadata) -> dict[str, Any]:
    """An adapter_config.json that makes PEFT rebuild exactly this module table.

    target_modules lists full module paths (PEFT matches a list entry exactly or as a dotted suffix; a full
    path only matches itself). Keys newer than PEFT 0.7 (use_dora, lora_bias) are written only when set, so
    the config also loads in older PEFT, which raises on keys it does not know.
    """
    names = sorted(meta.modules)
    r = _default(Counter(m.rank for m in meta.modules.values()))
    alpha = _default(Counter(m.alpha for m in meta.modules.values()))
    tails = _dotted_tails(names)
    rank_pattern = {
        _anchored(n, names, tails): meta.modules[n].rank for n in names if meta.modules[n].rank != r
    }
    alpha_pattern = {
        _anchored(n, names, tails): _num(meta.modules[n].alpha)
        for n in names
        if meta.modules[n].alpha != alpha
    }
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": meta.task if meta.task in PEFT_TASKS else None,
        "base_model_name_or_path": meta.base_model.id,
        "revision": meta.base_model.revision,
        "r": r,
        "lora_alpha": _num(alpha),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": names,
        "use_rslora": meta.scaling == ScalingRule.RSLORA,
        # PEFT corrects this per layer anyway (True for GPT-2 Conv1D, False for nn.Linear)
        "fan_in_fan_out": any(m.fan_in_fan_out for m in meta.modules.values()),
        "bias": meta.bias,
        "modules_to_save": list(meta.modules_to_save) or None,
        "lora_dropout": 0.0,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    if meta.dora:
        config["use_dora"] = True
    if meta.lora_bias:
        config["lora_bias"] = True
    return config


#: PEFT TaskType values (a loraformat task outside these is free text and not passed to PEFT)
PEFT_TASKS = frozenset(
    {"CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"}
)


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() and abs(x) <= 2**53 else float(x)
