"""Past one machine: split merges and fleet-wide validation as Ray tasks (extra ``loraformat[ray]``), or for
validation as local processes (``--jobs N``).

A merge runs one Ray task per worker share (:func:`loraformat.merging.split.merge_share`) on nodes that see BASE,
the adapters and OUT's parent at the same paths (a shared file system), then assembles on the driver. A task
whose worker process dies is retried by Ray (``max_retries``); an error of the inputs (a digest mismatch, a bad
adapter) is not retried: it would fail again. When a task fails for good the other tasks are cancelled and the
staging directories removed, so nothing is left under or beside OUT.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import shutil
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraformat.adapter import Adapter
from loraformat.errors import DistributedError, LoraformatError, UsageError
from loraformat.merging.split import ShareResult, assemble, merge_share, staging_dirs
from loraformat.validation import ValidationReport, expand_paths, resolve_level, validate_many

__all__ = ["DistributedMergeResult", "merge", "validate"]

#: chunks per worker slot when validating: small enough to balance uneven adapters, large enough that task
#: overhead (milliseconds) stays small next to the work
CHUNKS_PER_SLOT = 4
PROBE_SECONDS = 10


@dataclass
class DistributedMergeResult:
    output: str
    workers: int
    nodes: list[str]  # Ray node ids that ran a share
    shards: list[dict[str, Any]]  # name, size, sha256
    shares: list[dict[str, Any]]  # each worker's ShareResult
    recovered: int  # shares whose earlier attempt died mid-write and was cleaned up by the retry
    bytes_total: int
    seconds: float
    assemble_seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _ray(address: str | None) -> tuple[Any, bool]:
    """The ray module, connected; True when this call started the connection (and should end it)."""
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'loraformat[ray]'") from None
    if ray.is_initialized():
        return ray, False
    _probe(address)
    try:
        ray.init(address=address or "auto", log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistributedError(f"cannot reach the Ray cluster at {address or 'auto'}: {first}") from None
    return ray, True


def _probe(address: str | None) -> None:
    """Fail in seconds on a HOST:PORT nobody listens on (ray.init itself retries for minutes)."""
    if not address or "://" in address or address in ("auto", "local"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UsageError(f"--ray {address!r}: expected HOST:PORT of the cluster's head, 'auto' or 'local'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        raise DistributedError(
            f"cannot reach the Ray cluster at {address}: {exc.strerror or exc} (is `ray start --head` running?)"
        ) from None


def _slots(ray: Any, num_cpus: float, num_gpus: float) -> int:
    """How many tasks of this size the cluster runs at once."""
    total = ray.cluster_resources()
    fits = [total.get("CPU", 0) / num_cpus] if num_cpus > 0 else []
    if num_gpus > 0:
        fits.append(total.get("GPU", 0) / num_gpus)
    return max(1, math.floor(min(fits))) if fits else 1


def _unwrap(ray: Any, exc: BaseException, what: str, attempts: int) -> LoraformatError:
    """A Ray failure as one typed error: the task's own LoraformatError when it raised one."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, LoraformatError):
        return cause
    if isinstance(exc, ray.exceptions.TaskCancelledError):
        return DistributedError(f"{what} was cancelled")
    if isinstance(exc, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)):
        return DistributedError(f"{what}: its worker process died {attempts} time(s); gave up")
    text = str(cause if cause is not None else exc).strip().splitlines()
    return DistributedError(f"{what} failed: {text[-1] if text else type(exc).__name__}")


def _share_task(
    base: str, adapters: list[str], out: str, share: tuple[int, int], kw: dict[str, Any]
) -> ShareResult:
    import ray

    result = merge_share(base, adapters, out, share, **kw)
    result.node = ray.get_runtime_context().get_node_id()
    return result


def merge(
    base: str | os.PathLike[str],
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    out: str | os.PathLike[str],
    *,
    address: str | None = None,
    workers: int | None = None,
    num_cpus: float = 1.0,
    num_gpus: float | None = None,
    max_retries: int = 3,
    runtime_env: dict[str, Any] | None = None,
    weights: list[float] | None = None,
    device: str = "auto",
    dtype: str = "keep",
    max_shard_size: int | str | None = None,
    verify: bool = True,
    overwrite: bool = False,
    dequantize_as: str = "auto",
    requantize: str = "keep",
) -> DistributedMergeResult:
    """Merge on a Ray cluster: one task per worker share, then assemble here. The output is byte for byte that
    of :func:`loraformat.merge`. ``workers`` defaults to the tasks the cluster runs at once (at most one per
    output shard); ``num_gpus`` to 1 when the cluster has GPUs; ``runtime_env`` is Ray's, for every task."""
    from loraformat.merging.split import _planned

    t0 = time.perf_counter()
    if max_retries < 0 or num_cpus < 0 or (num_gpus is not None and num_gpus < 0):
        raise UsageError("--retries, --ray-cpus and --ray-gpus may not be negative")
    paths = [a.path if isinstance(a, Adapter) else os.fspath(a) for a in adapters]
    out = Path(out).absolute()
    base = os.path.abspath(base)
    paths = [p if "://" in p else os.path.abspath(p) for p in paths]
    kw: dict[str, Any] = dict(
        weights=weights,
        dtype=dtype,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        dequantize_as=dequantize_as,
        requantize=requantize,
    )
    with _planned(base, paths, out, verify=verify, **kw) as plan:  # every refusal before any task starts
        shard_count = len(plan.shards)
    ray, owned = _ray(address)
    try:
        gpus = num_gpus if num_gpus is not None else (1.0 if ray.cluster_resources().get("GPU", 0) else 0.0)
        n = workers if workers is not None else min(shard_count, _slots(ray, num_cpus, gpus))
        if n < 1:
            raise UsageError("--workers must be at least 1")
        task = ray.remote(
            num_cpus=num_cpus,
            num_gpus=gpus,
            max_retries=max_retries,
            retry_exceptions=False,
            scheduling_strategy="SPREAD",  # shares are I/O-bound: use every node's disk and network
            runtime_env=runtime_env,
        )(_share_task)
        share_kw: dict[str, Any] = dict(kw, device=device, verify=verify)
        refs = [
            task.options(name=f"loraformat-merge-{i}-of-{n}").remote(base, paths, str(out), (i, n), share_kw)
            for i in range(n)
        ]
        results = _gather(ray, refs, out, max_retries + 1)
        t1 = time.perf_counter()
        done = assemble(base, paths, out, n, **kw)
    finally:
        if owned:
            ray.shutdown()
    seconds = time.perf_counter() - t0
    return DistributedMergeResult(
        output=str(out),
        workers=n,
        nodes=sorted({r.node for r in results}),
        shards=done.shards,
        shares=[r.to_json() for r in results],
        recovered=sum(r.recovered for r in results),
        bytes_total=done.bytes_total,
        seconds=round(seconds, 4),
        assemble_seconds=round(time.perf_counter() - t1, 4),
    )


