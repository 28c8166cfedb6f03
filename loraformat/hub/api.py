"""``push``, ``pull`` and ``list_repos``: the public hub API (``loraformat.push`` / ``loraformat.pull``).

A push validates the adapter, converts a PEFT input to the native file, and publishes one revision holding the
layout PEFT and vLLM load straight from the repository: ``adapter_model.safetensors`` (the loraformat file,
byte for byte), ``adapter_config.json`` (generated from the metadata) and ``README.md`` (the model card).
A pull fetches a revision into the verified cache (cache.py) and copies it into the output directory atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraformat import __version__
from loraformat.errors import AdapterError, InputNotFoundError, UsageError
from loraformat.hub.backend import Progress
from loraformat.hub.cache import RECORD, fetch, materialize, open_backend
from loraformat.hub.local import LocalHub, RepoListing
from loraformat.hub.refs import (
    CARD_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
    HubSpec,
    check_ref_name,
    check_repo_id,
    select_hub,
)
from loraformat.io.atomic import check_output
from loraformat.metadata import AdapterMetadata


@dataclass
class PushResult:
    hub: str
    repo_id: str
    branch: str
    commit: str
    created: bool  # False: the branch already held exactly these files, nothing new was committed
    tag: str | None
    url: str
    content_hash: str | None
    files: dict[str, int]
    converted: bool  # the input was a PEFT adapter, converted to the native file for upload
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PullResult:
    hub: str
    repo_id: str
    revision: str
    commit: str
    output: str
    files: dict[str, int]
    content_hash: str | None
    cached: bool  # the revision was already in the cache: nothing was transferred
    offline: bool
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Upload:
    sources: dict[str, str | bytes]
    meta: AdapterMetadata
    content_hash: str | None
    size: int
    converted: bool
    warnings: list[str]


def _validate(path: Path) -> list[str]:
    """Data-level validation (structure, schema, shapes, NaN/Inf, content hash); refuse on any error."""
    from loraformat.validation import validate as run_validate

    report = run_validate(path, level="data")
    if report.errors:
        first = report.errors[0]
        more = f" (and {len(report.errors) - 1} more)" if len(report.errors) > 1 else ""
        raise AdapterError(
            f"refusing to push an invalid adapter: {first.code}: {first.location or '-'}: "
            f"{first.message}{more}; `loraformat validate --level data` lists every finding, "
            "--no-validate pushes anyway",
            path=path,
        )
    return [f"{w.code}: {w.message}" for w in report.warnings]


def _vllm_notes(adapter: Path) -> list[str]:
    """What vLLM would refuse in a plain push (validate --for vllm errors), as warnings."""
    from loraformat.engine_check import validate_for

    reports = validate_for([adapter], "vllm")
    return [f"vLLM would refuse it: {f.code}: {f.location}: {f.message}" for r in reports for f in r.errors]


def _export_for(adapter: Path, tmp: Path, engine: str) -> Path:
    """The engine's PEFT layout (loraformat/exporting.py) in ``tmp``; its weights file is what gets pushed."""
    from loraformat.engines import ENGINE_LAYOUT, check_engine
    from loraformat.errors import UsageError
    from loraformat.exporting import export

    engine = check_engine(engine)
    if ENGINE_LAYOUT[engine] != "peft":
        raise UsageError(
            f"push --for takes an engine that reads a PEFT repository (vllm, peft), not {engine}"
        )
    out = tmp / "export"
    export(adapter, out, engine=engine, to="peft")
    return out / WEIGHTS_FILE


def _prepare(
    adapter: Path, tmp: Path, *, repo_id: str, ref: str, validate: bool, engine: str | None = None
) -> _Upload:
    from loraformat.adapter import open_adapter
    from loraformat.hub.card import model_card
    from loraformat.io.peft import peft_config_from_metadata

    if not adapter.exists():
        raise InputNotFoundError("no such file or directory", path=adapter)
    notes = _validate(adapter) if validate else []
    if engine is not None:
        adapter = _export_for(adapter, tmp, engine)
    else:
        notes += _vllm_notes(adapter)
    with open_adapter(adapter, check=validate) as opened:
        native = opened.source_format == "loraformat"
        weights = os.fspath(opened.source.path) if native else None
        meta = opened.meta
    if weights is None:
        from loraformat.conversion import convert

        weights = os.fspath(tmp / WEIGHTS_FILE)
        convert(adapter, weights)
        with open_adapter(weights) as converted:
            meta = converted.meta
    size = os.path.getsize(weights)
    config = json.dumps(peft_config_from_metadata(meta), indent=2, sort_keys=True) + "\n"
    card = model_card(
        meta, repo_id=repo_id, ref=ref, content_hash=meta.content_hash or "(not recorded)", size=size
    )
    sources: dict[str, str | bytes] = {
        WEIGHTS_FILE: weights,
        CONFIG_FILE: config.encode(),
        CARD_FILE: card.encode(),
    }
    return _Upload(sources, meta, meta.content_hash, size, not native, notes)


