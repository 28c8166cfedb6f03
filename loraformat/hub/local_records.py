"""The local hub's records as they are read back from disk, where anything may have been tampered with: revision
manifests (checked to hash to their id, names to stay inside a directory, object ids and sizes well formed) and
refs files (valid ref names, 64-hex commits), parsed into plain records. No writes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraformat.errors import UsageError, VerificationError
from loraformat.hub.refs import check_ref_name, safe_relpath
from loraformat.hub.untrusted import SHA256_HEX, check_commit, check_hex, check_size, shown

REVISION_FORMAT = "loraformat-hub-revision"


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass
class Revision:
    """A parsed, integrity-checked revision manifest."""

    commit: str
    repo: str
    files: dict[str, FileEntry]
    parents: list[str]
    message: str
    created: str
    raw: dict[str, Any] = field(repr=False, default_factory=dict)


@dataclass
class RepoListing:
    repo_id: str
    branches: dict[str, str]
    tags: dict[str, str]
    revisions: int
    private: bool = False

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def parse_revision(data: bytes, path: Path, commit: str, repo_id: str) -> Revision:
    """A revision manifest's bytes (already checked to hash to ``commit``) -> its record."""
    try:
        doc = json.loads(data)
        files = {
            safe_relpath(name, repo=repo_id): FileEntry(
                check_hex(e["sha256"], SHA256_HEX, what=f"object id of {name}", where=repo_id),
                check_size(e["size"], name, where=repo_id),
            )
            for name, e in doc["files"].items()
        }
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise VerificationError(
            f"malformed revision manifest ({exc.__class__.__name__})", path=path
        ) from None
    if doc.get("format") != REVISION_FORMAT:
        raise VerificationError("not a loraformat hub revision manifest", path=path)
    return Revision(
        commit,
        doc.get("repo", repo_id),
        files,
        list(doc.get("parents") or []),
        str(doc.get("message", "")),
        str(doc.get("created", "")),
        doc,
    )


def checked_refs(doc: Any, path: Path) -> dict[str, dict[str, str]]:
    """refs.json as {"branches": {name: commit}, "tags": {...}}, every name a valid ref name and every commit
    64 hex digits: a tampered refs file must not steer paths (VerificationError otherwise)."""
    if not isinstance(doc, dict):
        raise VerificationError("refs file is not a JSON object (corrupted or tampered hub)", path=path)
    out: dict[str, dict[str, str]] = {}
    for kind in ("branches", "tags"):
        refs = doc.get(kind) or {}
        if not isinstance(refs, dict):
            raise VerificationError(
                f"refs file: {kind} is not an object (corrupted or tampered hub)", path=path
            )
        for name, commit in refs.items():
            try:
                check_ref_name(name)
            except UsageError:
                what = "branch" if kind == "branches" else "tag"
                raise VerificationError(
                    f"refs file names {what} {shown(name)}, not a valid ref name (corrupted or tampered hub)",
                    path=path,
                ) from None
            check_commit(commit, "local", where=f"{path}: {shown(name)}")
        out[kind] = dict(refs)
    return out
