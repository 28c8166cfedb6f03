"""A merge split across N workers by output shard (``merge --shard I/N``), then ``merge --assemble N``.

Layout beside OUT (hidden, on the same file system, so the final rename is atomic)::

    .OUT.split/             the future OUT: finished shards, then the index and the base's other files
    .OUT.split/.wI-of-N-…   worker I's private directory while it writes; a dead worker leaves only this
    .OUT.split-done/        worker-IIIII-of-NNNNN.json: one done-file per finished worker

A worker writes its shards with the one merge pipeline into its private directory, fsyncs them, hashes them,
moves them into ``.OUT.split`` and only then writes its done-file (atomically). ``assemble`` checks every
done-file against the plan it computes itself, then writes the index and non-weight files and renames
``.OUT.split`` to OUT: the files are those a one-machine merge writes, byte for byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraformat.adapter import Adapter, adapter_weights
from loraformat.errors import IncompleteSplitError, UsageError
from loraformat.io.atomic import commit_dir, fsync_dir, write_error
from loraformat.io.checkpoint import INDEX_NAME
from loraformat.io.native import file_digest
from loraformat.io.pipeline import is_pipeline
from loraformat.merging.devices import open_device
from loraformat.merging.engine import Progress, write_shards
from loraformat.merging.plan import Plan, resolve_dtype
from loraformat.merging.shares import (
    DoneFileError,
    DoneRecord,
    ShardRecord,
    assign,
    check_workers,
    parse_done,
    parse_share,
)

__all__ = ["AssembleResult", "ShareResult", "assemble", "merge_share", "plan_fingerprint", "staging_dirs"]


@dataclass
class ShareResult:
    output: str
    worker: int
    workers: int
    plan: str  # the plan fingerprint every worker and the assembler must agree on
    skipped: bool  # a previous run of this worker had finished: its done-file and shards matched
    shards: list[dict[str, Any]]  # name, size, sha256
    device: str = ""
    backend: str = ""
    tensors: int = 0
    tensors_verified: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's user + system time for the share (all its threads)
    gb_per_s: float = 0.0
    recovered: int = 0  # dead earlier attempts of this share whose private directories were removed
    pid: int = field(default_factory=os.getpid)
    node: str = ""  # the Ray node that ran it, when one did

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AssembleResult:
    output: str
    workers: int
    plan: str
    shards: list[dict[str, Any]]  # name, size, sha256 (from the checked done-files)
    bytes_total: int  # the whole output
    bytes_written: int  # by the assembler itself: index and non-weight files
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def staging_dirs(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(the directory that becomes OUT, the directory of done-files), hidden beside OUT."""
    out = Path(out)
    return out.parent / f".{out.name}.split", out.parent / f".{out.name}.split-done"


def _done_path(done: Path, worker: int, workers: int) -> Path:
    return done / f"worker-{worker:05d}-of-{workers:05d}.json"


def _private_prefix(worker: int, workers: int) -> str:
    return f".w{worker}-of-{workers}-"


@contextlib.contextmanager
def _planned(
    base: str | os.PathLike[str],
    adapters: Sequence[Any],
    out: Path,
    *,
    weights: list[float] | None,
    dtype: str,
    max_shard_size: int | str | None,
    verify: bool,
    overwrite: bool,
    dequantize_as: str = "auto",
    requantize: str = "keep",
) -> Iterator[Plan]:
    """The one-machine merge's own input checks and plan (a diffusers pipeline is split per component by
    merging each component directory on its own)."""
    from loraformat.merging.api import planned

    if not adapters:
        raise UsageError("give at least one adapter to merge")
    if is_pipeline(base):
        raise UsageError(
            "a split merge takes one model directory, not a diffusers pipeline: split it per component "
            "(BASE/unet, BASE/text_encoder, ...)",
            path=base,
        )
    ws = adapter_weights(weights, len(adapters))
    out_dtype = resolve_dtype(dtype)
    args = (base, adapters, out, ws, out_dtype, max_shard_size, verify, overwrite, dequantize_as, requantize)
    with planned(*args) as (plan, _):
        yield plan


def _adapter_digest(adapter: Adapter) -> str:
    """sha256 of the adapter's weight file (adapters are small next to the base); a directory: of its files."""
    path = Path(getattr(adapter.source, "path", None) or adapter.path)
    if path.is_file():
        return file_digest(path)
    h = hashlib.sha256()
    for child in sorted(p for p in Path(adapter.path).iterdir() if p.is_file()):
        h.update(f"{child.name}\0{file_digest(child)}\0".encode())
    return h.hexdigest()


