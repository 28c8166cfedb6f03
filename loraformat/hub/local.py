"""The embedded local hub: a directory registry of ``org/name`` repositories for a shared filesystem or a machine
with no network.

Layout (docs/hub.md)::

    HUB/loraformat-hub.json              marker: {"format": "loraformat-hub", "version": 1}
    HUB/lock                             flock(2) target serialising publishers
    HUB/objects/<aa>/<sha256>            file contents, immutable, named by their sha256
    HUB/repos/<org>/<name>/repo.json     {"id", "created", "private"}
    HUB/repos/<org>/<name>/refs.json     {"branches": {name: commit}, "tags": {name: commit}}
    HUB/repos/<org>/<name>/revisions/<commit>.json   immutable revision manifests
    HUB/tmp/                             staging (same filesystem, so every publish step is a rename)

A commit id is the sha256 of its manifest's bytes, and the manifest names every file by sha256 and size, so a
revision is content-addressed all the way down. Publishing writes objects, then the manifest, then replaces
refs.json, each by an atomic rename and the last two under an exclusive lock: a reader never sees a ref to an
incomplete revision, and concurrent publishers from any number of processes serialise on the lock without
losing an update. Readers take no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

from loraformat import __version__
from loraformat.errors import HubNotFoundError, UsageError, VerificationError
from loraformat.hub.backend import Progress, Published
from loraformat.hub.local_records import (
    REVISION_FORMAT,
    FileEntry,
    RepoListing,
    Revision,
    canonical_json,
    checked_refs,
    parse_revision,
)
from loraformat.hub.refs import (
    DEFAULT_BRANCH,
    LOCAL_COMMIT,
    check_ref_name,
    check_repo_id,
    safe_relpath,
)
from loraformat.hub.untrusted import SHA256_HEX, check_commit, check_hex
from loraformat.io.atomic import atomic_file, fsync_dir, write_error
from loraformat.metadata import now_iso

MARKER = "loraformat-hub.json"
HUB_FORMAT, HUB_VERSION = "loraformat-hub", 1
CHUNK = 1 << 22


def copy_hashing(
    src: str | os.PathLike[str], dst: Path, progress: Progress | None = None, *, sync: bool = True
) -> FileEntry:
    """Copy src to dst and return its sha256 and size from the same single read; ``sync`` fsyncs dst (callers
    that fsync a whole staging tree later pass False)."""
    digest, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(CHUNK):
            digest.update(chunk)
            fout.write(chunk)
            size += len(chunk)
            if progress:
                progress(len(chunk))
        if sync:
            fout.flush()
            os.fsync(fout.fileno())
    return FileEntry(digest.hexdigest(), size)


class LocalHub:
    """One hub directory. ``LocalHub(path)`` opens an existing hub; ``create=True`` initialises a missing or
    empty directory (push does that; pull and list never do)."""

    kind = "local"

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False) -> None:
        self.root = Path(path)
        marker = self.root / MARKER
        if not marker.exists():
            if not create:
                raise HubNotFoundError(
                    "no loraformat hub here (push to it first, or check --hub)", path=self.root
                )
            self._initialise()
        else:
            self._check_marker(marker)

    def describe(self) -> str:
        return f"local hub {self.root}"

    # -- layout --------------------------------------------------------------------------------------------------
    def _initialise(self) -> None:
        root = self.root
        if root.exists() and (not root.is_dir() or any(p.name != MARKER for p in root.iterdir())):
            raise UsageError(
                "exists and is not a loraformat hub (expected an empty or new directory)", path=root
            )
        try:
            root.mkdir(parents=True, exist_ok=True)
            for sub in ("objects", "repos", "tmp"):
                (root / sub).mkdir(exist_ok=True)
            (root / "lock").touch(exist_ok=True)
            with atomic_file(root / MARKER, overwrite=True) as f:
                f.write(canonical_json({"format": HUB_FORMAT, "version": HUB_VERSION}) + b"\n")
        except OSError as exc:
            raise write_error(exc, root) from None

    def _check_marker(self, marker: Path) -> None:
        try:
            doc = json.loads(marker.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"unreadable hub marker ({exc.__class__.__name__})", path=marker) from None
        if not isinstance(doc, dict) or doc.get("format") != HUB_FORMAT:
            raise UsageError("is not a loraformat hub marker", path=marker)
        if not isinstance(doc.get("version"), int) or doc["version"] > HUB_VERSION:
            raise UsageError(
                f"hub format version {doc.get('version')!r} is newer than this loraformat "
                f"understands ({HUB_VERSION})",
                path=marker,
            )

    def repo_dir(self, repo_id: str) -> Path:
        org, name = check_repo_id(repo_id).split("/")
        return self.root / "repos" / org / name

    def object_path(self, sha256: str) -> Path:
        check_hex(sha256, SHA256_HEX, what="object id", where=str(self.root))
        return self.root / "objects" / sha256[:2] / sha256

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive flock on HUB/lock: held while a publisher reads and replaces refs."""
        with open(self.root / "lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # -- reading -------------------------------------------------------------------------------------------------
    def _existing_repo(self, repo_id: str) -> Path:
        d = self.repo_dir(repo_id)
        if not (d / "repo.json").exists():
            raise HubNotFoundError(f"repository {repo_id} not found in {self.root}")
        return d

    def refs(self, repo_id: str) -> dict[str, dict[str, str]]:
        d = self._existing_repo(repo_id)
        try:
            doc = json.loads((d / "refs.json").read_text("utf-8"))
        except FileNotFoundError:
            return {"branches": {}, "tags": {}}
        except (OSError, ValueError, RecursionError) as exc:
            raise VerificationError(
                f"unreadable refs ({exc.__class__.__name__})", path=d / "refs.json"
            ) from None
        return checked_refs(doc, d / "refs.json")

    def resolve(self, repo_id: str, revision: str | None = None) -> str:
        """Commit id of a branch, a tag, a full commit id or a unique commit prefix (7+ hex digits)."""
        rev = revision or DEFAULT_BRANCH
        refs = self.refs(repo_id)
        for kind in ("branches", "tags"):
            if rev in refs[kind]:
                return refs[kind][rev]
        revisions = self._existing_repo(repo_id) / "revisions"
        if LOCAL_COMMIT.match(rev) and (revisions / f"{rev}.json").exists():
            return rev
        if 7 <= len(rev) < 64 and all(c in "0123456789abcdef" for c in rev):
            hits = [p.stem for p in revisions.glob(f"{rev}*.json")]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise UsageError(f"commit prefix {rev!r} is ambiguous in {repo_id} ({len(hits)} revisions)")
        if revision is None and not refs["branches"]:
            raise HubNotFoundError(f"repository {repo_id} has no revisions yet")
        raise HubNotFoundError(f"revision {rev!r} not found in {repo_id} (no such branch, tag or commit)")

    def revision(self, repo_id: str, commit: str) -> Revision:
        """The manifest of ``commit``, checked: its bytes hash to its id, its file names stay inside a directory,
        its object ids are sha256 hex digests and its sizes byte counts."""
        check_commit(commit, "local", where=repo_id)
        path = self._existing_repo(repo_id) / "revisions" / f"{commit}.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise HubNotFoundError(f"revision {commit} not found in {repo_id}") from None
        if hashlib.sha256(data).hexdigest() != commit:
            raise VerificationError(
                "revision manifest does not hash to its commit id (corrupted hub)", path=path
            )
        return parse_revision(data, path, commit, repo_id)

    def files(self, repo_id: str, commit: str) -> dict[str, FileEntry]:
        return self.revision(repo_id, commit).files

    def download(
        self,
        repo_id: str,
        commit: str,
        names: list[str],
        dest: Path,
        progress: Progress | None = None,
        sizes: Mapping[str, int] | None = None,
    ) -> None:
        """Copy the objects of ``names`` into dest, checking each sha256 and size against the manifest (dest is
        a staging directory its caller verifies and fsyncs)."""
        files = self.files(repo_id, commit)
        for name in names:
            entry = files[name]
            src = self.object_path(entry.sha256)
            if not src.exists():
                raise VerificationError(
                    f"{repo_id}@{commit[:12]}: object of {name} is missing (corrupted hub)", path=src
                )
            target = dest / safe_relpath(name, repo=repo_id)
            target.parent.mkdir(parents=True, exist_ok=True)
            got = copy_hashing(src, target, progress, sync=False)
            if got != entry:
                raise VerificationError(
                    f"{name}: sha256 {got.sha256[:16]}… / {got.size} bytes differ from the "
                    f"manifest ({entry.sha256[:16]}… / {entry.size} bytes)",
                    path=src,
                )

    def list_repos(self) -> list[RepoListing]:
        out = []
        repos = self.root / "repos"
        for repo_json in sorted(repos.glob("*/*/repo.json")):
            repo_id = f"{repo_json.parent.parent.name}/{repo_json.parent.name}"
            try:
                info = json.loads(repo_json.read_text("utf-8"))
            except (OSError, ValueError):
                info = {}
            refs = self.refs(repo_id)
            count = sum(1 for _ in (repo_json.parent / "revisions").glob("*.json"))
            out.append(RepoListing(repo_id, refs["branches"], refs["tags"], count, bool(info.get("private"))))
        return out

    # -- publishing ----------------------------------------------------------------------------------------------
    def publish(
        self,
        repo_id: str,
        sources: Mapping[str, str | os.PathLike[str] | bytes],
        *,
        branch: str | None = None,
        tag: str | None = None,
        message: str = "",
        description: str = "",
        private: bool = False,
        progress: Progress | None = None,
    ) -> Published:
        """Publish ``sources`` ({file name: path or bytes}) as a new revision on ``branch``. Nothing is published when the branch head already holds exactly these files (as the Hugging
        Face Hub skips an empty commit): the branch (and tag) then point at the existing head."""
        check_repo_id(repo_id)
        branch = check_ref_name(branch or DEFAULT_BRANCH, "branch")
        if tag is not None:
            check_ref_name(tag, "tag")
        stage = self.root / "tmp" / f"push-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            stage.mkdir(parents=True)
            entries = self._stage(sources, stage, progress)
            for entry, staged in entries.values():
                self._store_object(entry, staged)
            with self.lock():
                commit, created = self._commit(
                    repo_id,
                    {n: e for n, (e, _) in entries.items()},
                    branch=branch,
                    tag=tag,
                    message=message,
                    description=description,
                    private=private,
                )
            return Published(commit, created, f"lfhub://{self.root}/{repo_id}@{commit}")
        except OSError as exc:
            raise write_error(exc, self.root) from None
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def _stage(
        self, sources: Mapping[str, str | os.PathLike[str] | bytes], stage: Path, progress: Progress | None
    ) -> dict[str, tuple[FileEntry, Path]]:
        entries = {}
        for i, (name, src) in enumerate(sorted(sources.items())):
            safe_relpath(name)
            staged = stage / f"{i}"
            if isinstance(src, bytes):
                with open(staged, "wb") as f:
                    f.write(src)
                    f.flush()
                    os.fsync(f.fileno())
                entry = FileEntry(hashlib.sha256(src).hexdigest(), len(src))
            else:
                entry = copy_hashing(src, staged, progress)
            entries[name] = (entry, staged)
        return entries

    def _store_object(self, entry: FileEntry, staged: Path) -> None:
        final = self.object_path(entry.sha256)
        if final.exists():
            return  # content-addressed: the same bytes are already there
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(staged, 0o444)
        os.replace(staged, final)
        fsync_dir(final.parent)

    def _commit(
        self,
        repo_id: str,
        files: dict[str, FileEntry],
        *,
        branch: str,
        tag: str | None,
        message: str,
        description: str,
        private: bool,
    ) -> tuple[str, bool]:
        d = self.repo_dir(repo_id)
        if not (d / "repo.json").exists():
            (d / "revisions").mkdir(parents=True, exist_ok=True)
            with atomic_file(d / "repo.json", overwrite=True) as f:
                f.write(canonical_json({"id": repo_id, "created": now_iso(), "private": private}) + b"\n")
        refs = self.refs(repo_id)
        if tag is not None and tag in refs["tags"]:
            raise UsageError(
                f"tag {tag!r} already exists in {repo_id} (at {refs['tags'][tag][:12]}); "
                "tags are immutable: choose another name"
            )
        head = refs["branches"].get(branch) or refs["branches"].get(DEFAULT_BRANCH)
        if head is not None and self.revision(repo_id, head).files == files:
            commit, created = head, False
        else:
            manifest = {
                "format": REVISION_FORMAT,
                "version": HUB_VERSION,
                "repo": repo_id,
                "parents": [head] if head else [],
                "message": message,
                "description": description,
                "created": now_iso(),
                "created_by": {"tool": "loraformat", "version": __version__},
                "files": {n: {"sha256": e.sha256, "size": e.size} for n, e in sorted(files.items())},
            }
            data = canonical_json(manifest)
            commit, created = hashlib.sha256(data).hexdigest(), True
            path = d / "revisions" / f"{commit}.json"
            if not path.exists():
                with atomic_file(path, overwrite=True) as f:
                    f.write(data)
                os.chmod(path, 0o444)
        refs["branches"][branch] = commit
        if tag is not None:
            refs["tags"][tag] = commit
        with atomic_file(d / "refs.json", overwrite=True) as f:
            f.write(json.dumps(refs, indent=1, sort_keys=True).encode() + b"\n")
        return commit, created


def check_consistency(root: str | os.PathLike[str]) -> list[str]:
    """Every problem in a hub: refs to missing revisions, manifests not hashing to their id, missing or corrupt
    objects. Used by the tests and handy after a crash; an empty list means consistent."""
    hub = LocalHub(root)
    problems: list[str] = []
    for listing in hub.list_repos():
        for kind, refs in (("branch", listing.branches), ("tag", listing.tags)):
            for name, commit in refs.items():
                try:
                    hub.revision(listing.repo_id, commit)
                except (HubNotFoundError, VerificationError) as exc:
                    problems.append(f"{listing.repo_id} {kind} {name}: {exc}")
        for manifest in (hub.repo_dir(listing.repo_id) / "revisions").glob("*.json"):
            try:
                rev = hub.revision(listing.repo_id, manifest.stem)
            except (HubNotFoundError, VerificationError) as exc:
                problems.append(str(exc))
                continue
            for name, entry in rev.files.items():
                obj = hub.object_path(entry.sha256)
                if not obj.exists() or obj.stat().st_size != entry.size:
                    problems.append(
                        f"{listing.repo_id}@{rev.commit[:12]}: object of {name} missing or truncated"
                    )
                elif hashlib.sha256(obj.read_bytes()).hexdigest() != entry.sha256:
                    problems.append(f"{listing.repo_id}@{rev.commit[:12]}: object of {name} is corrupt")
    return problems
