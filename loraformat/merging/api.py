"""``loraformat merge`` (the public :func:`merge`): stream one or more LoRA adapters into a base checkpoint, at about the speed of copying it.

W' = W + sum_i w_i * s_i * B_i A_i per module (PEFT's merge_and_unload semantics: fan_in_fan_out, embeddings,
conv, DoRA, lora_bias, modules_to_save), computed in fp32 and rounded once; untouched tensors are copied as raw
bytes. Every input is checked from headers before any data is read (plan.py); targets are verified against the
adapters' recorded digests while they stream (engine.py); the device and its kernel come from devices.py; the output directory appears atomically.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import resource
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraformat.adapter import Adapter, adapter_weights
from loraformat.errors import UsageError, WriteError
from loraformat.io.atomic import atomic_dir, check_output, write_error
from loraformat.io.checkpoint import open_checkpoint
from loraformat.io.pipeline import is_pipeline
from loraformat.io.quantized import attach as attach_quantized
from loraformat.merging.devices import open_device
from loraformat.merging.engine import Progress, write_shards
from loraformat.merging.plan import Plan, build_plan, check_paths, resolve_dtype
from loraformat.merging.quantplan import resolve_options
from loraformat.rules import resolve_device

__all__ = ["MergeResult", "merge"]


@dataclass
class MergeResult:
    output: str
    device: str
    backend: str  # "numpy" (CPU, no torch) or "torch"
    dtype: str
    adapters: list[dict[str, Any]]
    shards: list[str]
    tensors: int
    tensors_merged: int  # received at least one LoRA delta (or lora_bias)
    tensors_replaced: int  # replaced by an adapter's saved tensor (modules_to_save, bias)
    tensors_converted: int  # only converted to --dtype
    tensors_copied: int  # copied as raw bytes
    bytes_read: int
    bytes_written: int
    seconds: float
    gb_per_s: float
    peak_rss_bytes: int
    peak_gpu_bytes: int
    verified: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    components: dict[str, Any] = field(default_factory=dict)  # per pipeline component, for a pipeline base
    #: quantized base / QLoRA round trip: {"base", "requantize", "dequantize_as"} (None: a plain merge)
    quantization: dict[str, Any] | None = None
    #: requant(W + dW) - (W + dW) against dW over the re-quantized tensors: max_rel, rms_rel, max_abs, rms_abs
    requant_error: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _import_torch_in_background() -> None:
    """Importing torch takes 1-2 s of one core; start it now so that it overlaps opening and checking the
    inputs and the first copies. The merge's own ``import torch`` waits for this one to finish."""
    if "torch" in sys.modules:
        return
    threading.Thread(target=_import_torch, name="loraformat-import-torch", daemon=True).start()


def _import_torch() -> None:
    try:
        importlib.import_module("torch")
    except Exception:  # the merge's own import reports it
        pass


def _open_adapters(
    adapters: list[Any], base: str | os.PathLike[str]
) -> tuple[list[Adapter], list[Adapter], list[str]]:
    """Opened adapters (kohya names resolved against the base), each narrowed to the component the base is
    when it targets a diffusers pipeline; the notes say which components were left out."""
    from loraformat.merging.pipeline import narrow_to_folder, open_for_base

    opened, owned = open_for_base(adapters, base)
    notes = []
    for i, adapter in enumerate(opened):
        opened[i], left_out = narrow_to_folder(adapter, base)
        if left_out:
            notes.append(f"{adapter.path}: only the {base} component was merged, not {', '.join(left_out)}")
    return opened, owned, notes


