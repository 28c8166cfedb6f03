"""The rules of the loraformat adapter format (spec/v1.md): versioning and scaling; the names are in constants.py.

spec/v1.md §Versioning: a reader accepts files of its own major version, ignores (and preserves) unknown fields
of a newer minor version, and refuses a newer major version with a message naming both versions.
"""

from __future__ import annotations

import math
import re

from loraformat.constants import SPEC_MAJOR, SPEC_VERSION, ScalingRule
from loraformat.errors import SchemaError, UnsupportedVersionError

#: Limits on what a reader accepts (spec/v1.md §16): far above any real adapter, low enough that checking any
#: accepted header stays linear and bounded (under 2 s and 512 MiB on a laptop-class CPU).
MAX_TENSORS = 100_000  # tensors in one safetensors file
MAX_MODULES = (
    25_000  # modules in the metadata document or resolved from a PEFT config (every linear layer of a
)
# 405B dense model: 882; every expert of Mixtral 8x22B: ~1,600)
MAX_METADATA_KEYS = 10_000  # keys of a safetensors __metadata__ map
MAX_SHAPE_DIMS = 8  # dimensions of one tensor (a 3-D conv kernel has 5)
MAX_JSON_ITEMS = 1_000_000  # values (commas) in one JSON text: header, metadata document, config
MAX_JSON_DEPTH = 64  # nesting of one JSON text
MAX_NON_ASCII_HEADER_BYTES = 16 << 20  # a larger header must be ASCII (loraformat's own writer always is)
MAX_CONFIG_BYTES = 64 << 20  # an adapter_config.json or index file
MAX_PATTERN_KEYS = 10_000  # keys of rank_pattern plus alpha_pattern in a PEFT config
MAX_PATTERN_LENGTH = 1_000  # characters of one pattern key

_VERSION = re.compile(r"^([0-9]{1,9})\.([0-9]{1,9})$", re.ASCII)


def parse_version(text: object, *, path: str | None = None) -> tuple[int, int]:
    """MAJOR.MINOR of ASCII digits (at most 9 each: no int conversion of a thousand-digit string)."""
    if not isinstance(text, str):
        shown = repr(text)[:40]
        raise SchemaError(f"spec_version must be a string like {SPEC_VERSION!r}, got {shown}", path=path)
    match = _VERSION.fullmatch(text)
    if match is None:
        shown = repr(text) if len(text) <= 40 else repr(text[:37]) + "…"
        raise SchemaError(f"spec_version {shown} is not MAJOR.MINOR (ASCII digits)", path=path)
    return int(match.group(1)), int(match.group(2))


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
