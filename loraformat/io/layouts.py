"""Which adapter layout a safetensors file is in, decided from its keys and metadata alone, and the one place
that hands a file to its format's reader (spec/interop/*.md). Every command that opens an adapter goes through
here, so all of them accept every layout."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from loraformat.constants import METADATA_KEY, PEFT_PREFIX, Format
from loraformat.errors import AdapterError
from loraformat.io.header import SafetensorsHeader
from loraformat.io.kohya import _shown, is_kohya_key, read_kohya
from loraformat.io.tensors import RenamedSource
from loraformat.metadata import AdapterMetadata


def detect_layout(header: SafetensorsHeader) -> Format:
    """loraformat, peft (needs its config), kohya or diffusers; mixed or unknown layouts are refused."""
    from loraformat.io.diffusers import is_diffusers_key

    if METADATA_KEY in header.metadata:
        return Format.LORAFORMAT
    keys = list(header.tensors)
    if not keys:
        raise AdapterError("holds no tensors", path=header.path)
    kohya = [k for k in keys if is_kohya_key(k)]
    peft = [k for k in keys if k.startswith(PEFT_PREFIX)]
    rest = [k for k in keys if k not in set(kohya) | set(peft)]
    found = [(n, ks) for n, ks in (("kohya", kohya), ("PEFT", peft), ("diffusers/other", rest)) if ks]
    if len(found) > 1:
        raise AdapterError(
            "mixes adapter layouts in one file: " + "; ".join(f"{n}: {_shown(ks)}" for n, ks in found),
            path=header.path,
        )
    if kohya:
        return Format.KOHYA
    if peft:
        return Format.PEFT
    if not any(is_diffusers_key(k) for k in rest):
        raise AdapterError(
            "is not a LoRA adapter in any layout loraformat reads (loraformat, PEFT, kohya, diffusers): no key "
            f"ends in lora_A/lora_B/lora_down/lora_up ({_shown(rest)})",
            path=header.path,
        )
    return Format.DIFFUSERS


def read_layout(
    header: SafetensorsHeader,
    layout: str,
    *,
    name: str,
    base_modules: Mapping[str, Iterable[str]] | None = None,
) -> tuple[AdapterMetadata, RenamedSource]:
    """The module table of a kohya or diffusers file and a source that shows its tensors under canonical keys."""
    from loraformat.io.diffusers import read_diffusers

    if layout == Format.KOHYA:
        meta, names = read_kohya(header, name=name, base_modules=base_modules)
    else:
        meta, names = read_diffusers(header, name=name)
    return meta, RenamedSource(header.path, names, header=header)
