"""The rules of the loraformat adapter format (spec/v1.md): versioning and scaling; the names are in constants.py.

spec/v1.md §Versioning: a reader accepts files of its own major version, ignores (and preserves) unknown fields
of a newer minor version, and refuses a newer major version with a message naming both versions.
"""

from __future__ import annotations

import math

from loraformat.constants import SPEC_MAJOR, SPEC_VERSION, ScalingRule
from loraformat.errors import SchemaError, UnsupportedVersionError


def parse_version(text: object, *, path: str | None = None) -> tuple[int, int]:
    if not isinstance(text, str):
        raise SchemaError(f"spec_version must be a string like {SPEC_VERSION!r}, got {text!r}", path=path)
    parts = text.split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise SchemaError(f"spec_version {text!r} is not MAJOR.MINOR", path=path)
    return int(parts[0]), int(parts[1])


def check_version(text: object, *, path: str | None = None) -> tuple[int, int]:
    """Apply the versioning rule; returns (major, minor) when the file is readable."""
    major, minor = parse_version(text, path=path)
    if major > SPEC_MAJOR:
        raise UnsupportedVersionError(
            f"file is loraformat {major}.{minor} but this reader implements {SPEC_VERSION}; "
            f"upgrade loraformat to read major version {major}",
            path=path,
        )
    if major < 1:
        raise UnsupportedVersionError(f"spec_version {text} predates loraformat 1.0", path=path)
    return major, minor


def scale_for(rule: str, rank: int, alpha: float) -> float:
    """The LoRA scaling factor s of spec/v1.md §Scaling: alpha/r, or alpha/sqrt(r) for rsLoRA."""
    if rule == ScalingRule.RSLORA:
        return alpha / math.sqrt(
            rank
        )  # as PEFT; rank**0.5 differs in the last bit for some ranks (2921, ...)
    return alpha / rank