def _messages(meta: AdapterMetadata, content_hash: str | None, message: str | None) -> tuple[str, str]:
    ranks = "/".join(str(r) for r in meta.ranks)
    summary = message or (
        f"Upload LoRA adapter {meta.name} (rank {ranks}, {len(meta.modules)} modules, "
        f"content {(content_hash or 'unknown')[:12]})"
    )
    bm = meta.base_model
    description = "\n".join(
        [
            f"Pushed with loraformat {__version__}.",
            f"adapter content hash: {content_hash or 'not recorded'}",
            f"base model: {bm.id or 'not recorded'}" + (f" @ {bm.revision}" if bm.revision else ""),
            f"base content hash: {bm.content_hash or 'not recorded'}",
        ]
    )
    return summary, description


def push(
    adapter: str | os.PathLike[str],
    repo_id: str,
    *,
    hub: str | os.PathLike[str] | HubSpec | None = None,
    revision: str | None = None,
    tag: str | None = None,
    private: bool = False,
    message: str | None = None,
    validate: bool = True,
    token: str | None = None,
    progress: Progress | None = None,
    engine: str | None = None,
) -> PushResult:
    """Publish an adapter (native file or PEFT directory) as one revision of ``repo_id`` on branch ``revision``
    (default main), optionally tagged. ``hub``: a local hub path, ``file://PATH``, an ``http(s)://`` Hub endpoint,
    ``hf``; None = $LORAFORMAT_HUB, else the Hugging Face Hub. ``engine`` ("vllm", "peft") publishes that engine's
    exact layout (``convert --for``); a plain push warns about anything vLLM would refuse."""
    started = time.perf_counter()
    spec = select_hub(hub)
    check_repo_id(repo_id)
    if revision is not None:
        check_ref_name(revision, "branch")
    if tag is not None:
        check_ref_name(tag, "tag")
    ref = f"hf://{repo_id}" if spec.kind == "hf" else f"lfhub://{repo_id}"
    with tempfile.TemporaryDirectory(prefix="loraformat-push-") as tmp:
        upload = _prepare(
            Path(adapter), Path(tmp), repo_id=repo_id, ref=ref, validate=validate, engine=engine
        )
        summary, description = _messages(upload.meta, upload.content_hash, message)
        backend = open_backend(spec, token=token, create=True)
        branch = revision or "main"
        published = backend.publish(
            repo_id,
            upload.sources,
            branch=branch,
            tag=tag,
            message=summary,
            description=description,
            private=private,
            progress=progress,
        )
        commit, created, url = published.commit, published.created, published.url
    files = {n: (len(s) if isinstance(s, bytes) else upload.size) for n, s in upload.sources.items()}
    return PushResult(
        backend.describe(),
        repo_id,
        branch,
        commit,
        created,
        tag,
        url,
        upload.content_hash,
        files,
        upload.converted,
        time.perf_counter() - started,
        upload.warnings,
    )


def pull(
    repo_id: str,
    out: str | os.PathLike[str],
    *,
    hub: str | os.PathLike[str] | HubSpec | None = None,
    revision: str | None = None,
    token: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> PullResult:
    """Fetch ``repo_id`` at ``revision`` (a branch, tag or commit; default main) into directory ``out``, verified:
    sizes and hashes against the hub's records, the adapter's content hash against its tensor data, the
    metadata against the schema. A revision already in the cache is copied from there without any transfer."""
    started = time.perf_counter()
    spec = select_hub(hub)
    check_repo_id(repo_id)
    if revision is not None:
        check_ref_name(revision)
    check_output(Path(out), overwrite=overwrite)  # fail before any transfer
    backend = open_backend(spec, token=token)
    entry = fetch(backend, repo_id, revision, progress=progress)
    names = [n for n in entry.files if n != RECORD]
    materialize(entry.path, names, out, overwrite=overwrite)
    return PullResult(
        backend.describe(),
        repo_id,
        revision or "main",
        entry.commit,
        os.fspath(out),
        entry.files,
        entry.content_hash,
        entry.cached,
        entry.offline,
        time.perf_counter() - started,
    )


def list_repos(hub: str | os.PathLike[str] | HubSpec | None = None) -> list[RepoListing]:
    """Repositories of a local hub with their branches and tags."""
    spec = select_hub(hub)
    if spec.kind != "local":
        raise UsageError(
            "list works on a local hub (--hub PATH or LORAFORMAT_HUB); browse the Hugging Face Hub "
            "on its website or with the `hf` CLI"
        )
    assert spec.path is not None
    return LocalHub(spec.path).list_repos()
