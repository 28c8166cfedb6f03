"""``loraformat validate --for ENGINE``: what an engine would refuse or serve wrong, predicted from the header.

Findings (spec/v1.md §15, engine findings): ``rank-above-cap`` (vLLM: a module rank above the server's
max_lora_rank, which kills vLLM's offline engine; the message names the cap needed), ``flattened-scale`` (the
engine's reading path flattens per-module alphas or ignores rsLoRA: the scale each module would get and the
error), ``unsupported-feature`` (DoRA, modules_to_save, bias, conv layers), ``unsupported-target`` (module
names the engine does not adapt for the architecture: vLLM refuses the load, llama.cpp has no tensor for them),
``unmatched-module`` (with a base: the module's weight is not in the base, so vLLM loads it and changes nothing
and llama.cpp refuses it), ``zero-delta`` (a module whose lora_B is all zero: it serves the base there),
``base-architecture`` (with a base: an architecture the engine's LoRA path does not take), plus the base
findings of plain validate (``missing-target``, ``target-shape``). No torch import; lora_B is scanned as raw
bytes for all-zero values, so even a large adapter checks in well under a second.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraformat.adapter import Adapter, open_adapter
from loraformat.constants import Engine, FindingCode
from loraformat.engines import LLAMA_CPP, PEFT, VLLM, check_engine
from loraformat.engines import llamacpp as llama_rule
from loraformat.engines import vllm as vllm_rule
from loraformat.errors import LoraformatError, UsageError
from loraformat.validation import ERROR, WARNING, ValidationReport, _validate_one, expand_paths

RANK_ABOVE_CAP = FindingCode.RANK_ABOVE_CAP
FLATTENED_SCALE = FindingCode.FLATTENED_SCALE
UNSUPPORTED_FEATURE = FindingCode.UNSUPPORTED_FEATURE
UNSUPPORTED_TARGET = FindingCode.UNSUPPORTED_TARGET
UNMATCHED_MODULE = FindingCode.UNMATCHED_MODULE
ZERO_DELTA = FindingCode.ZERO_DELTA
BASE_ARCHITECTURE = FindingCode.BASE_ARCHITECTURE
ENGINE_CODES = (
    RANK_ABOVE_CAP,
    FLATTENED_SCALE,
    UNSUPPORTED_FEATURE,
    UNSUPPORTED_TARGET,
    UNMATCHED_MODULE,
    ZERO_DELTA,
    BASE_ARCHITECTURE,
)


@dataclass
class EngineReport(ValidationReport):
    """A validation report for one engine, with the facts a deployer needs (vLLM: ``max_lora_rank``)."""

    engine: str = ""
    facts: dict[str, Any] = field(default_factory=dict)

    def to_json(self, strict: bool = False) -> dict[str, Any]:
        return {**super().to_json(strict), "engine": self.engine, "facts": self.facts}


@dataclass(frozen=True)
class BaseInfo:
    """What the engine checks need of a base: its architecture and tensor shapes (numpy order)."""

    path: str
    architecture: str | None
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    gguf: llama_rule.GgufTarget | None = None


def validate_for(
    paths: Iterable[str | os.PathLike[str]],
    engine: str,
    *,
    base: str | os.PathLike[str] | None = None,
    max_lora_rank: int | None = None,
    config: str | os.PathLike[str] | dict[str, Any] | None = None,
    allow_pickle: bool = False,
) -> list[EngineReport]:
    """Validate adapters for ``engine`` (vllm, llama.cpp, peft); ``max_lora_rank`` is the vLLM server's cap
    (default: vLLM's default, 16)."""
    engine = check_engine(engine)
    if max_lora_rank is not None and max_lora_rank not in vllm_rule.ALLOWED_MAX_LORA_RANKS:
        allowed = ", ".join(map(str, vllm_rule.ALLOWED_MAX_LORA_RANKS))
        raise UsageError(f"--max-lora-rank must be one of vLLM's values {allowed}, not {max_lora_rank}")
    info = _base_info(base) if base is not None else None
    reports = []
    for path in expand_paths(paths):
        plain = _validate_one(path, level="header", ck=None, config=config, allow_pickle=allow_pickle)
        report = EngineReport(
            plain.path, plain.level, list(plain.findings), plain.source_format, plain.modules
        )
        report.engine = engine
        if not report.errors:
            with open_adapter(path, config=config, allow_pickle=allow_pickle, check=False) as adapter:
                _check(report, adapter, engine, info, max_lora_rank)
        reports.append(report)
    return reports


def _check(
    report: EngineReport, adapter: Adapter, engine: str, info: BaseInfo | None, cap: int | None
) -> None:
    meta = adapter.meta
    unsupported = {VLLM: vllm_rule.unsupported, LLAMA_CPP: llama_rule.unsupported}.get(Engine(engine))
    if unsupported is not None:
        for where, why in unsupported(meta):
            report._add(UNSUPPORTED_FEATURE, ERROR, where, f"{engine} refuses it: {why}")
    if engine == VLLM:
        _check_vllm(report, adapter, info, cap or vllm_rule.DEFAULT_MAX_LORA_RANK)
    elif engine == LLAMA_CPP:
        _check_llamacpp(report, adapter, info)
    if info is not None:
        _check_base_fit(report, adapter, info, engine)
    _check_zero(report, adapter)


def _check_vllm(report: EngineReport, adapter: Adapter, info: BaseInfo | None, cap: int) -> None:
    meta = adapter.meta
    architecture = info.architecture if info else None
    for name in vllm_rule.refused_targets(meta, architecture):
        report._add(
            UNSUPPORTED_TARGET,
            ERROR,
            name,
            f"vLLM does not expect LoRA on '{name.rsplit('.', 1)[-1]}' for {architecture or 'its models'}: "
            "the load fails ('expected target modules in ...')",
        )
    peft_config = adapter.peft_config if adapter.source_format != "loraformat" else None
    top = vllm_rule.config_max_rank(meta, peft_config)
    needed = vllm_rule.round_up_rank(top)
    report.facts["max_lora_rank"] = needed
    report.facts["max_rank"] = top
    if needed is None:
        report._add(
            RANK_ABOVE_CAP,
            ERROR,
            "r",
            f"rank {top} is above vLLM's largest max_lora_rank 512; bring it under with "
            "'loraformat convert --for vllm --max-rank 512'",
        )
    elif top > cap:
        over = sorted(n for n, e in meta.modules.items() if e.rank > cap) or ["r"]
        report._add(
            RANK_ABOVE_CAP,
            ERROR,
            ", ".join(over),
            f"rank {top} is above max_lora_rank {cap} (vLLM raises, and its offline engine dies): serve with "
            f"--max-lora-rank {needed}, or 'loraformat convert --for vllm --max-rank {cap}'",
        )


def _check_llamacpp(report: EngineReport, adapter: Adapter, info: BaseInfo | None) -> None:
    """llama.cpp reads a PEFT adapter through its convert_lora_to_gguf.py, which takes the global lora_alpha
    and never use_rslora: report every module whose scale that path gets wrong."""
    meta = adapter.meta
    config = adapter.peft_config if adapter.source_format != "loraformat" else None
    if config is None:
        from loraformat.io.peft import peft_config_from_metadata

        config = peft_config_from_metadata(meta)
    for name in sorted(meta.modules):
        right = meta.scale(name)
        got = llama_rule.converter_scale(meta, config, name)
        if not math.isclose(got, right, rel_tol=1e-9):
            report._add(
                FLATTENED_SCALE,
                ERROR,
                name,
                f"llama.cpp's convert_lora_to_gguf.py gives scale {got:g} instead of {right:g} "
                f"(x{got / right:.4g}); export with 'loraformat convert --for llama.cpp' instead",
            )
    if info is not None and info.architecture is not None:
        if info.architecture not in llama_rule.HF_ARCHITECTURES:
            return  # reported by _check_base_fit
        target = llama_rule.target_from_hf_config(info.config, info.path)
        _, _, unmapped = llama_rule.plan(meta, target)
        for name in unmapped:
            report._add(UNSUPPORTED_TARGET, ERROR, name, f"llama.cpp has no tensor for it in {target.arch}")


def _check_gguf_fit(report: EngineReport, adapter: Adapter, target: llama_rule.GgufTarget) -> None:
    """A GGUF base: each module's GGUF tensor exists with the module's shape (llama.cpp checks both)."""
    meta = adapter.meta
    _, plans, unmapped = llama_rule.plan(meta, target)
    for name in unmapped:
        report._add(UNSUPPORTED_TARGET, ERROR, name, f"llama.cpp has no tensor for it in {target.arch}")
    shapes = target.tensor_shapes or {}
    for p in plans:
        entry = meta.modules[p.module]
        want = (
            (entry.in_features, entry.out_features)
            if p.transpose_a
            else (entry.out_features, entry.in_features)
        )
        have = shapes.get(p.name)
        if have is None:
            report._add(
                UNMATCHED_MODULE, ERROR, p.module, f"the GGUF base has no {p.name}: llama.cpp refuses it"
            )
        elif tuple(have) != want:
            report._add(
                FindingCode.TARGET_SHAPE,
                ERROR,
                p.module,
                f"GGUF base tensor {p.name} is {list(have)}, not {list(want)}",
            )


def _check_base_fit(report: EngineReport, adapter: Adapter, info: BaseInfo, engine: str) -> None:
    meta = adapter.meta
    if info.gguf is not None:
        if engine == LLAMA_CPP:
            _check_gguf_fit(report, adapter, info.gguf)
        else:
            raise UsageError(
                f"a GGUF base fits llama.cpp only; give {engine} the Hugging Face base directory"
            )
        return
    supported: set[str] | None = None
    if engine == VLLM:
        supported = set(vllm_rule.EXPECTED_MODULES)
    elif engine == LLAMA_CPP:
        supported = set(llama_rule.HF_ARCHITECTURES)
    if supported is not None and info.architecture not in supported:
        report._add(
            BASE_ARCHITECTURE,
            ERROR,
            "base",
            f"base architecture {info.architecture!r} is not one this check knows for {engine} "
            f"({', '.join(sorted(supported))})",
        )
    for name, entry in sorted(meta.modules.items()):
        shape = info.shapes.get(entry.base_tensor)
        if shape is None:
            effect: dict[str, str] = {
                VLLM: "vLLM loads it and changes nothing",
                LLAMA_CPP: "llama.cpp refuses the adapter",
            }
            report._add(
                UNMATCHED_MODULE,
                ERROR,
                name,
                f"the base has no {entry.base_tensor!r}: {effect.get(engine, 'it matches no module')}",
            )
        elif shape != entry.base_shape:
            report._add(
                FindingCode.TARGET_SHAPE,
                ERROR,
                name,
                f"base tensor {entry.base_tensor!r} is {list(shape)}, adapter expects {list(entry.base_shape)}",
            )


#: clears the sign bit of a float's most significant byte, so -0.0 counts as zero
_SIGN_CLEARED = bytes(x & 0x7F for x in range(256))


def _is_zero(raw: bytes, width: int) -> bool:
    """All elements (little-endian floats of ``width`` bytes) are +0.0 or -0.0; C speed, no numpy import."""
    data = bytearray(raw)
    data[width - 1 :: width] = data[width - 1 :: width].translate(_SIGN_CLEARED)
    return data.count(0) == len(data)


def _check_zero(report: EngineReport, adapter: Adapter) -> None:
    """Modules whose lora_B is all zero: the engine serves the base there."""
    from loraformat.io.header import DTYPE_BITS

    if getattr(adapter.source, "header", None) is None:
        return
    zero = []
    with open(adapter.source.path, "rb") as f:
        for name in sorted(adapter.modules):
            info = adapter.source.infos.get(adapter.keys(name).B)
            bits = DTYPE_BITS.get(info.dtype) if info else None
            if info is None or bits not in (16, 32, 64):
                continue
            f.seek(info.start)
            if _is_zero(f.read(info.nbytes), bits // 8):
                zero.append(name)
    if zero and len(zero) == len(adapter.modules):
        report._add(ZERO_DELTA, WARNING, "", "every lora_B is all zero: the engine serves the base unchanged")
    else:
        for name in zero:
            report._add(ZERO_DELTA, WARNING, name, "lora_B is all zero: this module changes nothing")


def _base_info(base: str | os.PathLike[str]) -> BaseInfo:
    """Architecture and tensor shapes of a Hugging Face base directory or a GGUF base (headers only)."""
    p = Path(base)
    if p.suffix == ".gguf":
        from loraformat.io.gguf import read_gguf_target

        return BaseInfo(str(p), None, {}, {}, read_gguf_target(p))
    from loraformat.io.checkpoint import open_checkpoint

    ck = open_checkpoint(p)
    cfg_path = (p if p.is_dir() else p.parent) / "config.json"
    config: dict[str, Any] = {}
    if cfg_path.is_file():
        try:
            loaded = json.loads(cfg_path.read_text("utf-8"))
            config = loaded if isinstance(loaded, dict) else {}
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            raise LoraformatError(f"config.json is not valid JSON ({exc})", path=cfg_path) from None
    archs = config.get("architectures") or [None]
    shapes = {name: loc[1].shape for name, loc in ck.locations.items()}
    return BaseInfo(str(p), archs[0] if isinstance(archs[0], str) else None, config, shapes)


def format_facts(report: ValidationReport) -> str | None:
    """One human line of engine facts, e.g. 'vllm: needs max_lora_rank 8 (largest rank 8)'."""
    if not isinstance(report, EngineReport):
        return None
    if report.engine == VLLM and report.facts.get("max_rank") is not None:
        cap = report.facts.get("max_lora_rank")
        return f"{report.path}: vllm: needs max_lora_rank {cap or '> 512'} (largest rank {report.facts['max_rank']})"
    return None


__all__ = ["ENGINE_CODES", "EngineReport", "validate_for", "PEFT"]