@contextlib.contextmanager
def planned(
    base: str | os.PathLike[str],
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    out: Path,
    weights: list[float],
    out_dtype: str | None,
    max_shard_size: int | str | None,
    verify: bool,
    overwrite: bool,
    dequantize_as: str = "auto",
    requantize: str = "keep",
) -> Iterator[tuple[Plan, list[str]]]:
    """Open and check every input and plan the merge from headers: (the plan, notes for the result). The
    adapters this opened are closed on exit. Shared by the one-machine merge and the split merge's workers.
    A quantized base (FP8, bitsandbytes 4-bit) is recognised and checked here, scales included."""
    opened, owned, notes = _open_adapters(list(adapters), base)
    try:
        ck = open_checkpoint(base)
        check_paths(ck, opened, out)
        check_output(out, overwrite=overwrite)
        quant = resolve_options(attach_quantized(ck), [a.meta for a in opened], dequantize_as, requantize)
        plan = build_plan(
            ck,
            opened,
            weights,
            out_dtype=out_dtype,
            max_shard_size=max_shard_size,
            verify=verify,
            quant=quant,
        )
        yield plan, notes
    finally:
        for a in owned:
            a.close()


def _check_space(plan: Plan, out: Path) -> None:
    need = plan.total_bytes + sum((plan.ck.root / f).stat().st_size for f in plan.aux_files)
    try:
        free = shutil.disk_usage(out.resolve().parent).free
    except OSError:
        return
    if need > free:
        raise WriteError(
            f"needs {need / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free; nothing was written", path=out
        )


def _write_extras(plan: Plan, tmp: Path) -> int:
    """The index (when sharded) and every non-weight file of the base; config.json's dtype follows --dtype."""
    written = 0
    if plan.index is not None:
        data = (json.dumps(plan.index, indent=2, sort_keys=True) + "\n").encode()
        (tmp / plan.ck.index_name).write_bytes(data)
        written += len(data)
    patch = plan.config_patch()
    for rel in plan.aux_files:
        src, dst = plan.ck.root / rel, tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel == Path("config.json") and patch:
            try:
                config = json.loads(src.read_text("utf-8"))
            except (OSError, ValueError):
                config = None
            if isinstance(config, dict):
                for key, value in patch.items():
                    if key in config and value is None:
                        del config[key]  # --requantize none: the weights are no longer quantized
                    elif key in config:
                        config[key] = value
                data = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
                dst.write_bytes(data)
                written += len(data)
                continue
        shutil.copyfile(src, dst)
        written += dst.stat().st_size
    return written


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


#: warn when the re-quantization error's RMS exceeds this fraction of the delta's
LOST_DELTA_RMS = 0.5


def merge(
    base: str | os.PathLike[str],
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    out: str | os.PathLike[str],
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
) -> MergeResult:
    """Merge ``adapters`` (paths or opened Adapters) into ``base`` and write a loadable model directory to ``out``.

    ``progress(bytes, tensors)`` receives increments as the output is written. Raises a LoraformatError subclass
    for every refusal (exit codes in loraformat.errors); nothing is ever left under ``out`` on failure.
    ``backend`` is for testing and benchmarking: "auto" merges on CPU with numpy (torch is then never imported)
    unless a term is DoRA or a dtype is exotic, and with torch otherwise and on CUDA; "torch" or "numpy" force
    one (numpy refuses what it cannot merge); the kernels agree within the bound ops/kernel.py states.
    ``device``: auto, cpu, cuda, cuda:N, or cpu-staged (the CUDA orchestration run on CPU, for testing).

    Quantized bases (spec/interop/fp8.md, spec/interop/nf4.md) merge on the host CPU: FP8 and bitsandbytes 4-bit
    weights are decoded, merged and re-quantized with fresh scales (``requantize="keep"``) or written 16-bit
    (``"none"``); ``dequantize_as`` ("auto", "nf4", "fp4", "none") makes a 16-bit base's targets
    dequant(quant(W)) first, as QLoRA trained them ("auto": when the adapters record a 4-bit training base).
    """
    t0 = time.perf_counter()
    out = Path(out)
    if not adapters:
        raise UsageError("give at least one adapter to merge")
    ws = adapter_weights(weights, len(adapters))
    out_dtype = resolve_dtype(dtype)
    if is_pipeline(base):
        from loraformat.merging.pipeline import merge_pipeline

        options = dict(
            device=device, dtype=dtype, max_shard_size=max_shard_size, verify=verify, progress=progress
        )
        return merge_pipeline(
            base, list(adapters), out, weights=ws, overwrite=overwrite, backend=backend, **options
        )
    with planned(
        base, adapters, out, ws, out_dtype, max_shard_size, verify, overwrite, dequantize_as, requantize
    ) as (plan, notes):
        dev = "cpu" if plan.quant is not None else resolve_device(device, staged=True)
        target = open_device(dev, backend, plan)
        engine_backend = target.kernel.name
        if engine_backend == "torch":
            _import_torch_in_background()  # overlaps the first copies and the digest checks
        if not verify:
            notes.append("--no-verify: base tensors were not checked against the adapters' recorded digests")
            warnings.warn(notes[-1], stacklevel=2)
        _check_space(plan, out)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            stats = write_shards(plan, tmp, out, target, progress=progress)
            try:
                stats.bytes_written += _write_extras(plan, tmp)
            except OSError as exc:
                raise write_error(exc, out) from None
        seconds = time.perf_counter() - t0
    requant = _requant_report(stats, notes)
    return _result(plan, stats, ws, out, dev, engine_backend, dtype, verify, notes, seconds, requant)


