"""Adapters for diffusion pipelines: module paths qualified by the pipeline component (``unet.``,
``text_encoder.``, ...) and the per-component views that let one model's machinery (base checks, merge) handle
each component on its own (spec/interop/diffusers.md §Components)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

from loraformat.adapter import Adapter, module_keys
from loraformat.base import Problem, base_problems
from loraformat.constants import PEFT_PREFIX, PIPELINE_COMPONENTS, FindingCode
from loraformat.errors import BaseMismatchError, UsageError
from loraformat.io.checkpoint import open_checkpoint
from loraformat.io.names import split_component
from loraformat.io.pipeline import component_of, is_pipeline, pipeline_components
from loraformat.io.tensors import MemorySource, RenamedSource, SafetensorsSource
from loraformat.metadata import AdapterMetadata
from loraformat.rules import first_problem


def components(meta: AdapterMetadata) -> list[str | None]:
    """The components an adapter targets, None for modules without one (a plain single-model adapter)."""
    return sorted({split_component(m)[0] for m in meta.modules}, key=lambda c: c or "")


def qualify(meta: AdapterMetadata, component: str) -> None:
    """Declare the component of a single-model adapter (convert --component): every module path gets it."""
    if component not in PIPELINE_COMPONENTS:
        raise UsageError(f"--component must be one of {', '.join(PIPELINE_COMPONENTS)}, not {component!r}")
    named = sorted(m for m in meta.modules if split_component(m)[0] is not None)
    if named:
        raise UsageError(f"--component: the adapter already names its components ({named[0]}, ...)")
    meta.modules = {f"{component}.{m}": e for m, e in meta.modules.items()}
    for entry in meta.modules.values():
        entry.base_tensor = f"{component}.{entry.base_tensor}"
    meta.saved_tensors = {
        PEFT_PREFIX + component + "." + k[len(PEFT_PREFIX) :]: f"{component}.{v}"
        for k, v in meta.saved_tensors.items()
    }


def requalified_tensors(tensors: dict[str, object], component: str) -> dict[str, object]:
    """Tensor keys of a single-model adapter after :func:`qualify`."""
    n = len(PEFT_PREFIX)
    return {PEFT_PREFIX + component + "." + k[n:]: t for k, t in tensors.items()}


def component_meta(meta: AdapterMetadata, component: str | None) -> AdapterMetadata:
    """The adapter restricted to one component, paths relative to that component's model."""
    part = copy.deepcopy(meta)
    cut = len(component) + 1 if component else 0
    part.modules = {}
    for module, entry in meta.modules.items():
        if split_component(module)[0] == component:
            entry = copy.deepcopy(entry)
            entry.base_tensor = entry.base_tensor[cut:]
            part.modules[module[cut:]] = entry
    part.saved_tensors = {
        PEFT_PREFIX + k[len(PEFT_PREFIX) + cut :]: v[cut:]
        for k, v in meta.saved_tensors.items()
        if split_component(v)[0] == component
    }
    prefix = f"{component}." if component else ""
    part.base_model.target_digests = {
        k[cut:]: v for k, v in meta.base_model.target_digests.items() if k.startswith(prefix)
    }
    return part


def component_adapter(adapter: Adapter, component: str | None) -> Adapter:
    """A view of one component of an opened adapter that reads the same file, without copying tensors."""
    part = component_meta(adapter.meta, component)
    names: dict[str, str] = {}
    for module in part.modules:
        full = adapter.keys(f"{component}.{module}" if component else module)
        mine = module_keys(module, part.modules[module], dora=part.dora, lora_bias=part.lora_bias)
        for theirs, ours in zip(
            (full.A, full.B, full.magnitude, full.bias),
            (mine.A, mine.B, mine.magnitude, mine.bias),
            strict=True,
        ):
            if theirs is not None and ours is not None:
                names[ours] = theirs
    for key in part.saved_tensors:
        names[key] = f"{PEFT_PREFIX}{component}.{key[len(PEFT_PREFIX) :]}" if component else key
    src = adapter.source
    source: SafetensorsSource | MemorySource
    if isinstance(src, SafetensorsSource):
        file_names = getattr(src, "names", None)
        mapped = {ours: (file_names[theirs] if file_names else theirs) for ours, theirs in names.items()}
        source = RenamedSource(src.path, mapped, header=src.header)
    else:
        source = MemorySource({ours: src.get(theirs) for ours, theirs in names.items()}, path=src.path)
    return Adapter(part, source, adapter.source_format, adapter.path, dict(adapter.raw_metadata), None)


def fits_as_is(meta: AdapterMetadata, base: str | os.PathLike[str]) -> bool:
    """True when a single checkpoint holds every target under the adapter's own names: then a first path
    segment like ``transformer.`` is the model's (GPT-2, Falcon), not a pipeline component."""
    if is_pipeline(base):
        return False
    ck = open_checkpoint(base)
    return all(ck.info(m.base_tensor) is not None for m in meta.modules.values())


def folder_for(base: str | os.PathLike[str], component: str | None) -> Path | None:
    """Where a component's weights are: its sub-folder of a pipeline; a single component folder or checkpoint
    for a component-less adapter, for its own component, or for any component when its name says nothing."""
    p = Path(base)
    if is_pipeline(p):
        return pipeline_components(p).get(component) if component else None
    role = component_of(p) if p.is_dir() else "*"
    return p if component is None or role in (component, "*") else None


def pipeline_problems(meta: AdapterMetadata, base: str | os.PathLike[str]) -> list[Problem]:
    """base_problems per component of a pipeline directory (or one component folder)."""
    out: list[Problem] = []
    for component in components(meta):
        folder = folder_for(base, component)
        if folder is None:
            what = (
                f"{component} component" if component else "components named in the adapter (use --component)"
            )
            out.append((FindingCode.MISSING_TARGET, f"{component or ''}.*", f"base {base} has no {what}"))
            continue
        part = component_meta(meta, component)
        for code, where, message in base_problems(part, open_checkpoint(folder)):
            out.append((code, f"{component}.{where}" if component else where, message))
    return out


def check_pipeline_base(meta: AdapterMetadata, base: str | os.PathLike[str], *, path: str) -> None:
    problems = pipeline_problems(meta, base)
    if problems:
        raise BaseMismatchError(f"does not fit base {base}: {first_problem(problems)}", path=path)