def _gather(ray: Any, refs: list[Any], out: Path, attempts: int) -> list[ShareResult]:
    """Every share's result, in order; on the first failure cancel the rest, clean up, raise one error."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(ready[0])
        except Exception as exc:
            index = refs.index(ready[0])
            error = _unwrap(ray, exc, f"share {index}/{len(refs)}", attempts)
            for ref in pending:
                ray.cancel(ref, force=True)
            ray.wait(pending, num_returns=len(pending), timeout=60)
            for d in staging_dirs(out):
                shutil.rmtree(d, ignore_errors=True)
            raise error from None
    return list(ray.get(refs))


# --- validate --------------------------------------------------------------------------------------------------


def _validate_chunk(targets: list[str], opts: dict[str, Any]) -> list[ValidationReport]:
    return validate_many(targets, **opts)


def validate(
    paths: Sequence[str | os.PathLike[str]],
    *,
    base: str | os.PathLike[str] | None = None,
    level: str | None = None,
    config: str | os.PathLike[str] | dict[str, Any] | None = None,
    allow_pickle: bool = False,
    jobs: int | None = None,
    address: str | None = None,
) -> list[ValidationReport]:
    """:func:`loraformat.validation.validate_many` fanned out over ``jobs`` local processes, or over a Ray
    cluster when ``address`` is given (every node must see the paths); the reports come back in the same
    order as a local run's."""
    level = resolve_level(level, base)
    targets = expand_paths(paths)
    if level == "base":
        from loraformat.io.checkpoint import open_checkpoint

        assert base is not None
        open_checkpoint(base)  # a base that cannot be opened is a usage error here, before any task runs
        base = os.path.abspath(base)
    opts: dict[str, Any] = dict(base=base, level=level, config=config, allow_pickle=allow_pickle)
    if address is None:
        if jobs is not None and jobs < 0:
            raise UsageError("--jobs must be 0 (one per core) or more")
        n = (os.cpu_count() or 1) if not jobs else jobs
        if n == 1 or len(targets) <= 1:
            return validate_many(targets, **opts)
        chunks = _chunks(targets, n * CHUNKS_PER_SLOT)
        with ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = pool.map(_validate_chunk, chunks, [opts] * len(chunks))
            return _as_given(targets, [r for part in parts for r in part])
    ray, owned = _ray(address)
    try:
        slots = jobs or _slots(ray, 1.0, 0.0)
        task = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=False)(_validate_chunk)
        absolute = [os.path.abspath(t) for t in targets]  # the tasks' working directory is not ours
        refs = [task.remote(chunk, opts) for chunk in _chunks(absolute, slots * CHUNKS_PER_SLOT)]
        reports: list[ValidationReport] = []
        for i, ref in enumerate(refs):
            try:
                reports.extend(ray.get(ref))
            except Exception as exc:
                for other in refs[i + 1 :]:
                    ray.cancel(other, force=True)
                raise _unwrap(ray, exc, f"validation task {i + 1}/{len(refs)}", 4) from None
        return _as_given(targets, reports)
    finally:
        if owned:
            ray.shutdown()


def _as_given(targets: list[str], reports: list[ValidationReport]) -> list[ValidationReport]:
    """Each report under the path as the user gave it (the tasks saw absolute paths), as a local run has it."""
    if len(reports) != len(targets):
        raise DistributedError(f"got {len(reports)} reports for {len(targets)} adapters")
    for target, report in zip(targets, reports, strict=True):
        report.path = target
    return reports


def _chunks(items: list[str], count: int) -> list[list[str]]:
    """``items`` in at most ``count`` contiguous runs of near-equal length (order kept)."""
    count = max(1, min(count, len(items)))
    size, extra = divmod(len(items), count)
    out, pos = [], 0
    for k in range(count):
        step = size + (1 if k < extra else 0)
        out.append(items[pos : pos + step])
        pos += step
    return [c for c in out if c]
