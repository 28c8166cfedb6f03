"""The strict safetensors header reader: a corpus of broken files, each rejected with its own message, and
fuzzing that lets no exception out but the typed ones."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraformat.errors import HeaderError, InputNotFoundError
from loraformat.io.header import MAX_HEADER_BYTES, encode_header, parse_header_bytes, read_header


def _file(
    tmp_path: Path,
    header: bytes | dict,
    data: bytes = b"",
    *,
    length: int | None = None,
    name: str = "x.safetensors",
) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def _raw(tmp_path: Path, blob: bytes) -> Path:
    path = tmp_path / "raw.safetensors"
    path.write_bytes(blob)
    return path


def _entry(dtype: str = "F32", shape: list[int] | None = None, offsets: list[int] | None = None) -> dict:
    return {
        "dtype": dtype,
        "shape": [2, 2] if shape is None else shape,
        "data_offsets": [0, 16] if offsets is None else offsets,
    }


def test_valid_file_roundtrip(tmp_path: Path) -> None:
    header, offsets = encode_header([("a", "F32", (2, 2)), ("b", "BF16", (3,))], {"format": "pt"})
    path = tmp_path / "ok.safetensors"
    path.write_bytes(header + b"\0" * 22)
    h = read_header(path)
    assert h.metadata == {"format": "pt"}
    assert [(t.name, t.shape, t.nbytes) for t in h.tensors.values()] == [("a", (2, 2), 16), ("b", (3,), 6)]
    assert h.tensors["a"].start == h.data_start and h.data_size == 22
    assert offsets == [(0, 16), (16, 22)]


def test_real_safetensors_file_is_accepted(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "st.safetensors"
    save_file({"w": torch.ones(3, 5), "b": torch.zeros(7, dtype=torch.bfloat16)}, str(path), {"format": "pt"})
    h = read_header(path)
    assert {n: t.shape for n, t in h.tensors.items()} == {"w": (3, 5), "b": (7,)}


BROKEN = {
    # name: (builder(tmp_path) -> path, expected message fragment)
    "truncated": (lambda p: _raw(p, b"\x10\x00\x00"), "too short for a safetensors header"),
    "truncated_data": (
        lambda p: _raw(p, _file(p, {"a": _entry()}, b"\0" * 16).read_bytes()[:-5]),
        "past the 11-byte data buffer",
    ),
    "lying_length": (lambda p: _file(p, {"a": _entry()}, b"\0" * 16, length=10_000), "runs past the end"),
    "over_cap": (lambda p: _file(p, b"{}", length=MAX_HEADER_BYTES + 1), "exceeds the 100000000-byte limit"),
    "non_json": (lambda p: _file(p, b"{not json"), "not valid JSON"),
    "not_utf8": (lambda p: _file(p, b'{"\xff": 1}'), "not valid JSON"),
    "json_array": (lambda p: _file(p, b"[1, 2]"), "header is a JSON list, not an object"),
    "overlap": (
        lambda p: _file(p, {"a": _entry(offsets=[0, 16]), "b": _entry(offsets=[8, 24])}, b"\0" * 24),
        "overlap the previous tensor",
    ),
    "hole": (
        lambda p: _file(p, {"a": _entry(offsets=[0, 16]), "b": _entry(offsets=[20, 36])}, b"\0" * 36),
        "a hole of 4 bytes",
    ),
    "past_eof": (
        lambda p: _file(p, {"a": _entry(offsets=[0, 16])}, b"\0" * 8),
        "past the 8-byte data buffer",
    ),
    "trailing_bytes": (lambda p: _file(p, {"a": _entry()}, b"\0" * 20), "data buffer is 20 bytes"),
    "byte_size": (lambda p: _file(p, {"a": _entry(shape=[3, 2])}, b"\0" * 16), "16 bytes for shape [3, 2]"),
    "unknown_dtype": (lambda p: _file(p, {"a": _entry(dtype="F128")}, b"\0" * 16), "unknown dtype 'F128'"),
    "bad_shape": (
        lambda p: _file(p, {"a": _entry(shape=[2, -2])}, b"\0" * 16),
        "is not a list of non-negative",
    ),
    "bad_offsets": (lambda p: _file(p, {"a": _entry(offsets=[0])}, b"\0" * 16), "is not [begin, end]"),
    "reversed_offsets": (
        lambda p: _file(p, {"a": _entry(shape=[0], offsets=[16, 0])}, b"\0" * 16),
        "end 0 before begin 16",
    ),
    "entry_not_object": (lambda p: _file(p, {"a": [1, 2]}), "entry is not an object"),
    "metadata_not_string": (
        lambda p: _file(p, {"__metadata__": {"format": "pt", "n": 3}}),
        "__metadata__['n'] is a int, not a string",
    ),
    "metadata_not_object": (lambda p: _file(p, {"__metadata__": ["pt"]}), "__metadata__ is not an object"),
    "deep_nesting": (lambda p: _file(p, b"[" * 100_000), "nested deeper than 64 levels"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_file_rejected_with_its_own_message(tmp_path: Path, case: str) -> None:
    build, fragment = BROKEN[case]
    path = build(tmp_path)
    with pytest.raises(HeaderError) as info:
        read_header(path)
    assert fragment in str(info.value)
    assert str(info.value).startswith(str(path) + ": ")  # names the file
    assert "\n" not in str(info.value)


def test_messages_are_distinct(tmp_path: Path) -> None:
    messages = set()
    for i, case in enumerate(sorted(BROKEN)):
        folder = tmp_path / str(i)
        folder.mkdir()
        with pytest.raises(HeaderError) as info:
            read_header(BROKEN[case][0](folder))
        messages.add(info.value.message)
    assert len(messages) >= len(BROKEN) - 2  # non_json and not_utf8 share one reason


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="no such file"):
        read_header(tmp_path / "nope.safetensors")
    with pytest.raises(InputNotFoundError, match="is a directory"):
        read_header(tmp_path)


# --- fuzzing ---------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "F4", "F6_E2M3", "BOOL", "X"]) | json_values,
        "shape": st.lists(st.integers(-2, 5), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-4, 80), min_size=0, max_size=3) | json_values,
    },
)
headers = st.dictionaries(
    st.text(min_size=1, max_size=6),
    entries | json_values,
    max_size=4,
).map(lambda d: d) | st.fixed_dictionaries(
    {"__metadata__": st.dictionaries(st.text(max_size=4), st.text(max_size=4) | json_values, max_size=3)}
)


def _parse(raw: bytes, file_size: int) -> None:
    try:
        parse_header_bytes(raw, path="fuzz", file_size=file_size)
    except HeaderError:
        pass


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200), extra=st.integers(0, 200))
def test_fuzz_parse_random_bytes(raw: bytes, extra: int) -> None:
    _parse(raw, 8 + len(raw) + extra)


@settings(max_examples=400, deadline=None)
@given(doc=headers, extra=st.integers(0, 100))
def test_fuzz_parse_structured_headers(doc: dict, extra: int) -> None:
    raw = json.dumps(doc).encode()
    _parse(raw, 8 + len(raw) + extra)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=120), prefix=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_fuzz_read_header_files(tmp_path: Path, data: bytes, prefix: int | None) -> None:
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes((struct.pack("<Q", prefix) if prefix is not None else b"") + data)
    try:
        read_header(path)
    except (HeaderError, InputNotFoundError):
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutated_valid_file(tmp_path: Path, data: st.DataObject) -> None:
    """Flip, cut or extend bytes of a valid file: either it still parses consistently or HeaderError."""
    header, _ = encode_header([("a", "F32", (2, 3)), ("b", "F16", (4,))], {"format": "pt"})
    blob = bytearray(header + bytes(32))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "extend"]))
        if op == "flip" and blob:
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del blob[data.draw(st.integers(0, len(blob))) :]
        else:
            blob += data.draw(st.binary(min_size=1, max_size=16))
    path = tmp_path / "m.safetensors"
    path.write_bytes(bytes(blob))
    try:
        h = read_header(path)
    except HeaderError:
        return
    covered = sum(t.nbytes for t in h.tensors.values())
    assert covered == h.data_size and h.data_start + h.data_size == len(blob)


def test_a_fifo_or_device_is_refused_at_once(tmp_path) -> None:
    """`loraformat inspect` on a named pipe waited forever for a writer; it is now a usage error."""
    import os
    import subprocess
    import sys

    fifo = tmp_path / "adapter.safetensors"
    os.mkfifo(fifo)
    for target in (fifo, "/dev/zero"):
        done = subprocess.run(
            [sys.executable, "-c", "from loraformat.cli.main import main; main()", "inspect", str(target)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and "is not a regular file" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
