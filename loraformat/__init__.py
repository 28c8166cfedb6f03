"""loraformat: a self-describing file format and toolkit for LoRA adapters.

The public API is imported lazily so that ``import loraformat`` stays cheap and never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from loraformat._version import __version__

_LAZY = {
    "Adapter": "loraformat.adapter",
    "open_adapter": "loraformat.adapter",
    "AdapterMetadata": "loraformat.metadata",
    "ModuleEntry": "loraformat.metadata",
    "validate": "loraformat.validation",
    "validate_for": "loraformat.engine_check",
    "export": "loraformat.exporting",
    "inspect": "loraformat.inspection",
    "convert": "loraformat.conversion",
    "hash_base": "loraformat.hashing",
    "merge": "loraformat.merging.api",
    "extract": "loraformat.extraction",
    "unmerge": "loraformat.unmerging",
    "compose": "loraformat.composition",
    "rescale": "loraformat.rescaling",
    "spectrum": "loraformat.rescaling",
    "push": "loraformat.hub",
    "pull": "loraformat.hub",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loraformat' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolve once; implementation modules have other names, so nothing shadows it
    return value
