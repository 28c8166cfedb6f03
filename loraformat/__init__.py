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
    "validate": "loraformat.validate",
    "inspect": "loraformat.inspect",
    "convert": "loraformat.convert",
    "hash_base": "loraformat.hashing",
    "merge": "loraformat.merge",
    "compose": "loraformat.compose",
    "rescale": "loraformat.compose",
    "spectrum": "loraformat.compose",
    "push": "loraformat.hub",
    "pull": "loraformat.hub",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loraformat' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