def plan_fingerprint(plan: Plan, workers: int) -> str:
    """sha256 of everything that decides the output's bytes and the split: output headers (tensor layout,
    dtypes, merge metadata), every merge term with its scale, the adapters' bytes, the base's files and the
    number of workers. Workers and the assembler compare it, so a share planned from other inputs or options
    is never assembled."""
    doc = {
        "workers": workers,
        "shards": [[s.name, s.size, hashlib.sha256(s.header).hexdigest()] for s in plan.shards],
        "index": plan.index,
        "aux": [[str(rel), (plan.ck.root / rel).stat().st_size] for rel in plan.aux_files],
        "config": plan.config_patch(),
        "base": [[Path(s.path).name, os.path.getsize(s.path)] for s in plan.ck.shards],
        "terms": [
            [t.name, [asdict(term) for term in t.terms], t.replacement]
            for t in plan.tasks
            if t.terms or t.replacement
        ],
        "adapters": [_adapter_digest(a) for a in plan.adapters],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _expected(plan: Plan, indices: list[int]) -> list[tuple[str, int]]:
    return [(plan.shards[k].name, plan.shards[k].size) for k in indices]


def _read_done(path: Path, **check: Any) -> DoneRecord:
    try:
        with open(path, "rb") as f:
            data = f.read(8 << 20)
    except OSError as exc:
        raise DoneFileError(f"cannot be read: {exc.strerror}") from None
    return parse_done(data, **check)


def _check_files(staging: Path, record: DoneRecord, headers: dict[str, bytes]) -> None:
    """Each shard a done-file lists is a plain file of the recorded size that starts with the planned header."""
    for shard in record.shards:
        path = staging / shard.name
        try:
            st = path.lstat()
        except OSError:
            raise DoneFileError(f"{shard.name} is missing from {staging.name}") from None
        if not path.is_file() or path.is_symlink() or st.st_size != shard.size:
            raise DoneFileError(f"{shard.name} is not a file of the recorded {shard.size} bytes")
        header = headers[shard.name]
        with open(path, "rb") as f:
            if f.read(len(header)) != header:
                raise DoneFileError(f"{shard.name} does not start with the planned header")


def merge_share(
    base: str | os.PathLike[str],
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    out: str | os.PathLike[str],
    share: tuple[int, int] | str,
    *,
    weights: list[float] | None = None,
    device: str = "auto",
    dtype: str = "keep",
    max_shard_size: int | str | None = None,
    verify: bool = True,
    overwrite: bool = False,
    progress: Progress | None = None,
    backend: str = "auto",
    dequantize_as: str = "auto",
    requantize: str = "keep",
) -> ShareResult:
    """Write worker I's share of OUT's shards (``share`` is (I, N) or ``"I/N"``, I from 0) and its done-file.

    Every worker plans the whole merge from headers and takes the shards :func:`~loraformat.merging.shares.assign`
    gives it; it verifies the digests of its own target tensors only. Rerunning a finished worker does nothing;
    rerunning a dead one writes its share again."""
    from loraformat.merging.api import _check_space
    from loraformat.rules import resolve_device

    t0, cpu0 = time.perf_counter(), time.process_time()
    worker, workers = (
        parse_share(share) if isinstance(share, str) else (share[0], check_workers(share[1], "share"))
    )
    if not 0 <= worker < workers:
        raise UsageError(f"share {worker}/{workers}: I must be in 0..{workers - 1}")
    out = Path(out)
    opts: dict[str, Any] = dict(
        weights=weights,
        dtype=dtype,
        max_shard_size=max_shard_size,
        verify=verify,
        overwrite=overwrite,
        dequantize_as=dequantize_as,
        requantize=requantize,
    )
    with _planned(base, adapters, out, **opts) as plan:
        fingerprint = plan_fingerprint(plan, workers)
        mine = assign([s.size for s in plan.shards], workers)[worker]
        expected = _expected(plan, mine)
        staging, done = staging_dirs(out)
        result = ShareResult(str(out), worker, workers, fingerprint, False, [])
        try:
            staging.mkdir(exist_ok=True)
            done.mkdir(exist_ok=True)
        except OSError as exc:
            raise write_error(exc, out) from None
        marker = _done_path(done, worker, workers)
        with contextlib.suppress(DoneFileError):
            record = _read_done(marker, plan=fingerprint, worker=worker, workers=workers, expected=expected)
            _check_files(staging, record, {s.name: s.header for s in plan.shards})
            result.skipped, result.shards = True, [s.to_json() for s in record.shards]
            return result
        marker.unlink(missing_ok=True)
        for stale in staging.glob(_private_prefix(worker, workers) + "*"):
            shutil.rmtree(stale, ignore_errors=True)
            result.recovered += 1
        sub = plan.subset(mine)
        dev = resolve_device(device)
        result.device, result.backend = dev, open_device(dev, backend, sub).kernel.name
        _check_space(sub, out)
        records = _write_share(sub, staging, out, dev, result.backend, progress, result)
        _write_atomically(marker, DoneRecord(fingerprint, worker, workers, tuple(records)).to_bytes(), out)
    result.shards = [r.to_json() for r in records]
    result.seconds = round(time.perf_counter() - t0, 4)
    result.cpu_seconds = round(time.process_time() - cpu0, 4)
    result.gb_per_s = round(result.bytes_written / result.seconds / 1e9, 4) if result.seconds > 0 else 0.0
    return result


def _write_share(
    sub: Plan,
    staging: Path,
    out: Path,
    dev: str,
    backend: str,
    progress: Progress | None,
    result: ShareResult,
) -> list[ShardRecord]:
    """Run the merge pipeline over this share into a private directory, hash the finished shards, and move
    them into the staging directory (each rename atomic; the done-file, written after, vouches for them)."""
    private = (
        staging / f"{_private_prefix(result.worker, result.workers)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )
    try:
        private.mkdir()
        if sub.shards:
            stats = write_shards(sub, private, out, open_device(dev, backend, sub), progress=progress)
            result.bytes_written, result.tensors_verified = stats.bytes_written, stats.tensors_verified
        result.tensors = len(sub.tasks)
        records = [ShardRecord(s.name, s.size, file_digest(private / s.name)) for s in sub.shards]
        for s in sub.shards:
            os.replace(private / s.name, staging / s.name)
        fsync_dir(staging)
        return records
    except OSError as exc:
        raise write_error(exc, out) from None
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _write_atomically(path: Path, data: bytes, out: Path) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(exc, out) from None


def assemble(
    base: str | os.PathLike[str],
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    out: str | os.PathLike[str],
    workers: int,
    *,
    weights: list[float] | None = None,
    dtype: str = "keep",
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    dequantize_as: str = "auto",
    requantize: str = "keep",
) -> AssembleResult:
    """Check that all ``workers`` done-files are present and match the plan, write the index and the base's
    non-weight files, and rename the staging directory to OUT atomically. Refuses (IncompleteSplitError,
    nothing changed) while any share is missing or inconsistent."""
    from loraformat.merging.api import _write_extras

    t0 = time.perf_counter()
    check_workers(workers)
    out = Path(out)
    opts: dict[str, Any] = dict(
        weights=weights,
        dtype=dtype,
        max_shard_size=max_shard_size,
        verify=False,
        overwrite=overwrite,
        dequantize_as=dequantize_as,
        requantize=requantize,
    )
    with _planned(base, adapters, out, **opts) as plan:
        fingerprint = plan_fingerprint(plan, workers)
        staging, done = staging_dirs(out)
        records = _check_shares(plan, fingerprint, workers, staging, done)
        _clear_strays(plan, staging)
        try:
            written = _write_extras(plan, staging)
            trash = commit_dir(staging, out, overwrite=overwrite)
        except OSError as exc:
            raise write_error(exc, out) from None
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        shutil.rmtree(done, ignore_errors=True)
    return AssembleResult(
        output=str(out),
        workers=workers,
        plan=fingerprint,
        shards=[s.to_json() for r in records for s in r.shards],
        bytes_total=plan.total_bytes + written,
        bytes_written=written,
        seconds=round(time.perf_counter() - t0, 4),
    )


def _check_shares(plan: Plan, fingerprint: str, workers: int, staging: Path, done: Path) -> list[DoneRecord]:
    """Every done-file, checked; one IncompleteSplitError naming every missing and every bad share."""
    shares = assign([s.size for s in plan.shards], workers)
    headers = {s.name: s.header for s in plan.shards}
    records: list[DoneRecord] = []
    missing: list[int] = []
    bad: list[tuple[int, str]] = []
    for worker, mine in enumerate(shares):
        path = _done_path(done, worker, workers)
        if not path.is_file():
            missing.append(worker)
            continue
        try:
            record = _read_done(
                path, plan=fingerprint, worker=worker, workers=workers, expected=_expected(plan, mine)
            )
            _check_files(staging, record, headers)
            records.append(record)
        except DoneFileError as exc:
            bad.append((worker, f"worker {worker}/{workers}: {path.name} {exc}"))
    if missing or bad:
        parts = []
        if missing:
            shown = ", ".join(str(w) for w in missing[:10]) + (" …" if len(missing) > 10 else "")
            parts.append(f"{len(missing)} of {workers} workers have not finished ({shown})")
        parts.extend(message for _, message in bad[:3])
        rerun = (missing or [bad[0][0]])[0]
        raise IncompleteSplitError(
            f"cannot assemble: {'; '.join(parts)}; rerun those workers (e.g. --shard {rerun}/{workers}), "
            "then --assemble again",
            path=staging,
        )
    return records


def _clear_strays(plan: Plan, staging: Path) -> None:
    """Remove dead workers' private directories; refuse anything else that the output would not contain."""
    allowed = {s.name for s in plan.shards} | {INDEX_NAME} | {Path(rel).parts[0] for rel in plan.aux_files}
    for entry in staging.iterdir():
        if entry.name.startswith(".w") and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name not in allowed:
            raise UsageError(
                f"{entry.name} is in the staging directory but not in the merge's output; remove it",
                path=staging,
            )
