"""Write the native loraformat file: one safetensors file whose __metadata__ holds ``format: pt``, the
loraformat document and the ModelSpec keys (spec/v1.md §Container, §Metadata)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loraformat import __version__
from loraformat.constants import (
    FORMAT_KEY,
    FORMAT_VALUE,
    METADATA_KEY,
    MODELSPEC_ARCH_SUFFIX,
    MODELSPEC_VERSION,
    Format,
    ModelSpecKey,
)
from loraformat.errors import AdapterError
from loraformat.io.atomic import atomic_file
from loraformat.io.header import DTYPE_BITS, encode_header
from loraformat.io.tensors import st_dtype, tensor_to_bytes
from loraformat.metadata import AdapterMetadata
from loraformat.rules import first_problem
from loraformat.schema import validate_document

if TYPE_CHECKING:
    import torch


def layout_order(items: Mapping[str, tuple[str, tuple[int, ...]]]) -> list[str]:
    """safetensors' own order: larger dtypes first (keeps every tensor aligned), then by name."""
    return sorted(items, key=lambda k: (-DTYPE_BITS[items[k][0]], k))


def build_metadata(meta: AdapterMetadata, content_hash: str) -> dict[str, str]:
    """The string-to-string __metadata__ map for a native file whose data section hashes to content_hash."""
    meta.content_hash = content_hash
    if not meta.created_by:
        meta.created_by = {"tool": "loraformat", "version": __version__}
    document = meta.to_dict()
    arch = (meta.base_model.id or "unknown").split("/")[-1] + MODELSPEC_ARCH_SUFFIX
    return {
        FORMAT_KEY: FORMAT_VALUE,
        METADATA_KEY: json.dumps(document, sort_keys=True, separators=(",", ":")),
        ModelSpecKey.SAI_MODEL_SPEC.value: MODELSPEC_VERSION,
        ModelSpecKey.ARCHITECTURE.value: arch,
        ModelSpecKey.IMPLEMENTATION.value: "https://github.com/huggingface/peft",
        ModelSpecKey.TITLE.value: meta.name,
        ModelSpecKey.DESCRIPTION.value: meta.description,
        ModelSpecKey.DATE.value: meta.created,
        ModelSpecKey.HASH_SHA256.value: "0x" + content_hash,
    }


def write_native(
    path: str | os.PathLike[str],
    meta: AdapterMetadata,
    tensors: Mapping[str, torch.Tensor],
    *,
    overwrite: bool = False,
    check: bool = True,
) -> str:
    """Write tensors + metadata atomically; returns the content hash (sha256 of the data section).

    Sets ``meta.content_hash`` (and ``meta.created_by`` when empty). With ``check`` (the default) the document
    must validate against the schema and the tensors must agree with it (Adapter.problems), so loraformat never
    writes a file its own validate would reject.
    """
    shapes = {k: (st_dtype(t.dtype), tuple(t.shape)) for k, t in tensors.items()}
    if check:
        _check_before_write(path, meta, shapes)
    encoded = encode_tensors(tensors)
    metadata = build_metadata(meta, encoded.content_hash)
    if check:
        validate_document(json.loads(metadata[METADATA_KEY]), path=os.fspath(path))
    write_encoded(path, encoded, metadata, overwrite=overwrite)
    return encoded.content_hash


@dataclass
class EncodedTensors:
    """Tensors as safetensors will lay them out: the order, dtype and shape of each, the raw bytes, and the
    sha256 of the data section (which metadata may need before the header is written)."""

    order: list[str]
    shapes: dict[str, tuple[str, tuple[int, ...]]]
    blobs: dict[str, bytes]
    content_hash: str

    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        return [(k, *self.shapes[k]) for k in self.order]


def encode_tensors(tensors: Mapping[str, torch.Tensor]) -> EncodedTensors:
    """Serialise tensors in safetensors' own order and hash the data section."""
    shapes = {k: (st_dtype(t.dtype), tuple(t.shape)) for k, t in tensors.items()}
    order = layout_order(shapes)
    blobs = {k: tensor_to_bytes(tensors[k]) for k in order}
    digest = hashlib.sha256()
    for k in order:
        digest.update(blobs[k])
    return EncodedTensors(order, shapes, blobs, digest.hexdigest())


def write_encoded(
    path: str | os.PathLike[str], encoded: EncodedTensors, metadata: dict[str, str], *, overwrite: bool
) -> None:
    """Write header + data atomically (temporary name, fsync, rename), releasing each blob once written."""
    header, _ = encode_header(encoded.entries(), metadata)
    with atomic_file(Path(path), overwrite=overwrite) as f:
        f.write(header)
        for k in encoded.order:
            f.write(encoded.blobs[k])
            encoded.blobs[k] = b""  # release as we go: peak memory stays near one copy


def _check_before_write(
    path: str | os.PathLike[str], meta: AdapterMetadata, shapes: Mapping[str, tuple[str, tuple[int, ...]]]
) -> None:
    from loraformat.adapter import Adapter
    from loraformat.io.header import TensorInfo
    from loraformat.io.tensors import TensorSource

    source = TensorSource()
    source.path = os.fspath(path)
    source.infos = {k: TensorInfo(k, dt, shape, 0, 0) for k, (dt, shape) in shapes.items()}
    problems = Adapter(meta, source, Format.LORAFORMAT, os.fspath(path)).problems()
    if problems:
        raise AdapterError(f"refusing to write an inconsistent adapter: {first_problem(problems)}", path=path)


def file_digest(
    path: str | os.PathLike[str], start: int = 0, *, prefix: bytes = b"", algo: str = "sha256"
) -> str:
    """Hex digest of ``prefix`` + the file's bytes from ``start`` to EOF, read in 4 MiB chunks into one reused
    buffer (no allocation per chunk: a third of the time of validate's data level went to fresh pages)."""
    digest = hashlib.new(algo)
    digest.update(prefix)
    view = memoryview(bytearray(1 << 22))
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while n := f.readinto(view):
            digest.update(view[:n])
    return digest.hexdigest()


def data_section_hash(path: str | os.PathLike[str], data_start: int) -> str:
    """sha256 of everything after the header: the adapter content hash (ModelSpec hash_sha256)."""
    return file_digest(path, data_start)