def _requant_report(stats: Any, notes: list[str]) -> dict[str, Any] | None:
    """The re-quantization error over the re-quantized weights, and a warning when most of the delta was lost."""
    requant = stats.requant.report() if stats.requant.elements else None
    if requant is not None and requant["rms_rel"] > LOST_DELTA_RMS:
        notes.append(
            f"re-quantization lost most of the adapter: its RMS error is {requant['rms_rel']:.0%} of the delta's "
            "(the delta is below the quantization step); consider --requantize none"
        )
        warnings.warn(notes[-1], stacklevel=3)
    return requant


def _result(
    plan: Any,
    stats: Any,
    ws: list[float],
    out: Path,
    dev: str,
    engine_backend: str,
    dtype: str,
    verify: bool,
    notes: list[str],
    seconds: float,
    requant: dict[str, Any] | None,
) -> MergeResult:
    actions = [t.action for t in plan.tasks]
    return MergeResult(
        output=str(out),
        device=dev,
        backend=engine_backend,
        dtype=dtype,
        adapters=[
            {
                "path": a.path,
                "name": a.meta.name,
                "weight": w,
                "modules": len(a.meta.modules),
                "content_hash": a.meta.content_hash,
                "source_format": a.source_format,
            }
            for a, w in zip(plan.adapters, ws, strict=True)
        ],
        shards=[s.name for s in plan.shards],
        tensors=len(plan.tasks),
        tensors_merged=sum(1 for t in plan.tasks if t.terms),
        tensors_replaced=sum(1 for t in plan.tasks if t.replacement is not None),
        tensors_converted=sum(
            1
            for t, a in zip(plan.tasks, actions, strict=True)
            if a == "compute" and not t.terms and t.replacement is None
        ),
        tensors_copied=sum(1 for a in actions if a in ("copy", "copy-replacement")),
        bytes_read=stats.bytes_read,
        bytes_written=stats.bytes_written,
        seconds=round(seconds, 4),
        gb_per_s=round(stats.bytes_written / seconds / 1e9, 4) if seconds > 0 else 0.0,
        peak_rss_bytes=_peak_rss(),
        peak_gpu_bytes=stats.peak_gpu_bytes,
        verified={
            "enabled": verify,
            "tensors": stats.tensors_verified,
            "bytes_hashed": stats.bytes_hashed,
            "adapters_without_digests": plan.unverified_adapters,
            "structure_hash_checked": [
                lbl for lbl, m in zip(plan.labels, plan.metas, strict=True) if m.base_model.structure_hash
            ],
        },
        warnings=notes,
        quantization=plan.quant.describe() if plan.quant is not None else None,
        requant_error=requant,
    )
