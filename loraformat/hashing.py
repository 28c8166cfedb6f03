"""Base-model hashing (spec/v1.md §Base-model hashing).

- tensor digest = sha256(b"loraformat-tensor/1\\0" + name + b"\\0" + dtype + b"\\0" + shape + b"\\0" + raw bytes)
- content hash  = sha256 over the sorted per-tensor digests (raw 32-byte digests, sorted bytewise)
- structure hash = sha256 over the sorted lines "name\\tdtype\\tshape\\n" from the headers alone

Both are independent of sharding, file names, tensor order and header padding. Hashing is one streaming pass
over mmapped files (bounded memory: the page cache, not our heap); hashlib releases the GIL, so a thread
pool uses every core. A file truncated by another process *while* it is hashed can kill the process (SIGBUS):
the headers were checked against the file sizes just before.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loraformat.constants import HASH_ALGORITHM
from loraformat.errors import BaseMismatchError, InputNotFoundError, LoraformatError
from loraformat.io.atomic import atomic_file
from loraformat.io.checkpoint import Checkpoint, open_checkpoint
from loraformat.io.header import TensorInfo

_DOMAIN = b"loraformat-tensor/1\0"
_CHUNK = 64 << 20


def shape_text(shape: Iterable[int]) -> str:
    return ",".join(str(d) for d in shape)


def start_tensor_digest(name: str, dtype: str, shape: Iterable[int]) -> hashlib._Hash:
    """A sha256 object primed with the canonical prefix; feed it the tensor's raw bytes."""
    h = hashlib.sha256(_DOMAIN)
    h.update(name.encode("utf-8") + b"\0" + dtype.encode() + b"\0" + shape_text(shape).encode() + b"\0")
    return h


def tensor_digest(name: str, dtype: str, shape: Iterable[int], data: bytes | memoryview) -> str:
    h = start_tensor_digest(name, dtype, shape)
    h.update(data)
    return h.hexdigest()


def content_hash_of(digests: Iterable[str]) -> str:
    h = hashlib.sha256()
    for d in sorted(bytes.fromhex(x) for x in digests):
        h.update(d)
    return h.hexdigest()


def structure_hash_of(infos: Iterable[TensorInfo]) -> str:
    lines = sorted(f"{i.name}\t{i.dtype}\t{shape_text(i.shape)}\n" for i in infos)
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def structure_hash(checkpoint: Checkpoint) -> str:
    return structure_hash_of(info for _, info in checkpoint.locations.values())


@dataclass
class BaseHashes:
    structure_hash: str
    content_hash: str
    tensor_digests: dict[str, str] = field(repr=False)
    algorithm: str = HASH_ALGORITHM
    total_bytes: int = 0
    seconds: float = 0.0
    cached: bool = False

    def to_json(self, *, with_digests: bool = False) -> dict[str, object]:
        d = asdict(self)
        if not with_digests:
            d.pop("tensor_digests")
        return d


