"""Base-model hashing: independent of sharding, file names, tensor order and header padding; sensitive to every
byte; structure hash from headers alone; the cache; ``loraformat hash``."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from loraformat.hashing import (
    content_hash_of,
    hash_base,
    hash_tensors,
    structure_hash,
    structure_hash_of,
    tensor_digest,
)
from loraformat.io.checkpoint import open_checkpoint
from loraformat.io.header import encode_header

EXE = shutil.which("loraformat")


def raw_tensors(base: Path) -> list[tuple[str, str, tuple[int, ...], bytes]]:
    ck = open_checkpoint(base)
    out = []
    for name, (shard, info) in ck.locations.items():
        with open(shard.path, "rb") as f:
            f.seek(info.start)
            out.append((name, info.dtype, info.shape, f.read(info.nbytes)))
    return out


def write_file(path: Path, tensors, *, pad: int = 0, metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file of (name, dtype, shape, bytes) in the given order, with ``pad`` extra spaces of
    header padding (safetensors allows trailing whitespace in the header)."""
    header, _ = encode_header([(n, d, s) for n, d, s, _ in tensors], metadata)
    body = header[8:] + b" " * pad
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        for *_, data in tensors:
            f.write(data)
    return path


def test_sharded_equals_single(llama_base, llama_base_sharded):
    single, sharded = open_checkpoint(llama_base), open_checkpoint(llama_base_sharded)
    assert len(single.shards) == 1 and len(sharded.shards) > 1  # the fixtures really differ in layout
    a, b = hash_base(single, use_cache=False), hash_base(sharded, use_cache=False)
    assert a.structure_hash == b.structure_hash
    assert a.content_hash == b.content_hash
    assert a.tensor_digests == b.tensor_digests
    assert a.total_bytes == b.total_bytes == single.total_bytes


def test_independent_of_order_padding_names_and_shards(llama_base, tmp_path):
    ref = hash_base(llama_base, use_cache=False)
    tensors = raw_tensors(llama_base)
    reordered = write_file(
        tmp_path / "other-name.safetensors",
        list(reversed(tensors)),
        pad=120,
        metadata={"format": "pt", "note": "different metadata too"},
    )
    got = hash_base(reordered, use_cache=False)
    assert (got.structure_hash, got.content_hash) == (ref.structure_hash, ref.content_hash)

    # three shards with arbitrary names and a hand-written index
    shards = tmp_path / "shards"
    shards.mkdir()
    weight_map = {}
    for i, part in enumerate((tensors[::3], tensors[1::3], tensors[2::3])):
        fname = f"part-{'abc'[i]}.safetensors"
        write_file(shards / fname, part, pad=i * 8)
        weight_map.update({n: fname for n, *_ in part})
    (shards / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    got = hash_base(shards, use_cache=False)
    assert (got.structure_hash, got.content_hash) == (ref.structure_hash, ref.content_hash)
    assert got.tensor_digests == ref.tensor_digests


def test_one_byte_changes_content_not_structure(llama_base, tmp_path):
    ref = hash_base(llama_base, use_cache=False)
    tensors = raw_tensors(llama_base)
    name, dtype, shape, data = tensors[5]
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x01
    tensors[5] = (name, dtype, shape, bytes(flipped))
    got = hash_base(write_file(tmp_path / "m.safetensors", tensors), use_cache=False)
    assert got.structure_hash == ref.structure_hash
    assert got.content_hash != ref.content_hash
    assert {k for k in ref.tensor_digests if ref.tensor_digests[k] != got.tensor_digests[k]} == {name}


def test_name_dtype_shape_are_part_of_the_digest():
    data = bytes(range(16))
    base = tensor_digest("w", "F32", (2, 2), data)
    assert base != tensor_digest("v", "F32", (2, 2), data)
    assert base != tensor_digest("w", "I32", (2, 2), data)
    assert base != tensor_digest("w", "F32", (4,), data)
    # the canonical encoding, pinned: a change here is a change of the hash algorithm id
    expected = hashlib.sha256(b"loraformat-tensor/1\0w\0F32\0" + b"2,2\0" + data).hexdigest()
    assert base == expected
    digests = [tensor_digest(n, "F32", (4,), data) for n in "abc"]
    assert content_hash_of(digests) == content_hash_of(reversed(digests))
    assert (
        content_hash_of(digests)
        == hashlib.sha256(b"".join(sorted(bytes.fromhex(d) for d in digests))).hexdigest()
    )


def test_structure_hash_reads_no_tensor_data(tmp_path):
    """A sparse 4 GiB checkpoint: the structure hash comes from the header alone."""
    path = tmp_path / "big.safetensors"
    header, _ = encode_header([("huge", "F32", (1 << 30,)), ("small", "F16", (8,))], {"format": "pt"})
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + (1 << 32) + 16)

    def io_now() -> tuple[int, int]:
        with open("/proc/self/io") as f:
            rchar = int(next(line for line in f if line.startswith("rchar")).split()[1])
        return rchar, resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    r0, f0 = io_now()
    ck = open_checkpoint(path)
    h = structure_hash(ck)
    r1, f1 = io_now()
    assert h == structure_hash_of(info for _, info in ck.locations.values())
    assert r1 - r0 < 1 << 20  # read syscalls: far below the 4 GiB of data
    assert f1 - f0 < 20_000  # page faults: an mmap read of 4 GiB would take ~1M


