"""The merge's file I/O, no math: mapped inputs, reusable host buffers, output shards written at planned offsets.

- :class:`Sources` maps each input file once (read-only pages of the page cache: no copy into our memory) and
  drops each range from the process's resident set as soon as it has been used, so RSS stays bounded by what is
  in flight, not by the model size.
- :class:`Outputs` creates the shards in the temporary directory, reserves their full size (a full disk fails
  before any work), writes each header first, then data at absolute offsets from any thread, copies untouched
  ranges inside the kernel (``os.copy_file_range``, else bounded pread/pwrite), and starts writeback of what is
  written early so the final fsync waits only for the tail.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
from pathlib import Path
from typing import Any

from loraformat.errors import HeaderError, InputNotFoundError
from loraformat.io.atomic import write_error

MiB = 1 << 20
WRITEBACK_KICK = 64 * MiB
_COPY_CHUNK = 8 * MiB
_CFR_FALLBACK = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM, errno.ETXTBSY}
_WRITE_SIDE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS}
_PAGE = mmap.PAGESIZE


class Stop(Exception):
    """Another stage failed or the run was interrupted: unwind quietly, the first error is raised elsewhere."""


def get(q: queue.Queue[Any], abort: threading.Event) -> Any:
    while True:
        try:
            return q.get(timeout=0.05)
        except queue.Empty:
            if abort.is_set():
                raise Stop from None


def put(q: queue.Queue[Any], item: Any, abort: threading.Event) -> None:
    while True:
        try:
            q.put(item, timeout=0.05)
            return
        except queue.Full:
            if abort.is_set():
                raise Stop from None


class Buffer:
    """A reusable host buffer: ``mem`` for the I/O threads, ``tensor()`` (a torch uint8 view) for the merge.
    Pinned (page-locked, through torch) for fast host<->GPU copies, else an anonymous mapping whose pages are
    only resident once used."""

    def __init__(self, nbytes: int, pinned: bool = False, pooled: bool = True) -> None:
        self.nbytes, self.pooled = nbytes, pooled
        self._raw: Any = None
        self._tensor: Any = None
        if pinned:
            import torch

            self._tensor = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
            self.mem = memoryview(self._tensor.numpy())[:nbytes]
        else:
            self._raw = mmap.mmap(-1, max(nbytes, 1))
            self.mem = memoryview(self._raw)[:nbytes]

    def array(self) -> Any:
        """A numpy uint8 view of the buffer (the numpy CPU backend: no torch)."""
        import numpy as np

        return np.frombuffer(self.mem, dtype=np.uint8)

    def tensor(self) -> Any:
        if self._tensor is None:
            import torch

            self._tensor = torch.frombuffer(self._raw, dtype=torch.uint8)
        return self._tensor


class Pool:
    """A bounded set of equal buffers made on first use; a request larger than one buffer gets its own."""

    def __init__(self, count: int, nbytes: int, abort: threading.Event, pinned: bool = False) -> None:
        self.count, self.nbytes, self.pinned, self.abort = count, nbytes, pinned, abort
        self.free: queue.Queue[Buffer] = queue.Queue()
        self.made = 0
        self.lock = threading.Lock()

    def get(self, nbytes: int) -> Buffer:
        if nbytes > self.nbytes:
            return Buffer(nbytes, self.pinned, pooled=False)
        with self.lock:
            if self.free.empty() and self.made < self.count:
                self.made += 1
                return Buffer(self.nbytes, self.pinned)
        return get(self.free, self.abort)

    def put(self, buf: Buffer) -> None:
        if buf.pooled:
            self.free.put(buf)


def pread_into(fd: int, mem: memoryview, offset: int, path: str) -> None:
    got, n = 0, len(mem)
    while got < n:
        try:
            k = os.preadv(fd, [mem[got:]], offset + got)
        except OSError as exc:
            raise InputNotFoundError(f"read failed: {exc.strerror}", path=path) from None
        if k == 0:
            raise HeaderError(
                "file is shorter than its header says (truncated or changed while merging)", path=path
            )
        got += k


def read_array(path: str, start: int, nbytes: int) -> Any:
    """``nbytes`` raw bytes at absolute offset ``start`` of a file, as a new numpy uint8 array (small tensors
    such as LoRA factors, read without torch)."""
    import numpy as np

    buf = np.empty(nbytes, dtype=np.uint8)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise InputNotFoundError(f"cannot open: {exc.strerror}", path=path) from None
    try:
        pread_into(fd, buf.data, start, path)
    finally:
        os.close(fd)
    return buf


def pwrite_all(fd: int, mem: memoryview, offset: int) -> None:
    done, n = 0, len(mem)
    while done < n:
        done += os.pwrite(fd, mem[done:], offset + done)


class Sources:
    """Every input file, opened once; mapped read-only when ``mapped`` (the CPU merge and the hasher read
    through the mapping; the CUDA reader preads into pinned buffers)."""

    def __init__(self, paths: list[str], *, mapped: bool) -> None:
        self.fds: dict[str, int] = {}
        self.maps: dict[str, mmap.mmap] = {}
        self.sizes: dict[str, int] = {}
        for p in paths:
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError as exc:
                self.close()
                raise InputNotFoundError(f"cannot open: {exc.strerror}", path=p) from None
            self.fds[p] = fd
            self.sizes[p] = size = os.fstat(fd).st_size
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            if mapped and size:
                # ACCESS_COPY (private, writable, never written): torch.frombuffer wants a writable buffer
                m = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
                if hasattr(m, "madvise"):
                    m.madvise(mmap.MADV_SEQUENTIAL)
                self.maps[p] = m

    def _check(self, path: str, start: int, n: int) -> None:
        if start + n > self.sizes[path]:
            raise HeaderError(
                "file is shorter than its header says (truncated or changed while merging)", path=path
            )

    def view(self, path: str, start: int, n: int) -> memoryview:
        self._check(path, start, n)
        return memoryview(self.maps[path])[start : start + n]

    def tensor(self, path: str, start: int, n: int) -> Any:
        """A torch uint8 tensor over the mapped bytes (no copy)."""
        import torch

        self._check(path, start, n)
        if n == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self.maps[path], dtype=torch.uint8, count=n, offset=start)

    def array(self, path: str, start: int, n: int) -> Any:
        """A numpy uint8 array over the mapped bytes (no copy, no torch)."""
        import numpy as np

        self._check(path, start, n)
        if n == 0:
            return np.empty(0, dtype=np.uint8)
        return np.frombuffer(self.maps[path], dtype=np.uint8, count=n, offset=start)

    def _advise(self, path: str, start: int, n: int, advice: int) -> None:
        m = self.maps.get(path)
        if m is None or n <= 0 or not hasattr(m, "madvise"):
            return
        lo = start - start % _PAGE
        hi = min(self.sizes[path], start + n)
        try:
            m.madvise(advice, lo, hi - lo)
        except (OSError, ValueError):  # advice only
            pass

    def prefetch(self, path: str, start: int, n: int) -> None:
        self._advise(path, start, n, mmap.MADV_WILLNEED)

    def drop(self, path: str, start: int, n: int) -> None:
        """Unmap used pages from this process (the page cache keeps them): RSS stays bounded."""
        self._advise(path, start, n, mmap.MADV_DONTNEED)

    def close(self) -> None:
        for m in self.maps.values():
            try:
                m.close()
            except BufferError:  # a tensor still views it; the mapping goes when that tensor does
                pass
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.maps, self.fds = {}, {}


class Outputs:
    """The output shards in the temporary directory: reserved, header first, data at planned offsets."""

    def __init__(self, out_dir: Path, out: Path, shards: dict[int, tuple[str, bytes, int]]) -> None:
        """``shards``: shard index -> (file name, header, size); a worker may write a subset of a plan's."""
        self.out = out
        self.fds: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.kick: dict[int, list[int]] = {}  # per shard: [lowest, highest) written since the last kick
        self.flush_q: queue.Queue[tuple[int, int, int] | None] = queue.Queue()
        self.flusher: threading.Thread | None = None
        try:
            for index, (name, header, size) in sorted(shards.items()):
                fd = os.open(out_dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
                self.fds[index] = fd
                self.sizes[index] = size
                self.kick[index] = [size, 0]
                _reserve(fd, size)
                pwrite_all(fd, memoryview(header), 0)
        except OSError as exc:
            self.close()
            raise write_error(exc, out) from None

    def write(self, shard: int, offset: int, mem: memoryview) -> None:
        try:
            pwrite_all(self.fds[shard], mem, offset)
        except OSError as exc:
            raise write_error(exc, self.out) from None
        self._kick(shard, offset, len(mem))

    def copy(
        self,
        src_fd: int,
        src_path: str,
        shard: int,
        src_off: int,
        dst_off: int,
        n: int,
        scratch: bytearray | None,
    ) -> bytearray | None:
        """Copy a byte range from an input, inside the kernel when it can; returns the scratch buffer used."""
        out_fd = self.fds[shard]
        done = 0
        try:
            while done < n:
                k = os.copy_file_range(src_fd, out_fd, n - done, src_off + done, dst_off + done)
                if k == 0:
                    raise HeaderError("file is shorter than its header says", path=src_path)
                done += k
        except OSError as exc:
            if exc.errno in _WRITE_SIDE:
                raise write_error(exc, self.out) from None
            if exc.errno not in _CFR_FALLBACK:
                raise InputNotFoundError(f"copy failed: {exc.strerror}", path=src_path) from None
            scratch = scratch or bytearray(_COPY_CHUNK)
            mem = memoryview(scratch)
            while done < n:
                k = min(len(scratch), n - done)
                pread_into(src_fd, mem[:k], src_off + done, src_path)
                try:
                    pwrite_all(out_fd, mem[:k], dst_off + done)
                except OSError as exc2:
                    raise write_error(exc2, self.out) from None
                done += k
        self._kick(shard, dst_off, n)
        return scratch

    def _kick(self, shard: int, offset: int, n: int) -> None:
        """Start writeback of the range written since the last kick (Linux's POSIX_FADV_DONTNEED does; pages
        still dirty stay cached), so that the disk works while we compute."""
        span = self.kick[shard]
        span[0], span[1] = min(span[0], offset), max(span[1], offset + n)
        if span[1] - span[0] >= WRITEBACK_KICK and hasattr(os, "posix_fadvise"):
            if (
                self.flusher is None
            ):  # its own thread: submitting writeback blocks while the disk queue is full
                self.flusher = threading.Thread(
                    target=self._flush, name="loraformat-merge-flush", daemon=True
                )
                self.flusher.start()
            self.flush_q.put((self.fds[shard], span[0], span[1] - span[0]))
            span[0], span[1] = self.sizes[shard], 0

    def _flush(self) -> None:
        while (item := self.flush_q.get()) is not None:
            try:
                os.posix_fadvise(*item, os.POSIX_FADV_DONTNEED)
            except OSError:  # advice only; the final fsync catches real errors
                pass

    def fsync(self) -> None:
        for fd in self.fds.values():
            try:
                os.fsync(fd)
            except OSError as exc:
                raise write_error(exc, self.out) from None

    def close(self) -> None:
        if self.flusher is not None:
            self.flush_q.put(None)
            self.flusher.join()
            self.flusher = None
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = {}


def _reserve(fd: int, size: int) -> None:
    """Allocate the whole file up front: a full disk or a file size limit fails now, not after minutes."""
    if size == 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)