def _cache_dir() -> Path:
    env = os.environ.get("LORAFORMAT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loraformat"


def _cache_key(ck: Checkpoint) -> str:
    """Identity of the checkpoint files: absolute path, size, mtime (ns), inode and the raw header bytes of
    every shard. Rewriting a file changes at least its mtime; the header catches a changed layout."""
    h = hashlib.sha256(HASH_ALGORITHM.encode())
    for shard in sorted(ck.shards, key=lambda s: os.path.abspath(s.path)):
        with open(shard.path, "rb") as f:
            st = os.fstat(f.fileno())
            h.update(f"{os.path.abspath(shard.path)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0".encode())
            h.update(f.read(8 + shard.header_size))
    return h.hexdigest()


def _cache_load(key: str, ck: Checkpoint) -> BaseHashes | None:
    """A cached result, or None when absent, unreadable or not consistent with the headers at hand."""
    try:
        data = json.loads((_cache_dir() / "hashes" / f"{key}.json").read_text("utf-8"))
        hit = BaseHashes(**{**data, "cached": True})
    except (OSError, ValueError, TypeError):
        return None
    if (
        hit.algorithm != HASH_ALGORITHM
        or not isinstance(hit.tensor_digests, dict)
        or set(hit.tensor_digests) != set(ck.locations)
        or hit.structure_hash != structure_hash(ck)
        or hit.content_hash != content_hash_of(hit.tensor_digests.values())
    ):
        return None
    return hit


def _cache_store(key: str, hashes: BaseHashes) -> None:
    folder = _cache_dir() / "hashes"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(folder / f"{key}.json", overwrite=True) as f:
            f.write(json.dumps(hashes.to_json(with_digests=True)).encode())
    except (OSError, LoraformatError):  # a cache that cannot be written only makes the next run slower
        pass


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _drop(mapped: mmap.mmap, start: int, end: int) -> None:
    """Unmap hashed pages from the process (the page cache keeps them): mapped pages count in the resident set,
    so without this hashing a model grows RSS to the model's size."""
    first = start - start % mmap.PAGESIZE
    if hasattr(mmap, "MADV_DONTNEED") and end > first:
        mapped.madvise(mmap.MADV_DONTNEED, first, end - first)


class _Cancelled(Exception):
    pass


def hash_tensors(
    ck: Checkpoint,
    names: Iterable[str] | None = None,
    *,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, str]:
    """Digest the named tensors (all by default), largest first, on a thread pool over mmapped shards.

    One tensor's digest is a single sha256 stream, so tensors (not chunks of one) are the unit of parallel
    work; largest-first keeps every core busy until the end. ``progress(n)`` is called on the calling thread
    with the bytes done (summing to the bytes hashed). Ctrl-C stops the workers within one chunk.
    """
    wanted = list(dict.fromkeys(names)) if names is not None else list(ck.locations)
    for name in wanted:
        if name not in ck.locations:
            raise BaseMismatchError(f"base has no tensor {name!r}", path=ck.path)
    if not wanted:
        return {}
    stop = threading.Event()
    events: queue.SimpleQueue[tuple[str, object, object]] = queue.SimpleQueue()
    maps: dict[str, mmap.mmap] = {}
    try:
        for shard in {ck.locations[n][0].path: ck.locations[n][0] for n in wanted}.values():
            with open(shard.path, "rb") as f:
                maps[shard.path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

        order = sorted(wanted, key=lambda n: (-ck.locations[n][1].nbytes, n))
        n_workers = max(1, min(workers or default_workers(), len(order)))
        digests: dict[str, str] = {}
        pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="loraformat-hash")
        try:
            for name in order:
                pool.submit(_digest_one, name, ck, maps, stop, events)
            while len(digests) < len(order):
                try:
                    kind, a, b = events.get(timeout=0.25)
                except queue.Empty:
                    continue
                _handle(kind, a, b, digests, progress, ck)
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
        return digests
    finally:
        for m in maps.values():
            m.close()


def _digest_one(
    name: str,
    ck: Checkpoint,
    maps: dict[str, mmap.mmap],
    stop: threading.Event,
    events: queue.SimpleQueue[tuple[str, object, object]],
) -> None:
    """A worker: one tensor's digest, chunk by chunk (each dropped from memory once hashed), reported as events:
    ("bytes", n, None), ("done", name, digest) or ("error", exception, None)."""
    try:
        shard, info = ck.locations[name]
        h = start_tensor_digest(name, info.dtype, info.shape)
        if info.nbytes:
            with memoryview(maps[shard.path]) as view:
                for pos in range(info.start, info.end, _CHUNK):
                    if stop.is_set():
                        raise _Cancelled
                    end = min(pos + _CHUNK, info.end)
                    with view[pos:end] as chunk:
                        h.update(chunk)
                    _drop(maps[shard.path], pos, end)
                    events.put(("bytes", end - pos, None))
        events.put(("done", name, h.hexdigest()))
    except BaseException as exc:  # handed to the calling thread, which re-raises it
        events.put(("error", exc, None))


def _handle(
    kind: str,
    a: object,
    b: object,
    digests: dict[str, str],
    progress: Callable[[int], None] | None,
    ck: Checkpoint,
) -> None:
    """One worker event on the calling thread: progress, a finished digest, or a worker's error raised here."""
    if kind == "bytes":
        if progress:
            progress(int(a))  # type: ignore[call-overload]
    elif kind == "done":
        digests[str(a)] = str(b)
    else:
        assert isinstance(a, BaseException)
        if isinstance(a, _Cancelled):
            return
        if isinstance(a, OSError):
            raise InputNotFoundError(f"reading failed: {a.strerror or a}", path=ck.path) from None
        raise a


def hash_base(
    path: str | os.PathLike[str] | Checkpoint,
    *,
    use_cache: bool = True,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> BaseHashes:
    """Structure and content hashes of a base checkpoint, cached by (path, size, mtime, inode, header)."""
    ck = path if isinstance(path, Checkpoint) else open_checkpoint(path)
    key = _cache_key(ck) if use_cache else ""
    if use_cache and (hit := _cache_load(key, ck)) is not None:
        if progress:
            progress(ck.total_bytes)
        return hit
    t0 = time.perf_counter()
    digests = hash_tensors(ck, workers=workers, progress=progress)
    result = BaseHashes(
        structure_hash=structure_hash(ck),
        content_hash=content_hash_of(digests.values()),
        tensor_digests=dict(sorted(digests.items())),
        total_bytes=ck.total_bytes,
        seconds=time.perf_counter() - t0,
    )
    if use_cache:
        _cache_store(key, result)
    return result
