"""Merging into a diffusers pipeline directory: every component folder the adapters target streams through
the one merge entry point (:func:`loraformat.merging.api.merge`), the others and every non-weight file are copied,
and the whole output directory appears atomically (spec/interop/diffusers.md §Merging into a pipeline)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from loraformat.adapter import Adapter, adapter_weights, open_adapter
from loraformat.components import check_pipeline_base, component_adapter, components
from loraformat.errors import UsageError
from loraformat.io.atomic import atomic_dir, check_output, write_error
from loraformat.io.pipeline import pipeline_components


def open_for_base(adapters: list[Any], base: str | os.PathLike[str]) -> tuple[list[Adapter], list[Adapter]]:
    """(opened, owned): paths are opened with ``base`` so kohya names resolve against its modules."""
    opened, owned = [], []
    for a in adapters:
        if isinstance(a, Adapter):
            opened.append(a)
        else:
            adapter = open_adapter(a, base=base)
            opened.append(adapter)
            owned.append(adapter)
    return opened, owned


def narrow_to_folder(adapter: Adapter, folder: str | os.PathLike[str]) -> tuple[Adapter, list[str]]:
    """The part of a pipeline adapter that targets a single component folder (its name says which), and the
    components left out; a component-less adapter is returned as it is."""
    from loraformat.components import fits_as_is, folder_for

    parts = components(adapter.meta)
    if parts == [None] or fits_as_is(adapter.meta, folder):
        return adapter, []
    fitting = [c for c in parts if c is not None and folder_for(folder, c) is not None]
    if len(fitting) != 1:
        raise UsageError(
            f"{adapter.path} targets {', '.join(str(c) for c in parts)}; name the base folder after the component "
            "to merge (unet, transformer, text_encoder, ...) or give the pipeline directory",
        )
    return component_adapter(adapter, fitting[0]), [c for c in parts if c != fitting[0] and c is not None]


def _copy_entry(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".*"))
    else:
        shutil.copyfile(src, dst)


def merge_pipeline(
    base: str | os.PathLike[str],
    adapters: list[Any],
    out: str | os.PathLike[str],
    *,
    weights: list[float] | None = None,
    overwrite: bool = False,
    **merge_options: Any,
) -> Any:
    """Merge adapters into a diffusers pipeline directory; returns the merge result summed over components
    with each component's own result under ``components``."""
    from loraformat.merging.api import MergeResult, merge

    t0 = time.perf_counter()
    out = Path(out)
    check_output(out, overwrite=overwrite)
    opened, owned = open_for_base(list(adapters), base)
    try:
        ws_all = adapter_weights(weights, len(opened))
        for a in opened:
            check_pipeline_base(a.meta, base, path=a.path)
            if None in components(a.meta):
                raise UsageError(
                    f"{a.path} does not say which pipeline component it is for; convert it with --component "
                    "unet (or text_encoder, ...) or merge it into that component's folder",
                )
        folders = pipeline_components(base)
        results: dict[str, MergeResult] = {}
        with atomic_dir(out, overwrite=overwrite) as tmp:
            for entry in sorted(Path(base).iterdir()):
                if entry.name.startswith("."):
                    continue
                parts: list[Any] = [
                    component_adapter(a, entry.name) for a in opened if entry.name in components(a.meta)
                ]
                if entry.name in folders and parts:
                    ws = [w for a, w in zip(opened, ws_all, strict=True) if entry.name in components(a.meta)]
                    results[entry.name] = merge(entry, parts, tmp / entry.name, weights=ws, **merge_options)
                    continue
                try:
                    _copy_entry(entry, tmp / entry.name)
                except OSError as exc:
                    raise write_error(exc, out) from None
    finally:
        for a in owned:
            a.close()
    return _summary(out, results, time.perf_counter() - t0)


def _summary(out: Path, results: dict[str, Any], seconds: float) -> Any:
    from loraformat.merging.api import MergeResult

    first = next(iter(results.values()))
    total = {
        name: sum(getattr(r, name) for r in results.values())
        for name in (
            "tensors",
            "tensors_merged",
            "tensors_replaced",
            "tensors_converted",
            "tensors_copied",
            "bytes_read",
            "bytes_written",
        )
    }
    verified = {
        "enabled": first.verified.get("enabled", True),
        "tensors": sum(r.verified.get("tensors", 0) for r in results.values()),
        "bytes_hashed": sum(r.verified.get("bytes_hashed", 0) for r in results.values()),
    }
    return MergeResult(
        output=str(out),
        device=first.device,
        backend=first.backend,
        dtype=first.dtype,
        adapters=[a for r in results.values() for a in r.adapters],
        shards=[f"{c}/{s}" for c, r in results.items() for s in r.shards],
        seconds=round(seconds, 4),
        gb_per_s=round(total["bytes_written"] / seconds / 1e9, 4) if seconds > 0 else 0.0,
        peak_rss_bytes=max(r.peak_rss_bytes for r in results.values()),
        peak_gpu_bytes=max(r.peak_gpu_bytes for r in results.values()),
        verified=verified,
        warnings=[w for r in results.values() for w in r.warnings],
        components={c: r.to_json() for c, r in results.items()},
        **total,
    )
