"""The streaming pipeline and its one merge loop: the merge on the calling thread, a writer thread, a hasher
thread, a prefetcher, and on staged devices (CUDA, or the CPU stand-in that runs its orchestration) a reader.

- hasher: digests each base tensor an adapter recorded a digest for, from the same mapping the merge reads, and
  stops the run at the first mismatch; the output is committed only after every digest matched. It needs no
  torch, so it starts at once and runs ahead while torch imports.
- merge (:meth:`Pipeline._merge`, the only loop): per block of rows, the kernel decodes the stored bytes to
  fp32 (fp64 for fp64), adds the terms and encodes once (:class:`loraformat.ops.kernel.Kernel`). Where the
  blocks come from and where results go is the device's business (:mod:`loraformat.merging.devices`): on the
  host the kernel reads the read-only mapping in place; a staged device copies each block in from a staging
  buffer the reader filled and copies the result out, behind an event the writer waits for.
- writer: untouched tensors first, as raw byte ranges copied in the kernel, then each merged block at its
  planned offset.

:func:`write_shards` is the unit a worker of a split merge runs, on ``Plan.subset`` (merging/split.py).
Host memory: the output buffers, the blocks in flight and one block when a tensor must be merged whole (DoRA
per-column norms), whatever the model size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraformat.constants import StoredLayout
from loraformat.errors import AdapterError, InvalidInputError
from loraformat.io.tensors import SafetensorsSource
from loraformat.merging.blocks import Block, row_blocks, row_offset, sub_rows
from loraformat.merging.devices import Device, Event
from loraformat.merging.files import Buffer, Outputs, Pool, Sources, Stop, get, pread_into, put, read_array
from loraformat.merging.plan import Plan, TensorTask
from loraformat.merging.verify import HASH_CHUNK, verify_digests
from loraformat.ops.codec_quant import ErrorStats
from loraformat.ops.kernel import Codec, Factors
from loraformat.ops.term import rows_cols

MiB = 1 << 20
BLOCK_BYTES = 32 * MiB  # the unit of merge and write
OUT_BUFFERS = 3
STAGING_BUFFERS = 6
CPU_SUBBLOCK_ELEMS = 1 << 16  # rows merged at a time on the host: the fp32 work and product stay in L2
COPY_PIECE = 64 * MiB  # between two pieces the writer writes the merged blocks that are ready
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
    requant: ErrorStats = field(default_factory=ErrorStats)  # re-quantization error of quantized outputs


@dataclass
class WriteJob:
    shard: int
    offset: int
    buf: Buffer
    nbytes: int
    release: list[tuple[Pool, Buffer]] = field(default_factory=list)  # once the bytes are written
    event: Event | None = None  # after which the host buffer holds the result
    tensors_done: int = 0


def nonfinite_error(task: TensorTask) -> AdapterError:
    """A merge must never write inf/NaN where the base is finite (spec/v1.md §16): the output is abandoned."""
    return AdapterError(
        f"merging into {task.name} would write inf/NaN where the base is finite (the adapter's scale or weights "
        f"overflow {task.out_dtype}); nothing was written"
    )


def _source(task: TensorTask) -> tuple[str, int] | None:
    """(file, offset) of the bytes a computed tensor starts from; None for an in-memory replacement."""
    if task.replacement is not None:
        rb = task.replacement_bytes
        return None if rb is None else (rb.path, rb.start)
    return task.base.path, task.base.start


def _host_bytes(t: Any) -> Any:
    """A torch tensor's stored bytes as a numpy uint8 array (in-memory tensors: pickles, composed adapters)."""
    import torch

    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8).numpy()
    return t.reshape(-1).view(torch.uint8).numpy()


def write_shards(
    plan: Plan,
    out_dir: Path,
    out: Path,
    device: Device,
    *,
    progress: Progress | None = None,
) -> Stats:
    """Write every output shard of ``plan`` into ``out_dir``: copy, merge, verify. A worker of a split merge
    passes ``plan.subset(...)``, whose shards are byte for byte those of the whole merge."""
    return Pipeline(plan, out_dir, out, device, progress=progress).run()


