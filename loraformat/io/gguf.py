"""GGUF files through gguf-py: write a llama.cpp LoRA adapter, read what an export needs from a GGUF base.

No math here: the tensors arrive already folded, permuted and in float32 (loraformat/exporting.py). The adapter is
written beside its final name and appears atomically (loraformat/io/atomic.py), so a failure leaves nothing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraformat.errors import BaseMismatchError, InputNotFoundError
from loraformat.io.atomic import atomic_file, temp_name
from loraformat.io.native import file_digest

if TYPE_CHECKING:
    import numpy as np

    from loraformat.engines.llamacpp import GgufTarget


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:  # pragma: no cover - the gguf extra is part of the test extra
        from loraformat.errors import UsageError

        raise UsageError("GGUF export needs the gguf package: pip install 'loraformat[gguf]'") from None
    return gguf


def write_gguf_adapter(
    path: str | os.PathLike[str],
    *,
    arch: str,
    alpha: float,
    tensors: Sequence[tuple[str, np.ndarray]],
    strings: dict[str, str] | None = None,
    overwrite: bool = False,
) -> str:
    """A LoRA adapter GGUF: general.type=adapter, general.architecture, adapter.type=lora, adapter.lora.alpha,
    then each ``<name>.lora_a`` / ``.lora_b`` tensor as given. Returns the sha256 of the file written."""
    gguf = _gguf()
    final = Path(path)
    with atomic_file(final, overwrite=overwrite) as out:
        scratch = temp_name(final)
        try:
            writer = gguf.GGUFWriter(scratch, arch)
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
            for key, value in sorted((strings or {}).items()):
                writer.add_string(key, value)
            for name, array in tensors:
                writer.add_tensor(name, array)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            with open(scratch, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 22)
        finally:
            if scratch.exists():
                scratch.unlink()
    return file_digest(final)


def read_gguf_target(path: str | os.PathLike[str]) -> GgufTarget:
    """Architecture, block count, attention heads and tensor shapes (numpy order) of a GGUF base model."""
    from loraformat.engines.llamacpp import GGUF_ARCHITECTURES, GgufTarget

    gguf = _gguf()
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError("no such GGUF file", path=p)
    try:
        reader = gguf.GGUFReader(p)
    except (ValueError, OSError, KeyError) as exc:
        raise BaseMismatchError(f"is not a readable GGUF file ({exc})", path=p) from None
    fields = reader.fields

    def value(key: str) -> Any:
        field = fields.get(key)
        return field.contents() if field is not None else None

    gtype = value(gguf.Keys.General.TYPE)
    if gtype not in (None, "model"):
        raise BaseMismatchError(f"is a GGUF {gtype!r}, not a base model", path=p)
    arch = value(gguf.Keys.General.ARCHITECTURE)
    if arch not in GGUF_ARCHITECTURES:
        supported = ", ".join(sorted(GGUF_ARCHITECTURES))
        raise BaseMismatchError(
            f"GGUF base architecture {arch!r} is not supported for LoRA export (supported: {supported})",
            path=p,
        )
    n_head = int(value(gguf.Keys.Attention.HEAD_COUNT.format(arch=arch)))
    n_head_kv = value(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch))
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    return GgufTarget(
        arch=arch,
        block_count=int(value(gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch))),
        n_head=n_head,
        n_head_kv=int(n_head_kv) if n_head_kv is not None else n_head,
        permute_qk=GGUF_ARCHITECTURES[arch],
        source=str(p),
        tensor_shapes=shapes,
    )
