"""Diffusion-pipeline component names and kohya's underscored module paths (spec/interop/kohya.md).

kohya writes a module path with every ``.`` replaced by ``_``, so ``down_blocks_0_attentions_0`` could be
``down_blocks.0.attentions.0`` or ``down.blocks.0...``. A name is resolved against a list of real module names
(the base's, when given) or, without a base, against the module-name templates of the known diffusion
architectures (module_templates.json, generated from diffusers and transformers by
tools/gen_module_templates.py). A name that matches no module, or more than one, is refused: never guessed.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from loraformat.constants import PIPELINE_COMPONENTS

_TEMPLATES = Path(__file__).with_name("module_templates.json")


def family(component: str) -> str:
    """The architecture family whose templates describe a component's module names."""
    return "text_encoder" if component.startswith("text_encoder") else component


def split_component(module: str) -> tuple[str | None, str]:
    """('unet', 'down_blocks.0...') for a component-qualified module path; (None, path) otherwise."""
    head, _, rest = module.partition(".")
    if head in PIPELINE_COMPONENTS and rest:
        return head, rest
    return None, module


def _tokens(dotted: str) -> tuple[list[tuple[str, int, bool]], str]:
    """Segments of a dotted path as (segment, underscore-token count, numeric) and the generalised key: the
    underscored path with every purely numeric token replaced by N."""
    segments: list[tuple[str, int, bool]] = []
    key_tokens: list[str] = []
    for seg in dotted.split("."):
        parts = seg.split("_")
        segments.append((seg, len(parts), seg.isdigit()))
        key_tokens.extend("N" if p.isdigit() else p for p in parts)
    return segments, "_".join(key_tokens)


def _generalise(underscored: str) -> str:
    return "_".join("N" if p.isdigit() else p for p in underscored.split("_"))


class NameIndex:
    """Underscored module path -> the dotted module paths it can stand for."""

    def __init__(self, dotted_names: Iterable[str], *, templates: bool = False) -> None:
        self.templates = templates
        self._by_key: dict[str, list[str]] = {}
        for name in dotted_names:
            key = _tokens(name)[1] if templates else name.replace(".", "_")
            self._by_key.setdefault(key, []).append(name)

    def candidates(self, underscored: str) -> list[str]:
        if not self.templates:
            return sorted(self._by_key.get(underscored, []))
        found = set()
        tokens = underscored.split("_")
        for template in self._by_key.get(_generalise(underscored), []):
            name = _instantiate(template, tokens)
            if name is not None:
                found.add(name)
        return sorted(found)


def _instantiate(template: str, tokens: list[str]) -> str | None:
    """Fill a template's N segments with the kohya name's numbers; None when a literal digit differs."""
    out, i = [], 0
    for seg, count, _ in _tokens(template)[0]:
        part = tokens[i : i + count]
        i += count
        if seg == "N":
            if len(part) != 1 or not part[0].isdigit():
                return None
            out.append(part[0])
        else:
            if "_".join(part) != seg:
                return None
            out.append(seg)
    return ".".join(out) if i == len(tokens) else None


@functools.cache
def template_index(fam: str) -> NameIndex | None:
    """The known architectures' module templates for one family, or None for an unknown family."""
    doc = json.loads(_TEMPLATES.read_text("utf-8"))
    names = doc["families"].get(fam)
    return NameIndex(names, templates=True) if names is not None else None


def templates_version() -> dict[str, str]:
    """The diffusers/transformers versions the templates were generated with (shown in spec and inspect)."""
    return dict(json.loads(_TEMPLATES.read_text("utf-8"))["generated_with"])


def base_indexes(modules: Mapping[str, Iterable[str]]) -> dict[str, NameIndex]:
    """Exact indexes of a base's module names, per component."""
    return {component: NameIndex(names) for component, names in modules.items()}
