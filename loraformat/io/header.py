"""A strict safetensors header reader that checks everything before any tensor byte is touched.

It enforces what the safetensors Rust reader enforces (header cap, sorted contiguous offsets, byte sizes, buffer
ending at EOF) and reports each failure as a :class:`~loraformat.errors.HeaderError` naming the file and the
reason. It never imports torch, so header-only commands start fast.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass, field

from loraformat import spec
from loraformat.errors import HeaderError, InputNotFoundError
from loraformat.io.untrusted_json import gc_paused, load_json

MAX_HEADER_BYTES = 100_000_000

#: bits per element of every dtype the safetensors format knows
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
#: dtypes loraformat can do floating-point math on
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: byte offsets are absolute in the file (header included)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    file_size: int
    header_size: int  # N: the JSON length (padding included)
    tensors: dict[str, TensorInfo] = field(repr=False)
    metadata: dict[str, str]

    @property
    def data_start(self) -> int:
        return 8 + self.header_size

    @property
    def data_size(self) -> int:
        return self.file_size - self.data_start


def _fail(path: str, reason: str) -> HeaderError:
    return HeaderError(reason, path=path)


def parse_header_bytes(raw_json: bytes, *, path: str, file_size: int) -> SafetensorsHeader:
    """Validate the JSON part of a header whose 8-byte length prefix said ``len(raw_json)``."""
    n = len(raw_json)
    _check_counts(raw_json, path)
    with gc_paused():  # millions of fresh containers: the cyclic GC would rescan them again and again
        doc = load_json(raw_json, what="header", error=HeaderError, path=path, deep=False)
        if not isinstance(doc, dict):
            raise _fail(path, f"header is a JSON {type(doc).__name__}, not an object")
        metadata = _metadata(doc.pop("__metadata__", None), path)
        if len(doc) > spec.MAX_TENSORS:
            raise _fail(path, f"{len(doc)} tensors, above the limit of {spec.MAX_TENSORS} (spec/v1.md §16)")
        data_start = 8 + n
        buffer_size = file_size - data_start
        entries = sorted(_entry(name, entry, path) for name, entry in doc.items())
        del doc
        expected = 0
        tensors: dict[str, TensorInfo] = {}
        for begin, end, name, dtype, shape in entries:
            if begin < expected:
                raise _fail(path, f"tensor {name!r}: data_offsets overlap the previous tensor")
            if begin > expected:
                raise _fail(path, f"tensor {name!r}: a hole of {begin - expected} bytes before it")
            if end > buffer_size:
                raise _fail(path, f"tensor {name!r}: ends at {end}, past the {buffer_size}-byte data buffer")
            tensors[name] = TensorInfo(name, dtype, shape, data_start + begin, data_start + end)
            expected = end
    if expected != buffer_size:
        raise _fail(path, f"data buffer is {buffer_size} bytes but the tensors cover {expected}")
    return SafetensorsHeader(
        path=path, file_size=file_size, header_size=n, tensors=tensors, metadata=metadata
    )


def _metadata(raw: object, path: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _fail(path, "__metadata__ is not an object")
    if len(raw) > spec.MAX_METADATA_KEYS:
        raise _fail(path, f"__metadata__ has {len(raw)} keys, above the limit of {spec.MAX_METADATA_KEYS}")
    for key, value in raw.items():
        if not isinstance(value, str):
            raise _fail(path, f"__metadata__[{key!r}] is a {type(value).__name__}, not a string")
    return raw


def _entry(name: str, entry: object, path: str) -> tuple[int, int, str, str, tuple[int, ...]]:
    """(begin, end, name, dtype, shape) of one tensor entry, every field checked; the common case runs
    without any allocation besides the result (headers may hold MAX_TENSORS entries)."""
    if type(entry) is not dict:
        raise _fail(path, f"tensor {name!r}: entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    bits = DTYPE_BITS.get(dtype) if type(dtype) is str else None
    if bits is None:
        raise _fail(path, f"tensor {name!r}: unknown dtype {str(dtype)[:40]!r}")
    if type(shape) is not list or len(shape) > spec.MAX_SHAPE_DIMS:
        raise _fail(path, f"tensor {name!r}: shape is not a list of at most {spec.MAX_SHAPE_DIMS} sizes")
    for size in shape:
        if type(size) is not int or size < 0:
            raise _fail(path, f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        bits *= size  # exact integers: no overflow, and at most 8 factors
    if type(offsets) is not list or len(offsets) != 2:
        raise _fail(path, f"tensor {name!r}: data_offsets {str(offsets)[:60]} is not [begin, end]")
    begin, end = offsets
    if type(begin) is not int or type(end) is not int or begin < 0 or end < 0:
        raise _fail(path, f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
    if end < begin:
        raise _fail(path, f"tensor {name!r}: data_offsets end {end} before begin {begin}")
    if bits % 8 or bits // 8 != end - begin:
        want = f"{bits // 8}" if bits % 8 == 0 else f"{bits}/8"
        raise _fail(
            path, f"tensor {name!r}: {end - begin} bytes for shape {shape} of {dtype} (expected {want})"
        )
    return begin, end, name, str(dtype), tuple(shape)


def _check_counts(raw: bytes, path: str) -> None:
    """Refuse, before parsing, what would make parsing cost more than the limits allow: more tensor entries
    than MAX_TENSORS (each has exactly one "data_offsets" key) and large headers that are not ASCII (their
    text would take four bytes a character in memory)."""
    entries = raw.count(b'"data_offsets"')
    if entries > spec.MAX_TENSORS:
        raise _fail(path, f"{entries} tensor entries, above the limit of {spec.MAX_TENSORS} (spec/v1.md §16)")
    if len(raw) > spec.MAX_NON_ASCII_HEADER_BYTES and not raw.isascii():
        raise _fail(
            path,
            f"header of {len(raw)} bytes is not ASCII; above {spec.MAX_NON_ASCII_HEADER_BYTES} bytes a "
            "header must be ASCII (spec/v1.md §16)",
        )


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and fully check the header of one safetensors file."""
    path = os.fspath(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode) and not os.path.isdir(path):
            # a FIFO or a device: open() would wait for a writer forever, or read without end
            raise InputNotFoundError("is not a regular file", path=path)
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"file is {file_size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise _fail(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + n > file_size:
                raise _fail(path, f"header length {n} runs past the end of the {file_size}-byte file")
            raw = f.read(n)
    except FileNotFoundError:
        raise InputNotFoundError("no such file", path=path) from None
    except IsADirectoryError:
        raise InputNotFoundError("is a directory, not a safetensors file", path=path) from None
    except PermissionError:
        raise InputNotFoundError("permission denied", path=path) from None
    return parse_header_bytes(raw, path=path, file_size=file_size)


def encode_header(
    tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None
) -> tuple[bytes, list[tuple[int, int]]]:
    """Build the 8-byte prefix + JSON header (space-padded to 8 bytes, as safetensors does) for tensors laid
    out in the given order. Returns the bytes and each tensor's (begin, end) relative to the data buffer."""
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = dict(metadata)
    offsets = []
    pos = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * DTYPE_BITS[dtype] // 8
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append((pos, pos + nbytes))
        pos += nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets
