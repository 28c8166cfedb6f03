"""The CPU merge with numpy (:mod:`loraformat.ops.delta_np`), so that a CPU merge never imports torch.

``import torch`` takes seconds of one core, about as long as copying a small model, while the targeted tensors
(most of the bytes) wait. This backend runs the same pipeline as :class:`loraformat.merging.engine.Pipeline`
(threads, hashing, progress, atomic output): only the merge loop differs. The source rows are numpy views of
the read-only mapping, adapter factors are read as raw bytes at their header offsets. DoRA and dtypes other
than BF16/F16/F32/F64 stay on torch (:func:`choose_backend`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from loraformat.constants import LayerKind
from loraformat.errors import UsageError
from loraformat.io.tensors import SafetensorsSource
from loraformat.merging import engine
from loraformat.merging.engine import Pipeline
from loraformat.merging.files import read_array
from loraformat.merging.plan import Plan, TensorTask

NUMPY_DTYPES = frozenset({"BF16", "F16", "F32", "F64"})
BACKENDS = ("auto", "torch", "numpy")


def numpy_blocker(plan: Plan) -> str | None:
    """Why the numpy CPU backend cannot run this plan (None: it can): DoRA terms and dtypes other than
    BF16/F16/F32/F64 (in the base, the replacements or the adapters' factors) stay on torch."""
    if sys.byteorder != "little":
        return "a big-endian host"
    for task in plan.tasks:
        if task.action != "compute":
            continue
        for dt in (task.src_dtype, task.out_dtype):
            if dt not in NUMPY_DTYPES:
                return f"{task.name!r} is {dt}"
        for t in task.terms:
            if t.magnitude_key is not None:
                return f"DoRA ({t.module})"
            infos = plan.adapters[t.adapter].source.infos
            for key in (t.a_key, t.b_key):
                if key is not None and infos[key].dtype not in NUMPY_DTYPES:
                    return f"adapter tensor {key!r} is {infos[key].dtype}"
    return None


def choose_backend(backend: str, device: str, plan: Plan) -> str:
    """'numpy' or 'torch'. auto: numpy on CPU when it can run the plan; CUDA always runs on torch."""
    if backend not in BACKENDS:
        raise UsageError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "torch" or device.startswith("cuda"):
        if backend == "numpy":
            raise UsageError(f"the numpy backend runs on CPU only, not {device}")
        return "torch"
    blocker = numpy_blocker(plan)
    if blocker is None:
        return "numpy"
    if backend == "numpy":
        raise UsageError(f"the numpy backend cannot merge this: {blocker}")
    return "torch"


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """The merge thread makes many short, thin products; OpenBLAS's extra threads then spin between them and
    take the core the writer and the hasher need (measured: ~7 s of CPU wasted on a 2.2 GB merge on 2 cores).
    threadpoolctl limits them when it is installed; the CLI also sets OPENBLAS_NUM_THREADS=1 before numpy loads
    (see loraformat.cli.merge)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def merge_cpu_numpy(pipe: Pipeline) -> None:
    """Merge every computed tensor of ``pipe``'s plan on the calling thread, with numpy."""
    pipe.stats.threads = 1
    with _one_blas_thread():
        for task in pipe.compute:
            _merge_task(pipe, task)


def _adapter_array(plan: Plan, adapter_index: int, key: str, cd: Any) -> Any:
    """An adapter tensor in the compute dtype, without torch for files (raw bytes at the header's offsets);
    tensors already in memory (pickles, composed adapters) are torch tensors, so torch is loaded there."""
    from loraformat.ops import delta_np

    adapter = plan.adapters[adapter_index]
    source = adapter.source
    if isinstance(source, SafetensorsSource):
        info = source.infos[key]
        raw = read_array(source.path, info.start, info.nbytes)
        return delta_np.to_compute(raw.view(delta_np.STORAGE[info.dtype]).reshape(info.shape), info.dtype, cd)
    import torch

    wide = cd is delta_np.np.float64
    return adapter.tensor(key).detach().to("cpu", torch.float64 if wide else torch.float32).numpy()


def _terms(plan: Plan, task: TensorTask, cd: Any) -> list[Any]:
    """The task's LoRA and lora_bias terms, factors in the compute dtype ``cd``."""
    from loraformat.ops import delta_np

    terms = []
    for ts in task.terms:
        if ts.kind == LayerKind.BIAS:
            terms.append(
                delta_np.bias_term_np(_adapter_array(plan, ts.adapter, ts.b_key, cd), ts.scale, dtype=cd)
            )
            continue
        assert ts.a_key is not None and ts.magnitude_key is None
        terms.append(
            delta_np.lora_term_np(
                _adapter_array(plan, ts.adapter, ts.a_key, cd),
                _adapter_array(plan, ts.adapter, ts.b_key, cd),
                ts.scale,
                ts.kind,
                fan_in_fan_out=ts.fan_in_fan_out,
                dtype=cd,
            )
        )
    return terms


def _memory_rows(pipe: Pipeline, task: TensorTask, start: int, stop: int) -> Any:
    """Rows of an in-memory replacement (a torch tensor), as stored elements (BF16 as uint16 bits)."""
    import torch

    from loraformat.ops import delta_np

    t = pipe._memory_rows(task, start, stop).detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(delta_np.STORAGE["BF16"])
    return t.numpy()


def _merge_task(pipe: Pipeline, task: TensorTask) -> None:
    """As Pipeline._merge_task_cpu: row blocks from the mapping, L2-sized sub-blocks decoded into the compute
    dtype, merged, rounded once into the output buffer, handed to the writer."""
    import numpy as np

    from loraformat.ops import delta_np

    assert pipe.sources is not None
    rows, cols = engine.rows_cols(task.shape)
    if rows == 0 or cols == 0:
        pipe.progress(0, 1)
        return
    src_np, out_np = delta_np.STORAGE[task.src_dtype], delta_np.STORAGE[task.out_dtype]
    cd = delta_np.compute_dtype(task.src_dtype, task.out_dtype)
    terms = _terms(pipe.plan, task, cd) if task.terms else []
    step = pipe._block_rows(task, rows, cols)
    sub = max(1, engine.CPU_SUBBLOCK_ELEMS // max(cols, 1))
    m = min(sub, step, rows) * cols
    direct = out_np is cd  # merge straight into the output buffer
    work = None if direct else np.empty(m, cd)
    prod = np.empty(m, cd) if terms else None
    src_loc = engine._source(task)
    row_bytes = cols * engine._itemsize(task.src_dtype)
    for r0 in range(0, rows, step):
        pipe._check_abort()
        r1 = min(rows, r0 + step)
        n, nbytes = r1 - r0, (r1 - r0) * row_bytes
        if src_loc is None:
            src = _memory_rows(pipe, task, r0, r1).reshape(n, cols)
        else:
            path, start = src_loc
            src = pipe.sources.array(path, start + r0 * row_bytes, nbytes).view(src_np).reshape(n, cols)
        out_nbytes = n * cols * engine._itemsize(task.out_dtype)
        obuf = pipe.out_pool.get(out_nbytes)
        out = obuf.array()[:out_nbytes].view(out_np).reshape(n, cols)
        for s0 in range(0, n, sub):
            s1 = min(n, s0 + sub)
            k = (s1 - s0) * cols
            w = out[s0:s1] if work is None else work[:k].reshape(s1 - s0, cols)
            delta_np.decode(src[s0:s1], task.src_dtype, w)
            delta_np.merge_rows_np_(w, terms, r0 + s0, r0 + s1, prod)
            if work is not None:
                delta_np.encode(w, task.out_dtype, out[s0:s1])
            if terms and delta_np.introduces_nonfinite(
                out[s0:s1], task.out_dtype, src[s0:s1], task.src_dtype
            ):
                raise engine.nonfinite_error(task)
        del src, out
        if src_loc is not None:
            pipe.sources.drop(src_loc[0], src_loc[1] + r0 * row_bytes, nbytes)
            pipe._count(bytes_read=nbytes)
            pipe.merged_bytes += nbytes
        pipe._write_job(task, r0, r1, obuf, out_nbytes, [(pipe.out_pool, obuf)])
