"""Checks on a freshly downloaded adapter before it is let anywhere near the output: every file present with the
size (and, where the hub records one, the hash) it should have; the adapter's recorded content hash against
the hash of its tensor data; the metadata against the schema and the tensors against the metadata.

Hashing reads the weights once per digest in parallel threads (hashlib and file reads release the GIL), so a
100 MB adapter costs one sha256 pass of wall time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from loraformat.errors import LoraformatError, VerificationError
from loraformat.hub.refs import WEIGHTS_FILE, safe_relpath
from loraformat.io.native import file_digest


@dataclass(frozen=True)
class Expected:
    """What a downloaded file must match: its size, and its sha256 or git blob id when the hub gives one."""

    size: int
    sha256: str | None = None
    git_oid: str | None = None


@dataclass(frozen=True)
class Verified:
    bytes: int
    content_hash: str | None  # None: nothing recorded to check (a plain PEFT adapter)
    native: bool


def verify_download(dest: Path, expected: Mapping[str, Expected], *, where: str) -> Verified:
    """Raise VerificationError unless the files in ``dest`` are complete, intact and a valid adapter."""
    from loraformat.adapter import open_adapter
    from loraformat.io.header import read_header

    total = 0
    for name, want in expected.items():
        path = dest / safe_relpath(name, repo=where)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise VerificationError(f"{where}: {name} is missing after the download") from None
        if size != want.size:
            raise VerificationError(
                f"{where}: {name} has {size} bytes, the hub records {want.size} (truncated or "
                "altered in transit)"
            )
        total += size
    weights = dest / WEIGHTS_FILE
    try:
        header = read_header(weights)
    except LoraformatError as exc:
        raise VerificationError(
            f"{where}: downloaded {WEIGHTS_FILE} is not a valid safetensors file ({exc.message})"
        ) from None
    jobs = {"data": (weights, header.data_start, b"", "sha256")}
    for name, want in expected.items():
        path = dest / name
        if want.sha256:
            jobs[f"sha256:{name}"] = (path, 0, b"", "sha256")
        elif want.git_oid:
            jobs[f"git:{name}"] = (path, 0, f"blob {want.size}\0".encode(), "sha1")
    with ThreadPoolExecutor(max_workers=min(4, len(jobs))) as pool:
        futures = {
            key: pool.submit(file_digest, path, start, prefix=prefix, algo=algo)
            for key, (path, start, prefix, algo) in jobs.items()
        }
        digests = {key: f.result() for key, f in futures.items()}
    for name, want in expected.items():
        got = digests.get(f"sha256:{name}") or digests.get(f"git:{name}") or ""
        recorded = want.sha256 or want.git_oid
        if recorded and got != recorded:
            raise VerificationError(
                f"{where}: {name} hashes to {(got or '')[:16]}…, the hub records {recorded[:16]}… "
                "(corrupted in transit or on the hub)"
            )
    try:
        adapter = open_adapter(dest, check=True)
    except LoraformatError as exc:
        raise VerificationError(f"{where}: the downloaded adapter is invalid: {exc.message}") from None
    with adapter:
        native = adapter.source_format == "loraformat"
        recorded = adapter.meta.content_hash if native else None
    if recorded is not None and digests["data"] != recorded:
        raise VerificationError(
            f"{where}: tensor data hashes to {digests['data'][:16]}…, the adapter records "
            f"{recorded[:16]}… (the tensors were altered)"
        )
    return Verified(total, recorded, native)


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
