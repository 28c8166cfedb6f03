"""A strict safetensors header reader that checks everything before any tensor byte is touched.

It enforces what the safetensors Rust reader enforces (header cap, sorted contiguous offsets, byte sizes, buffer
ending at EOF) and reports each failure as a :class:`~loraformat.errors.HeaderError` naming the file and the
reason. It never imports torch, so header-only commands start fast.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field

from loraformat.errors import HeaderError, InputNotFoundError

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
    try:
        doc = json.loads(raw_json.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise _fail(path, f"header is not valid UTF-8 JSON ({exc.__class__.__name__})") from None
    if not isinstance(doc, dict):
        raise _fail(path, f"header is a JSON {type(doc).__name__}, not an object")

    metadata_raw = doc.pop("__metadata__", None)
    metadata: dict[str, str] = {}
    if metadata_raw is not None:
        if not isinstance(metadata_raw, dict):
            raise _fail(path, "__metadata__ is not an object")
        for key, value in metadata_raw.items():
            if not isinstance(value, str):
                raise _fail(path, f"__metadata__[{key!r}] is a {type(value).__name__}, not a string")
        metadata = dict(metadata_raw)

    data_start = 8 + n
    buffer_size = file_size - data_start
    entries: list[tuple[int, int, str, str, tuple[int, ...]]] = []
    for name, entry in doc.items():
        if not isinstance(entry, dict):
            raise _fail(path, f"tensor {name!r}: entry is not an object")
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise _fail(path, f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _fail(path, f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)
        ):
            raise _fail(path, f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        if end < begin:
            raise _fail(path, f"tensor {name!r}: data_offsets end {end} before begin {begin}")
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != end - begin:
            raise _fail(
                path,
                f"tensor {name!r}: {end - begin} bytes for shape {shape} of {dtype} (expected {bits / 8:g})",
            )
        entries.append((begin, end, name, dtype, tuple(shape)))

    entries.sort()
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


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and fully check the header of one safetensors file."""
    path = os.fspath(path)
    try:
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