def test_cache_hit_and_invalidation(llama_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    first = hash_base(base)
    assert first.cached is False
    second = hash_base(base)
    assert second.cached is True
    assert (second.structure_hash, second.content_hash, second.tensor_digests) == (
        first.structure_hash,
        first.content_hash,
        first.tensor_digests,
    )

    weights = base / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same bytes, new mtime
    assert hash_base(base).cached is False
    assert hash_base(base).cached is True

    # a rewrite with a different header (padding): size and header change; same content hash, not cached
    tensors = raw_tensors(base)
    write_file(weights, tensors, pad=16, metadata={"format": "pt"})
    again = hash_base(base)
    assert again.cached is False and again.content_hash == first.content_hash

    # a corrupted cache entry is ignored, never trusted
    for entry in (tmp_path / ".lfcache" / "hashes").glob("*.json"):
        doc = json.loads(entry.read_text())
        doc["content_hash"] = "0" * 64
        entry.write_text(json.dumps(doc))
    redo = hash_base(base)
    assert redo.cached is False and redo.content_hash == first.content_hash
    assert hash_base(base, use_cache=False).cached is False


def test_progress_receives_total_bytes(llama_base_sharded):
    ck = open_checkpoint(llama_base_sharded)
    seen: list[int] = []
    result = hash_base(ck, use_cache=True, progress=seen.append)
    assert sum(seen) == ck.total_bytes == result.total_bytes and len(seen) > 1
    seen.clear()
    assert hash_base(ck, progress=seen.append).cached is True
    assert sum(seen) == ck.total_bytes


def test_workers_and_subsets_agree(llama_base):
    ck = open_checkpoint(llama_base)
    one = hash_tensors(ck, workers=1)
    assert one == hash_tensors(ck, workers=4)
    names = sorted(one)[:3]
    assert hash_tensors(ck, names) == {n: one[n] for n in names}


def test_hash_cli_json(llama_base_sharded, tmp_path):
    env = {**os.environ, "LORAFORMAT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [EXE, "hash", str(llama_base_sharded), "--json"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    ref = hash_base(llama_base_sharded, use_cache=False)
    assert doc["structure_hash"] == ref.structure_hash and doc["content_hash"] == ref.content_hash
    assert doc["algorithm"] == ref.algorithm and doc["total_bytes"] == ref.total_bytes
    assert (
        doc["tensors"] == len(ref.tensor_digests) and doc["cached"] is False and "tensor_digests" not in doc
    )
    proc = subprocess.run(
        [EXE, "hash", str(llama_base_sharded), "--json", "--digests"], capture_output=True, text=True, env=env
    )
    doc = json.loads(proc.stdout)
    assert doc["cached"] is True and doc["tensor_digests"] == ref.tensor_digests

    proc = subprocess.run([EXE, "hash", str(llama_base_sharded)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0
    assert (
        f"structure  {ref.structure_hash}" in proc.stdout and f"content    {ref.content_hash}" in proc.stdout
    )


@pytest.mark.parametrize("setup,code", [("missing", 2), ("pickle", 1), ("truncated", 1)])
def test_hash_cli_errors(setup, code, tmp_path, llama_base):
    target = tmp_path / "base"
    if setup == "pickle":
        target.mkdir()
        (target / "pytorch_model.bin").write_bytes(b"\x80\x04")
    elif setup == "truncated":
        target.mkdir()
        data = (llama_base / "model.safetensors").read_bytes()
        (target / "model.safetensors").write_bytes(data[:-10])
    proc = subprocess.run([EXE, "hash", str(target)], capture_output=True, text=True)
    assert proc.returncode == code
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


def test_hash_does_not_import_torch(llama_base, tmp_path):
    code = (
        "import sys; from loraformat.hashing import hash_base; "
        f"hash_base({str(llama_base)!r}, use_cache=False); print('torch' in sys.modules)"
    )
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_interrupt_stops_the_workers(llama_base):
    import threading

    ck = open_checkpoint(llama_base)
    calls = []

    def progress(n: int) -> None:
        calls.append(n)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hash_tensors(ck, workers=2, progress=progress)
    assert len(calls) == 1
    assert not [t for t in threading.enumerate() if t.name.startswith("loraformat-hash")]
