"""The streaming pipeline: the merge on the calling thread (CPU or CUDA), a writer thread, a hasher thread, and
on CUDA a reader thread.

- hasher: digests each base tensor an adapter recorded a digest for, from the same mapping the merge reads, and
  stops the run at the first mismatch; the output is committed only after every digest matched. It needs no
  torch, so it starts at once and runs ahead while torch imports.
- merge: per block of rows: decode to fp32 (fp64 for fp64), add the LoRA terms, round once into a reused
  output buffer. CPU: straight from the mapped input, in L2-sized sub-blocks, with numpy
  (:mod:`loraformat.ops.delta_np`: no ``import torch``, which costs seconds) unless a term is DoRA or a dtype is
  not BF16/F16/F32/F64, then with torch (``merge_rows_`` from :mod:`loraformat.ops.delta`). CUDA: torch, pinned
  staging buffers filled by the reader, two streams so host<->device copies overlap compute.
- writer: untouched tensors first, as raw byte ranges copied in the kernel, then each merged block at its
  planned offset.

Host memory: the output buffers, the blocks in flight and one block when a tensor must be merged whole (DoRA
per-column norms), whatever the model size.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraformat.constants import LayerKind
from loraformat.errors import AdapterError, HashMismatchError
from loraformat.hashing import start_tensor_digest
from loraformat.io.header import DTYPE_BITS
from loraformat.merging.files import Buffer, Outputs, Pool, Sources, Stop, get, pread_into, put
from loraformat.merging.plan import Plan, TensorTask

MiB = 1 << 20
BLOCK_BYTES = 32 * MiB  # the unit of merge and write
OUT_BUFFERS = 3
CUDA_IN_BUFFERS = 6
CPU_SUBBLOCK_ELEMS = 1 << 19  # rows merged at a time on CPU: the fp32 work stays in L2
HASH_CHUNK = 64 * MiB
COPY_PIECE = 256 * MiB
PREFETCH_AHEAD = 1 << 30  # the prefetcher asks the kernel to read at most this far ahead of the merge

Progress = Callable[[int, int], None]  # (bytes written, tensors done) increments


@dataclass
class Stats:
    bytes_read: int = 0
    bytes_written: int = 0
    bytes_hashed: int = 0
    tensors_verified: int = 0
    peak_gpu_bytes: int = 0
    threads: int = 0


@dataclass
class Block:
    """Rows [start, stop) of a tensor viewed (rows, cols), staged by the CUDA reader."""

    task: TensorTask
    start: int
    stop: int
    buf: Buffer | None  # None: the rows come from an in-memory replacement tensor
    nbytes: int


@dataclass
class WriteJob:
    shard: int
    offset: int
    buf: Buffer
    nbytes: int
    release: list[tuple[Pool, Buffer]] = field(default_factory=list)  # once the bytes are written
    event: Any = None  # CUDA event after which the host buffer holds the result
    tensors_done: int = 0


def nonfinite_error(task: TensorTask) -> AdapterError:
    """A merge must never write inf/NaN where the base is finite (spec/v1.md §16): the output is abandoned."""
    return AdapterError(
        f"merging into {task.name} would write inf/NaN where the base is finite (the adapter's scale or weights "
        f"overflow {task.out_dtype}); nothing was written"
    )


def rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    if not shape:
        return 1, 1
    cols = 1
    for d in shape[1:]:
        cols *= d
    return shape[0], cols


def _itemsize(dtype: str) -> int:
    return DTYPE_BITS[dtype] // 8


def _source(task: TensorTask) -> tuple[str, int] | None:
    """(file, offset) of the bytes a computed tensor starts from; None for an in-memory replacement."""
    if task.replacement is not None:
        rb = task.replacement_bytes
        return None if rb is None else (rb.path, rb.start)
    return task.base.path, task.base.start


class Pipeline:
    def __init__(
        self,
        plan: Plan,
        out_dir: Path,
        out: Path,
        device: str,
        progress: Progress | None = None,
        backend: str = "torch",
    ) -> None:
        self.plan, self.out_dir, self.out, self.device = plan, out_dir, out, device
        self.backend = backend  # "numpy" (CPU only) or "torch", from choose_backend
        self.progress = progress or (lambda nbytes, tensors: None)
        self.cuda = device.startswith("cuda")
        self.abort = threading.Event()
        self.error: BaseException | None = None
        self.stats = Stats()
        self.lock = threading.Lock()
        self.block = BLOCK_BYTES * (2 if self.cuda else 1)
        self.out_pool = Pool(OUT_BUFFERS + (2 if self.cuda else 0), self.block, self.abort, pinned=self.cuda)
        self.in_pool = Pool(CUDA_IN_BUFFERS, self.block, self.abort, pinned=True) if self.cuda else None
        self.to_merge: queue.Queue[Block | None] = queue.Queue(maxsize=64)
        self.to_write: queue.Queue[WriteJob | None] = queue.Queue(maxsize=64)
        self.threads: list[threading.Thread] = []
        self.sources: Sources | None = None
        self.outputs: Outputs | None = None
        self.compute = [t for t in plan.tasks if t.action == "compute"]
        self.merged_bytes = 0  # source bytes the merge has consumed (the prefetcher stays ahead of it)

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def run(self) -> Stats:
        plan = self.plan
        try:
            paths = sorted(
                {s.path for s in plan.ck.shards}
                | {t.replacement_bytes.path for t in plan.tasks if t.replacement_bytes is not None}
            )
            self.sources = Sources(paths, mapped=True)
            self.outputs = Outputs(self.out_dir, self.out, [(s.name, s.header, s.size) for s in plan.shards])
            self._count(bytes_written=sum(len(s.header) for s in plan.shards))
            self._start(self._writer, "loraformat-merge-writer")
            if any(t.digests for t in plan.tasks):
                self._start(self._hasher, "loraformat-merge-hasher")
            self._start(self._prefetcher, "loraformat-merge-prefetch")
            if self.cuda:
                self._start(self._reader, "loraformat-merge-reader")
            try:
                self._merge_cuda() if self.cuda else self._merge_cpu()
                put(self.to_write, None, self.abort)
            except Stop:
                pass
            for t in self.threads:
                while t.is_alive() and self.error is None:
                    t.join(0.05)
            if self.error is not None:
                raise self.error
            self.outputs.fsync()
        finally:
            self.abort.set()
            for t in self.threads:
                t.join(30)
            # a thread stuck in a system call past the timeout keeps its descriptors: closing them could let a
            # later open() reuse the number under its feet
            if not any(t.is_alive() for t in self.threads):
                if self.outputs is not None:
                    self.outputs.close()
                if self.sources is not None:
                    self.sources.close()
        return self.stats

    def _start(self, target: Callable[[], None], name: str) -> None:
        def guarded() -> None:
            try:
                target()
            except Stop:
                pass
            except BaseException as exc:  # handed to the calling thread, which raises it
                self._fail(exc)

        t = threading.Thread(target=guarded, name=name, daemon=True)
        self.threads.append(t)
        t.start()

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.abort.set()

    def _count(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    def _check_abort(self) -> None:
        if self.abort.is_set():
            raise Stop

    # -- hasher ---------------------------------------------------------------------------------------------
    def _hasher(self) -> None:
        assert self.sources is not None
        for task in self.plan.tasks:
            if not task.digests:
                continue
            base = task.base
            digest = start_tensor_digest(task.name, base.dtype, task.shape)
            for pos in range(0, base.nbytes, HASH_CHUNK):
                self._check_abort()
                n = min(HASH_CHUNK, base.nbytes - pos)
                view = self.sources.view(base.path, base.start + pos, n)
                try:
                    digest.update(view)
                finally:
                    view.release()
                self.sources.drop(
                    base.path, base.start + pos, n
                )  # the merge faults them in again when it reads
            actual = digest.hexdigest()
            for expected, label in task.digests:
                if expected != actual:
                    raise HashMismatchError(
                        f"base tensor {task.name!r} differs from the digest recorded by adapter {label}: the base "
                        "changed after the adapter was stamped, or it is another base (--no-verify skips this "
                        "check)",
                        path=base.path,
                    )
            read_elsewhere = task.action == "compute" and task.replacement is None or task.action == "copy"
            self._count(
                tensors_verified=1, bytes_hashed=base.nbytes, bytes_read=0 if read_elsewhere else base.nbytes
            )

    # -- prefetcher -----------------------------------------------------------------------------------------
    def _prefetcher(self) -> None:
        """Ask the kernel to read the merge's inputs ahead of it (MADV_WILLNEED), from the start: on a cold page
        cache the disk reads while torch imports. A no-op when the pages are cached already."""
        assert self.sources is not None
        ahead = 0
        for task in self.compute:
            loc = _source(task)
            if loc is None:
                continue
            nbytes = task.replacement_bytes.nbytes if task.replacement_bytes is not None else task.base.nbytes
            for pos in range(0, nbytes, HASH_CHUNK):
                while ahead - self.merged_bytes > PREFETCH_AHEAD:
                    self._check_abort()
                    self.abort.wait(0.02)
                self._check_abort()
                n = min(HASH_CHUNK, nbytes - pos)
                self.sources.prefetch(loc[0], loc[1] + pos, n)
                ahead += n

    # -- writer ---------------------------------------------------------------------------------------------
    def _writer(self) -> None:
        assert self.outputs is not None and self.sources is not None
        scratch: bytearray | None = None
        for run in self.plan.copy_runs:
            for pos in range(0, run.nbytes, COPY_PIECE):  # in pieces, so that an interrupt is seen quickly
                self._check_abort()
                n = min(COPY_PIECE, run.nbytes - pos)
                scratch = self.outputs.copy(
                    self.sources.fds[run.src],
                    run.src,
                    run.shard,
                    run.src_offset + pos,
                    run.dst_offset + pos,
                    n,
                    scratch,
                )
                self._count(bytes_read=n, bytes_written=n)
                self.progress(n, 0)
        self.progress(0, len(self.plan.tasks) - len(self.compute))
        while True:
            job = get(self.to_write, self.abort)
            if job is None:
                return
            if job.event is not None:
                job.event.synchronize()
            self.outputs.write(job.shard, job.offset, job.buf.mem[: job.nbytes])
            for pool, buf in job.release:
                pool.put(buf)
            self._count(bytes_written=job.nbytes)
            self.progress(job.nbytes, job.tensors_done)

    # -- merge ----------------------------------------------------------------------------------------------
    def _block_rows(self, task: TensorTask, rows: int, cols: int) -> int:
        if task.whole:
            return max(rows, 1)
        per_row = max(1, cols * max(_itemsize(task.src_dtype), _itemsize(task.out_dtype)))
        return max(1, self.block // per_row)

    def _terms(self, task: TensorTask, cd: Any, device: Any) -> list[Any]:
        from loraformat.ops import delta

        terms = []
        for ts in task.terms:
            adapter = self.plan.adapters[ts.adapter]
            if ts.kind == LayerKind.BIAS:
                terms.append(delta.bias_term(adapter.tensor(ts.b_key), ts.scale, dtype=cd, device=device))
                continue
            assert ts.a_key is not None
            mag = adapter.tensor(ts.magnitude_key) if ts.magnitude_key else None
            terms.append(
                delta.lora_term(
                    adapter.tensor(ts.a_key),
                    adapter.tensor(ts.b_key),
                    ts.scale,
                    ts.kind,
                    fan_in_fan_out=ts.fan_in_fan_out,
                    magnitude=mag,
                    dtype=cd,
                    device=device,
                )
            )
        return terms

    def _memory_rows(self, task: TensorTask, start: int, stop: int) -> Any:
        """Rows of a replacement that lives only in memory (an Adapter given as an object, from a pickle)."""
        assert task.replacement is not None
        i, key = task.replacement
        rows, cols = rows_cols(task.shape)
        return self.plan.adapters[i].tensor(key).reshape(rows, cols)[start:stop]

    def _write_job(
        self,
        task: TensorTask,
        start: int,
        stop: int,
        obuf: Buffer,
        nbytes: int,
        release: list[tuple[Pool, Buffer]],
        event: Any = None,
    ) -> None:
        rows, cols = rows_cols(task.shape)
        offset = task.offset + start * cols * _itemsize(task.out_dtype)
        job = WriteJob(task.shard, offset, obuf, nbytes, release, event, tensors_done=int(stop >= rows))
        put(self.to_write, job, self.abort)

    def _merge_cpu(self) -> None:
        if self.backend == "numpy":
            from loraformat.merging.numpy_cpu import merge_cpu_numpy

            merge_cpu_numpy(self)
            return
        import torch

        # The hasher and the writer each keep a core busy: leave them theirs, or OpenMP's spinning threads and
        # the I/O threads slow each other down several times over.
        previous = torch.get_num_threads()
        torch.set_num_threads(max(1, min(previous, (os.cpu_count() or 1) - 2)))
        try:
            self.stats.threads = torch.get_num_threads()
            for task in self.compute:
                self._merge_task_cpu(task)
        finally:
            torch.set_num_threads(previous)

    def _merge_task_cpu(self, task: TensorTask) -> None:
        import torch

        from loraformat.io.tensors import torch_dtype
        from loraformat.ops import delta

        assert self.sources is not None
        rows, cols = rows_cols(task.shape)
        if rows == 0 or cols == 0:
            self.progress(0, 1)
            return
        src_t, out_t = torch_dtype(task.src_dtype), torch_dtype(task.out_dtype)
        cd = delta.compute_dtype(src_t, out_t)
        terms = self._terms(task, cd, None) if task.terms else []
        step = self._block_rows(task, rows, cols)
        sub = rows if task.whole else max(1, CPU_SUBBLOCK_ELEMS // max(cols, 1))
        work = None
        if terms and out_t != cd:
            work = torch.empty(min(sub, step, max(rows, 1)) * cols, dtype=cd)
        src_loc = _source(task)
        row_bytes = cols * _itemsize(task.src_dtype)
        for r0 in range(0, rows, step):
            self._check_abort()
            r1 = min(rows, r0 + step)
            n, nbytes = r1 - r0, (r1 - r0) * row_bytes
            if src_loc is None:
                src = self._memory_rows(task, r0, r1)
            else:
                path, start = src_loc
                src = self.sources.tensor(path, start + r0 * row_bytes, nbytes).view(src_t).view(n, cols)
            out_nbytes = n * cols * _itemsize(task.out_dtype)
            obuf = self.out_pool.get(out_nbytes)
            out = obuf.tensor()[:out_nbytes].view(out_t).view(n, cols)
            if not terms:
                out.copy_(src)
            else:
                for s0 in range(0, n, sub):
                    s1 = min(n, s0 + sub)
                    w = out[s0:s1] if work is None else work[: (s1 - s0) * cols].view(s1 - s0, cols)
                    w.copy_(src[s0:s1])
                    delta.merge_rows_(w, terms, r0 + s0, r0 + s1)
                    if work is not None:
                        out[s0:s1].copy_(w)
                    if delta.introduces_nonfinite(out[s0:s1], src[s0:s1]):
                        raise nonfinite_error(task)
            del src
            if src_loc is not None:
                self.sources.drop(src_loc[0], src_loc[1] + r0 * row_bytes, nbytes)
                self._count(bytes_read=nbytes)
                self.merged_bytes += nbytes
            self._write_job(task, r0, r1, obuf, out_nbytes, [(self.out_pool, obuf)])

    # -- CUDA -----------------------------------------------------------------------------------------------
    def _reader(self) -> None:
        """Stage each block into a pinned buffer (pread), so host->device copies run at full speed."""
        assert self.sources is not None and self.in_pool is not None
        for task in self.compute:
            rows, cols = rows_cols(task.shape)
            step = self._block_rows(task, rows, cols)
            row_bytes = cols * _itemsize(task.src_dtype)
            src_loc = _source(task)
            for r0 in range(0, rows, step):
                self._check_abort()
                r1 = min(rows, r0 + step)
                nbytes = (r1 - r0) * row_bytes
                if src_loc is None:
                    put(self.to_merge, Block(task, r0, r1, None, nbytes), self.abort)
                    continue
                path, start = src_loc
                buf = self.in_pool.get(nbytes)
                pread_into(self.sources.fds[path], buf.mem[:nbytes], start + r0 * row_bytes, path)
                self._count(bytes_read=nbytes)
                self.merged_bytes += nbytes
                put(self.to_merge, Block(task, r0, r1, buf, nbytes), self.abort)
        put(self.to_merge, None, self.abort)

    def _merge_cuda(self) -> None:
        import torch

        from loraformat.io.tensors import torch_dtype
        from loraformat.ops import delta

        assert self.in_pool is not None
        dev = torch.device(self.device)
        torch.cuda.set_device(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        streams = [torch.cuda.Stream(dev), torch.cuda.Stream(dev)]
        current: tuple[int, list[Any]] | None = None
        flags: list[tuple[TensorTask, Any]] = []  # device-side checks, read once per task (no per-block sync)
        k = 0
        try:
            while True:
                blk = get(self.to_merge, self.abort)
                if blk is None or (flags and flags[0][0] is not blk.task):
                    for task, flag in flags:
                        if bool(flag):
                            raise nonfinite_error(task)
                    flags.clear()
                if blk is None:
                    return
                task = blk.task
                n, cols = blk.stop - blk.start, rows_cols(task.shape)[1]
                src_t, out_t = torch_dtype(task.src_dtype), torch_dtype(task.out_dtype)
                cd = delta.compute_dtype(src_t, out_t)
                if task.terms and (current is None or current[0] != id(task)):
                    terms = self._terms(task, cd, dev)
                    torch.cuda.current_stream(dev).synchronize()  # uploaded before the side streams use them
                    for t in terms:
                        for s in streams:
                            for x in (t.L, t.R, t.magnitude):
                                if x is not None:
                                    x.record_stream(s)
                    current = (id(task), terms)
                stream = streams[k % 2]
                k += 1
                out_nbytes = n * cols * _itemsize(task.out_dtype)
                obuf = self.out_pool.get(out_nbytes)
                with torch.cuda.stream(stream):
                    if blk.buf is None:
                        src = self._memory_rows(task, blk.start, blk.stop).to(dev, non_blocking=True)
                    else:
                        raw = torch.empty(blk.nbytes, dtype=torch.uint8, device=dev)
                        raw.copy_(blk.buf.tensor()[: blk.nbytes], non_blocking=True)
                        src = raw.view(src_t).view(n, cols)
                    if task.terms:
                        assert current is not None
                        result = delta.merge_rows_(src.to(cd), current[1], blk.start, blk.stop).to(out_t)
                        flags.append((task, delta.introduces_nonfinite(result, src)))
                    else:
                        result = src.to(out_t)
                    obuf.tensor()[:out_nbytes].view(out_t).view(n, cols).copy_(result, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(stream)
                release = [(self.out_pool, obuf)]
                if blk.buf is not None:
                    release.append((self.in_pool, blk.buf))  # free once the event says the copy is done
                self._write_job(task, blk.start, blk.stop, obuf, out_nbytes, release, event)
        finally:
            for s in streams:
                s.synchronize()
            self.stats.peak_gpu_bytes = int(torch.cuda.max_memory_allocated(dev))
