"""The pull cache: every revision fetched from a hub lands, verified, in ``$LORAFORMAT_CACHE/hub/...`` under its
commit id, and is reused from there.

A cache entry is staged beside its final name, verified, fsynced and renamed into place, so an entry that exists
is complete and verified; it is never re-downloaded or re-hashed. Entries are immutable (commit ids are) and
their files read-only. Output directories get hard links to the entry's files when they share its filesystem
(a cached pull then costs no copy at all) and copies otherwise; since an in-place edit of a linked file would
alter the entry, every reuse first compares each file's size and mtime with those recorded when the entry was
made, and an entry that changed is dropped and fetched again.

Branch and tag names resolve through the hub each time (cheap for the local hub, one request for the Hugging
Face Hub); a name last seen on the Hugging Face Hub is reused from ``refs/`` when the network is down or offline
mode is on.

Layout: ``hub/<hub key>/<org>/<name>/<commit>/{adapter_model.safetensors, adapter_config.json, README.md,
.loraformat-pull.json}`` and ``.../refs/<quoted revision>`` (the hub key is ``local`` for local hubs, whose
commit ids are content addresses, and ``hf-<host>`` per Hugging Face Hub endpoint).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from loraformat.errors import HubNetworkError, HubNotFoundError, VerificationError
from loraformat.hub.backend import Progress
from loraformat.hub.refs import (
    ADAPTER_FILES,
    DEFAULT_BRANCH,
    HF_COMMIT,
    WEIGHTS_FILE,
    HubSpec,
    cache_root,
    check_repo_id,
    safe_relpath,
)
from loraformat.hub.untrusted import check_commit, check_size, is_inside, join_under, remove_tree
from loraformat.hub.verify import Expected, fsync_tree, verify_download
from loraformat.io.atomic import atomic_dir, atomic_file, check_output, fsync_dir, temp_name, write_error
from loraformat.metadata import now_iso

if TYPE_CHECKING:
    from loraformat.hub.hf import HfHub
    from loraformat.hub.local import LocalHub

RECORD = ".loraformat-pull.json"


@dataclass
class CachedRevision:
    path: Path
    commit: str
    files: dict[str, int]
    content_hash: str | None
    cached: bool  # True: it was already in the cache, nothing was transferred
    offline: bool = False  # True: the revision name was resolved from the cache (hub unreachable)


def open_backend(hub: HubSpec, *, token: str | None = None, create: bool = False) -> LocalHub | HfHub:
    if hub.kind == "local":
        from loraformat.hub.local import LocalHub

        assert hub.path is not None
        return LocalHub(hub.path, create=create)
    from loraformat.hub.hf import HfHub

    return HfHub(hub.endpoint, token)


def repo_cache_dir(backend: LocalHub | HfHub, repo_id: str) -> Path:
    key = "local" if backend.kind == "local" else backend.cache_key()  # type: ignore[union-attr]
    org, name = check_repo_id(repo_id).split("/")
    return cache_root() / "hub" / key / org / name


def _read_record(entry: Path) -> dict[str, Any]:
    try:
        return json.loads((entry / RECORD).read_text("utf-8"))
    except (OSError, ValueError):
        return {}


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _cached(entry: Path, commit: str, offline: bool = False) -> CachedRevision | None:
    """The entry if every file is as it was when the entry was made (size, mtime); None if it was altered."""
    record = _read_record(entry)
    stats, files = record.get("stat"), record.get("files")
    if not isinstance(stats, dict) or not stats or not isinstance(files, dict) or set(files) != set(stats):
        return None
    try:
        if any(_stat(join_under(entry, name)) != list(want) for name, want in stats.items()):
            return None
    except (OSError, TypeError, VerificationError):  # a record naming paths outside the entry: altered
        return None
    return CachedRevision(entry, commit, dict(files), record.get("content_hash"), True, offline)


def _discard(entry: Path) -> None:
    """Move an altered entry aside first (atomic), then delete it; only ever inside the cache root."""
    root = cache_root()
    if not is_inside(root, entry):
        raise VerificationError(f"refusing to discard {entry}: it is not inside the cache {root}")
    trash = temp_name(entry)
    with contextlib.suppress(OSError):
        os.rename(entry, trash)
    if trash.exists():
        remove_tree(trash, root)


def _resolve(
    backend: LocalHub | HfHub, repo_id: str, revision: str | None, repo_cache: Path
) -> tuple[str, bool]:
    """(commit, offline). A Hugging Face commit sha already cached needs no request at all."""
    rev = revision or DEFAULT_BRANCH
    if backend.kind == "hf" and HF_COMMIT.match(rev) and (repo_cache / rev).is_dir():
        return rev, False
    try:
        return backend.resolve(repo_id, revision), False
    except HubNetworkError:
        if backend.kind != "hf":
            raise
        ref = join_under(repo_cache, "refs", quote(rev, safe=""))
        with contextlib.suppress(OSError):
            commit = ref.read_text("utf-8").strip()
            if HF_COMMIT.match(commit) and (repo_cache / commit).is_dir():
                return commit, True
        raise


def _remember_ref(repo_cache: Path, revision: str | None, commit: str) -> None:
    rev = revision or DEFAULT_BRANCH
    if rev == commit:
        return
    with contextlib.suppress(OSError):
        (repo_cache / "refs").mkdir(parents=True, exist_ok=True)
        with atomic_file(join_under(repo_cache, "refs", quote(rev, safe="")), overwrite=True) as f:
            f.write(commit.encode())


def fetch(
    backend: LocalHub | HfHub, repo_id: str, revision: str | None = None, *, progress: Progress | None = None
) -> CachedRevision:
    """The verified cache entry of ``repo_id@revision``, downloading it first if it is not cached yet."""
    repo_cache = repo_cache_dir(backend, repo_id)
    where = f"{repo_id}@{revision or DEFAULT_BRANCH}"
    commit, offline = _resolve(backend, repo_id, revision, repo_cache)
    entry = join_under(repo_cache, check_commit(commit, backend.kind, where=where), where=where)
    if entry.is_dir():
        hit = _cached(entry, commit, offline)
        if hit is not None:
            _remember_ref(repo_cache, revision, commit)
            return hit
        _discard(entry)
        if offline:
            raise HubNetworkError(
                f"{repo_id}: the cached copy of {commit[:12]} was altered and the hub is unreachable"
            )
    expected = _expected_files(backend, repo_id, commit, where)
    names = list(expected)
    stage = temp_name(entry)
    try:
        stage.mkdir(parents=True)
        backend.download(repo_id, commit, names, stage, progress, {n: e.size for n, e in expected.items()})
        with ThreadPoolExecutor(max_workers=1) as pool:
            synced = pool.submit(fsync_tree, stage)  # the disk works while the CPU verifies
            verified = verify_download(stage, expected, where=where)
            synced.result()
        for name in names:
            os.chmod(stage / name, 0o444)
        files = {n: e.size for n, e in expected.items()}
        _write_record(stage, backend, repo_id, commit, revision, files, verified.content_hash)
        try:
            os.rename(stage, entry)
        except OSError:
            if not entry.is_dir():
                raise
            remove_tree(stage, repo_cache)  # a concurrent pull put the same revision there first
        fsync_dir(entry.parent)
    except OSError as exc:
        remove_tree(stage, repo_cache)
        raise write_error(exc, entry) from None
    except BaseException:
        remove_tree(stage, repo_cache)
        raise
    _remember_ref(repo_cache, revision, commit)
    return CachedRevision(entry, commit, files, verified.content_hash, False)


def _expected_files(backend: LocalHub | HfHub, repo_id: str, commit: str, where: str) -> dict[str, Expected]:
    """The adapter files of the revision and what each must be (size, and sha256 / git oid where the hub
    gives them): checked before anything is downloaded, verified after."""
    remote = backend.files(repo_id, commit)
    if WEIGHTS_FILE not in remote:
        raise HubNotFoundError(f"{where}: no {WEIGHTS_FILE} in this revision (is it an adapter repository?)")
    names = [n for n in ADAPTER_FILES if n in remote]
    for name in names:
        check_size(remote[name].size, name, where=where)
    expected = {
        n: Expected(remote[n].size, remote[n].sha256, getattr(remote[n], "git_oid", None)) for n in names
    }
    if backend.kind == "local":  # already checked object by object while copying
        expected = {n: Expected(e.size) for n, e in expected.items()}
    return expected


def _write_record(
    stage: Path,
    backend: LocalHub | HfHub,
    repo_id: str,
    commit: str,
    revision: str | None,
    files: dict[str, int],
    content_hash: str | None,
) -> None:
    """The cache entry's record: where it came from, what was verified, and the files' stat to spot edits."""
    record = {
        "repo": repo_id,
        "commit": commit,
        "revision": revision or DEFAULT_BRANCH,
        "hub": backend.describe(),
        "files": files,
        "stat": {n: _stat(stage / n) for n in files},
        "content_hash": content_hash,
        "verified": True,
        "pulled": now_iso(),
    }
    with atomic_file(stage / RECORD) as f:
        f.write((json.dumps(record, indent=1, sort_keys=True) + "\n").encode())


def materialize(
    entry: Path,
    files: list[str],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Put a cache entry's files into ``out`` atomically (the directory appears complete or not at all): hard
    links where the filesystem allows, copies otherwise."""
    out = Path(out)
    check_output(out, overwrite=overwrite)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for name in files:
            source, target = join_under(entry, name), tmp / safe_relpath(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:  # another filesystem, or links not supported
                try:
                    shutil.copyfile(source, target)
                except OSError as exc:  # the error names the cache file, but it is the output that failed
                    raise write_error(exc, out) from None
                os.chmod(target, 0o644)
            if progress:
                progress(target.stat().st_size)
    return out