class Pipeline:
    def __init__(
        self,
        plan: Plan,
        out_dir: Path,
        out: Path,
        device: Device,
        progress: Progress | None = None,
    ) -> None:
        self.plan, self.out_dir, self.out, self.device = plan, out_dir, out, device
        self.kernel = device.kernel
        self.progress = progress or (lambda nbytes, tensors: None)
        self.abort = threading.Event()
        self.error: BaseException | None = None
        self.stats = Stats()
        self.lock = threading.Lock()
        staged, pinned = device.staged, device.pinned
        self.block = BLOCK_BYTES * (2 if pinned else 1)
        self.out_pool = Pool(OUT_BUFFERS + (2 if staged else 0), self.block, self.abort, pinned=pinned)
        self.in_pool = Pool(STAGING_BUFFERS, self.block, self.abort, pinned=pinned) if staged else None
        self.to_merge: queue.Queue[Block | None] = queue.Queue(maxsize=64)
        self.to_write: queue.Queue[WriteJob | None] = queue.Queue(maxsize=64)
        self.threads: list[threading.Thread] = []
        self.sources: Sources | None = None
        self.outputs: Outputs | None = None
        self.tasks = plan.tasks
        self.copy_runs = plan.copy_runs
        self.compute = [t for t in self.tasks if t.action == "compute"]
        self.by_name = {t.name: t for t in plan.tasks}
        self.merged_bytes = 0  # source bytes the merge has consumed (the prefetcher stays ahead of it)

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def run(self) -> Stats:
        plan = self.plan
        try:
            paths = sorted(
                {s.path for s in plan.ck.shards}
                | {t.replacement_bytes.path for t in self.tasks if t.replacement_bytes is not None}
            )
            self.sources = Sources(paths, mapped=True)
            chosen = {i: (s.name, s.header, s.size) for i, s in enumerate(plan.shards)}
            self.outputs = Outputs(self.out_dir, self.out, chosen)
            self._count(bytes_written=sum(len(h) for _, h, _ in chosen.values()))
            self._start(self._writer, "loraformat-merge-writer")
            if any(t.digests for t in self.tasks):
                self._start(self._hasher, "loraformat-merge-hasher")
            self._start(self._prefetcher, "loraformat-merge-prefetch")
            if self.device.staged:
                self._start(self._reader, "loraformat-merge-reader")
            try:
                self._merge()
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
        for task in self.tasks:
            if not task.digests:
                continue
            verify_digests(task, self.sources, self._check_abort)
            base = task.base
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
        """Untouched tensors first, as raw byte ranges, but merged blocks that are ready are written between two
        copy pieces: otherwise the merge stalls on its few output buffers until every untouched byte is copied
        (most of an FP8 base whose adapter targets q and v)."""
        assert self.outputs is not None and self.sources is not None
        scratch: bytearray | None = None
        done = False
        for run in self.copy_runs:
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
                done = done or self._write_ready()
        self.progress(0, len(self.tasks) - len(self.compute))
        while not done:
            job = get(self.to_write, self.abort)
            if job is None:
                return
            self._write_job(job)

    def _write_ready(self) -> bool:
        """Write the merged blocks already queued, without waiting; True once the end was seen."""
        while True:
            try:
                job = self.to_write.get_nowait()
            except queue.Empty:
                return False
            if job is None:
                return True
            self._write_job(job)

    def _write_job(self, job: WriteJob) -> None:
        assert self.outputs is not None
        if job.event is not None:
            job.event.synchronize()
        self.outputs.write(job.shard, job.offset, job.buf.mem[: job.nbytes])
        for pool, buf in job.release:
            pool.put(buf)
        self._count(bytes_written=job.nbytes)
        self.progress(job.nbytes, job.tensors_done)

    # -- the merge loop -------------------------------------------------------------------------------------
    def _memory_rows(self, task: TensorTask, start: int, stop: int) -> Any:
        """Stored bytes of rows of a replacement that lives only in memory (an Adapter object, a pickle)."""
        assert task.replacement is not None
        i, key = task.replacement
        rows, cols = rows_cols(task.shape)
        return _host_bytes(self.plan.adapters[i].tensor(key).reshape(rows, cols)[start:stop])

    def _host_blocks(self) -> Iterator[Block]:
        """Blocks for the host device: read-only mapped ranges, merged in place."""
        assert self.sources is not None
        for task in self.compute:
            loc = _source(task)
            for r0, r1, nbytes in row_blocks(task, self.block):
                self._check_abort()
                if loc is None:
                    yield Block(task, r0, r1, self._memory_rows(task, r0, r1), nbytes)
                    continue
                offset = loc[1] + row_offset(task, r0)
                host = self.sources.view(loc[0], offset, nbytes)  # checked against the file's size
                yield Block(task, r0, r1, host, nbytes)
                host.release()
                self.sources.drop(loc[0], offset, nbytes)
                self._count(bytes_read=nbytes)
                self.merged_bytes += nbytes

    def _staged_blocks(self) -> Iterator[Block]:
        while True:
            blk = get(self.to_merge, self.abort)
            if blk is None:
                return
            yield blk

    def _reader(self) -> None:
        """Stage each block into a (pinned) buffer with pread, so host->device copies run at full speed."""
        assert self.sources is not None and self.in_pool is not None
        for task in self.compute:
            loc = _source(task)
            for r0, r1, nbytes in row_blocks(task, self.block):
                self._check_abort()
                if loc is None:
                    put(
                        self.to_merge,
                        Block(task, r0, r1, self._memory_rows(task, r0, r1), nbytes),
                        self.abort,
                    )
                    continue
                buf = self.in_pool.get(nbytes)
                pread_into(self.sources.fds[loc[0]], buf.mem[:nbytes], loc[1] + row_offset(task, r0), loc[0])
                self._count(bytes_read=nbytes)
                self.merged_bytes += nbytes
                put(self.to_merge, Block(task, r0, r1, buf, nbytes, staging=buf), self.abort)
        put(self.to_merge, None, self.abort)

    def _merge(self) -> None:
        """The one merge loop: every block of every computed tensor through the device and the kernel."""
        device, kernel = self.device, self.kernel
        device.begin()
        current: tuple[TensorTask, Codec[Any], Codec[Any], list[Factors[Any]]] | None = None
        flagged: Any = False  # inf/NaN introduced in the current task (a device flag on CUDA: read per task)
        try:
            with kernel.threads() as threads:
                self.stats.threads = threads
                blocks = self._staged_blocks() if device.staged else self._host_blocks()
                for blk in blocks:
                    task = blk.task
                    if current is None or current[0] is not task:
                        if current is not None and bool(flagged):
                            raise nonfinite_error(current[0])
                        current, flagged = (task, *self._prepare(task)), False
                    _, dec, enc, factors = current
                    rows, cols = rows_cols(task.logical_shape)
                    out_nbytes = (blk.stop - blk.start) * enc.row_nbytes(cols)
                    obuf = self.out_pool.get(out_nbytes)
                    with device.stream():
                        src = device.copy_in(blk.host, blk.nbytes)
                        out = device.output(obuf, out_nbytes)
                        sub = 0 if device.staged else sub_rows(task, cols, CPU_SUBBLOCK_ELEMS)
                        try:
                            flagged = flagged | kernel.merge_block(
                                src, dec, out, enc, factors, blk.start, blk.stop, cols, sub_rows=sub
                            )
                        except InvalidInputError as exc:  # e.g. a 4-bit codec refusing NaN
                            raise type(exc)(f"{task.name}: {exc}") from None
                        del src
                        event = device.copy_out(out, obuf, out_nbytes)
                    release = [(self.out_pool, obuf)]
                    if blk.staging is not None:
                        assert self.in_pool is not None
                        release.append((self.in_pool, blk.staging))  # free once the event says it was read
                    offset = task.offset + blk.start * enc.row_nbytes(cols)
                    job = WriteJob(
                        task.shard, offset, obuf, out_nbytes, release, event, int(blk.stop >= rows)
                    )
                    put(self.to_write, job, self.abort)
                    if task.quant is not None and blk.stop >= rows:
                        self._finish_quantized(task, enc)
                if current is not None and bool(flagged):
                    raise nonfinite_error(current[0])
        finally:
            self.stats.peak_gpu_bytes = device.end()

    def _finish_quantized(self, task: TensorTask, enc: Codec[Any]) -> None:
        """A re-quantized weight is done: write its fresh scales / quant state, add up its error."""
        from loraformat.merging.quantplan import side_tensors

        error = getattr(enc, "error", None)
        if error is not None:
            self.stats.requant.merge(error)
        for name, data in side_tensors(task, enc, self.by_name).items():
            side = self.by_name[name]
            obuf = self.out_pool.get(len(data))
            obuf.mem[: len(data)] = data
            job = WriteJob(side.shard, side.offset, obuf, len(data), [(self.out_pool, obuf)], None, 0)
            put(self.to_write, job, self.abort)

    def _prepare(self, task: TensorTask) -> tuple[Codec[Any], Codec[Any], list[Factors[Any]]]:
        """The task's codecs and its terms loaded, in the compute dtype, on the kernel's device."""
        kernel = self.kernel
        if task.quant is not None:
            from loraformat.merging.quantplan import make_codecs

            dec, enc = make_codecs(task, self.plan.ck, kernel)
        else:
            dec = kernel.codec(StoredLayout.DENSE, task.src_dtype)
            enc = kernel.codec(StoredLayout.DENSE, task.out_dtype)
        cd = kernel.compute_dtype(task.src_dtype, task.out_dtype)
        factors = []
        for planned in task.terms:
            adapter = self.plan.adapters[planned.adapter]

            def load(key: str, adapter: Any = adapter) -> Any:
                source = adapter.source
                if isinstance(source, SafetensorsSource):
                    info = source.infos[key]
                    raw = read_array(source.path, info.start, info.nbytes)
                    return kernel.load(raw, info.dtype, info.shape, cd)
                t = adapter.tensor(key)
                return kernel.load(_host_bytes(t), _st_dtype(t), tuple(t.shape), cd)

            factors.append(kernel.prepare(planned.term.map(load)))
        self.device.adopt(factors)
        return dec, enc, factors


def _st_dtype(t: Any) -> str:
    from loraformat.io.tensors import st_dtype

    return st_dtype(t.dtype)
