"""The Hugging Face Hub through the real huggingface_hub client: one commit per push, snapshot_download for pulls,
and every client error mapped to HubNotFoundError (3), HubAuthError (4) or HubNetworkError (5) with a one-line
message that never contains the token.

Uploads use the plain LFS protocol when HF_HUB_DISABLE_XET=1 (huggingface_hub >= 1.20 otherwise uploads through
Xet and has no LFS fallback); downloads use plain GETs unless the server advertises Xet.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from loraformat.errors import (
    HubAuthError,
    HubError,
    HubNetworkError,
    HubNotFoundError,
    LoraformatError,
    UsageError,
    VerificationError,
)
from loraformat.hub.backend import Progress, Published
from loraformat.hub.refs import DEFAULT_BRANCH, check_ref_name, check_repo_id, safe_relpath
from loraformat.hub.untrusted import GIT_OID, SHA256_HEX, check_commit, check_hex, check_size

if TYPE_CHECKING:
    from huggingface_hub.hf_api import RepoFile


@dataclass(frozen=True)
class RemoteFile:
    """A file of a Hub revision: its size and what it can be checked against (sha256 for LFS files, the git
    blob sha1 for regular ones)."""

    size: int
    sha256: str | None = None
    git_oid: str | None = None


def set_progress_bars(enabled: bool) -> None:
    """huggingface_hub draws its own tqdm bars; the CLI turns them off under --quiet or off a terminal."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    (enable_progress_bars if enabled else disable_progress_bars)()


def quiet_logging() -> None:
    """Keep huggingface_hub's info/warning chatter off stderr (the CLI reports outcomes itself)."""
    from huggingface_hub.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def _remote_file(f: RepoFile, where: str) -> RemoteFile:
    """A tree entry, its size and hashes checked against their formats (they come from the server)."""
    size = check_size(f.size, f.path, where=where)
    if f.lfs:
        sha = check_hex(f.lfs.sha256, SHA256_HEX, what=f"LFS sha256 of {f.path}", where=where)
        return RemoteFile(size, sha)
    return RemoteFile(size, None, check_hex(f.blob_id, GIT_OID, what=f"git blob id of {f.path}", where=where))


class HfHub:
    kind = "hf"

    def __init__(self, endpoint: str | None = None, token: str | None = None) -> None:
        from huggingface_hub import HfApi, constants

        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.token = token
        self.api = HfApi(endpoint=self.endpoint, token=token)

    # -- identity ------------------------------------------------------------------------------------------------
    def describe(self) -> str:
        return f"Hugging Face Hub ({self.endpoint})"

    def cache_key(self) -> str:
        """A directory name for this endpoint in the loraformat cache (host, and port when there is one)."""
        parts = urlsplit(self.endpoint)
        host = (parts.hostname or "hub") + (f"_{parts.port}" if parts.port else "")
        return "hf-" + "".join(c if c.isalnum() or c in "._-" else "_" for c in host)

    def url(self, repo_id: str) -> str:
        return f"{self.endpoint}/{repo_id}"

    # -- reading -------------------------------------------------------------------------------------------------
    def resolve(self, repo_id: str, revision: str | None = None) -> str:
        """The commit sha of a branch, tag or commit (one request)."""
        rev = revision or DEFAULT_BRANCH
        with self.errors(repo_id, rev):
            info = self.api.repo_info(check_repo_id(repo_id), revision=rev)
        if not info.sha:
            raise HubNotFoundError(f"{repo_id}: the hub reported no commit for revision {rev!r}")
        return check_commit(info.sha, "hf", where=f"{repo_id}@{rev}")

    def files(self, repo_id: str, commit: str) -> dict[str, RemoteFile]:
        """Every file of the revision; a name that would escape a directory fails the whole listing."""
        from huggingface_hub.hf_api import RepoFile

        out = {}
        with self.errors(repo_id, commit):
            for f in self.api.list_repo_tree(repo_id, revision=commit, recursive=True):
                if isinstance(f, RepoFile):
                    out[safe_relpath(f.path, repo=repo_id)] = _remote_file(f, f"{repo_id}@{commit[:12]}")
        return out

    def download(
        self,
        repo_id: str,
        commit: str,
        names: list[str],
        dest: Path,
        progress: Progress | None = None,
        sizes: Mapping[str, int] | None = None,
    ) -> None:
        """Each of ``names`` at ``commit`` into dest (a fresh staging directory), reading no more than ``sizes``
        (what the file list promised, already checked against the caps) allows: transfer.py."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        from loraformat.hub.transfer import fetch_file

        where = f"{repo_id}@{commit[:12]}"
        with self.errors(repo_id, commit):
            headers = build_hf_headers(token=self.token)
            for name in names:
                url = hf_hub_url(repo_id, name, revision=commit, endpoint=self.endpoint)
                size = (sizes or {}).get(name)
                if size is None:
                    raise VerificationError(f"{where}: {name} is not in the file list; refusing")
                fetch_file(
                    url,
                    headers,
                    dest / safe_relpath(name, repo=repo_id),
                    size,
                    where=where,
                    progress=progress,
                )

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
        """One commit holding every file of ``sources`` on ``branch`` (created from main when missing), then
        ``tag`` on that exact commit. ``progress`` receives each file's size once the commit holds it
        (huggingface_hub has no per-byte callback for commits)."""
        from huggingface_hub import CommitOperationAdd, get_token

        check_repo_id(repo_id)
        branch = check_ref_name(branch or DEFAULT_BRANCH, "branch")
        if tag is not None:
            check_ref_name(tag, "tag")
        if self.token is None and not get_token():
            raise HubAuthError(
                "no Hugging Face token: set HF_TOKEN or run `hf auth login` (pushing needs write access)"
            )
        with self.errors(repo_id, branch):
            self.api.create_repo(repo_id, private=True if private else None, exist_ok=True)
            refs = self.api.list_repo_refs(repo_id)
            tags = {t.name: t.target_commit for t in refs.tags}
            branches = {b.name: b.target_commit for b in refs.branches}
            if tag is not None and tag in tags:
                raise UsageError(
                    f"tag {tag!r} already exists in {repo_id} (at {tags[tag][:12]}); tags are "
                    "immutable: choose another name"
                )
            if branch not in branches and branch != DEFAULT_BRANCH:
                self.api.create_branch(repo_id, branch=branch, exist_ok=True)
            operations = [
                CommitOperationAdd(
                    path_in_repo=name, path_or_fileobj=src if isinstance(src, bytes) else os.fspath(src)
                )
                for name, src in sorted(sources.items())
            ]
            info = self.api.create_commit(
                repo_id, operations, commit_message=message, commit_description=description, revision=branch
            )
            commit = str(info.oid)
            if tag is not None:
                self.api.create_tag(repo_id, tag=tag, revision=commit, tag_message=message or None)
        if progress is not None:
            for src in sources.values():
                progress(len(src) if isinstance(src, bytes) else os.path.getsize(src))
        return Published(commit, commit != branches.get(branch), str(info.commit_url))

    # -- errors --------------------------------------------------------------------------------------------------
    def _secrets(self) -> list[str]:
        secrets = [self.token] if self.token else []
        with contextlib.suppress(Exception):
            from huggingface_hub import get_token

            stored = get_token()
            if stored:
                secrets.append(stored)
        return secrets

    @contextlib.contextmanager
    def errors(self, repo_id: str, revision: str | None = None) -> Iterator[None]:
        """Translate huggingface_hub and transport errors into loraformat's hub errors (see map_error); what
        huggingface_hub warns or logs meanwhile is kept off stderr and folded into the one error line."""
        from huggingface_hub import constants

        if constants.is_offline_mode():
            raise HubNetworkError(f"offline mode is on (HF_HUB_OFFLINE=1): cannot reach {self.endpoint}")
        with captured_warnings() as notes:
            try:
                yield
            except LoraformatError as err:
                raise scrub(fold(err, notes), self._secrets()) from None
            except Exception as exc:
                mapped = map_error(exc, repo_id=repo_id, revision=revision, endpoint=self.endpoint)
                if mapped is None and isinstance(exc, _MALFORMED):
                    mapped = VerificationError(
                        f"{self.endpoint} sent a malformed answer for {repo_id} "
                        f"({exc.__class__.__name__}); refusing"
                    )
                if mapped is None:
                    raise
                raise scrub(fold(mapped, notes), self._secrets()) from None


@contextlib.contextmanager
def captured_warnings() -> Iterator[Callable[[], list[str]]]:
    """Collect huggingface_hub's warnings (warnings.warn and its logger) instead of printing them; yields a
    function returning what was collected so far."""
    import logging
    import warnings

    notes: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notes.append(record.getMessage())

    logger = logging.getLogger("huggingface_hub")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    logger.handlers, logger.propagate = [_Keep(logging.WARNING)], False
    logger.setLevel(min(logger.level or logging.WARNING, logging.WARNING))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield lambda: notes + [str(w.message) for w in caught]
    finally:
        logger.handlers, logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])


def fold(err: LoraformatError, collected: Callable[[], list[str]]) -> LoraformatError:
    """Append the first library warning, on the same line, to an error message."""
    notes = collected()
    if notes:
        note = " ".join(notes[0].split())[:200]
        err.message = f"{err.message} (huggingface_hub warned: {note})"
        err.args = (err.message,)
    return err


#: What parsing a hostile server's JSON can raise inside huggingface_hub (missing keys, wrong types).
_MALFORMED = (KeyError, TypeError, ValueError, AttributeError, IndexError)


def scrub(err: LoraformatError, secrets: list[str]) -> LoraformatError:
    """Remove any token from an error message (a hostile server could echo it back)."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            err.message = err.message.replace(secret, "***")
            err.args = (err.message,)
    return err


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _server_says(exc: BaseException) -> str:
    """The server's own one-line reason (X-Error-Message), if it gave one."""
    response = getattr(exc, "response", None)
    text = ""
    with contextlib.suppress(Exception):
        text = response.headers.get("X-Error-Message") or ""  # type: ignore[union-attr]
    text = " ".join(str(text).split())
    return f": {text[:200]}" if text else ""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def map_error(
    exc: BaseException, *, repo_id: str, revision: str | None, endpoint: str
) -> LoraformatError | None:
    """The loraformat error for a huggingface_hub / httpx2 exception; None for something unexpected."""
    import httpx2
    from huggingface_hub import errors as hf

    rev = f"@{revision}" if revision else ""
    for e in _chain(exc):
        if isinstance(e, hf.OfflineModeIsEnabled):
            return HubNetworkError(f"offline mode is on (HF_HUB_OFFLINE=1): cannot reach {endpoint}")
        if isinstance(e, hf.GatedRepoError):
            return HubAuthError(
                f"{repo_id}: gated repository: request access on the Hub, then use a token that "
                "has it (HF_TOKEN or `hf auth login`)"
            )
        if isinstance(e, hf.RepositoryNotFoundError):
            return HubNotFoundError(
                f"{repo_id}: repository not found on {endpoint} (if it is private, check your "
                "token: HF_TOKEN or `hf auth login`)"
            )
        if isinstance(e, hf.RevisionNotFoundError):
            return HubNotFoundError(
                f"{repo_id}: revision {revision!r} not found (no such branch, tag or commit)"
            )
        if isinstance(e, hf.RemoteEntryNotFoundError):
            return HubNotFoundError(f"{repo_id}{rev}: file not found{_server_says(e)}")
        if isinstance(e, hf.HfHubHTTPError) and _status(e) is not None:
            status = int(_status(e))  # type: ignore[arg-type]
            if status in (401, 403):
                return HubAuthError(
                    f"{repo_id}: access refused (HTTP {status}): the token is missing, invalid, or "
                    f"lacks permission for this repository{_server_says(e)}"
                )
            if status == 404:
                return HubNotFoundError(f"{repo_id}{rev}: not found (HTTP 404){_server_says(e)}")
            if status in (408, 429) or status >= 500:
                return HubNetworkError(f"{endpoint} answered HTTP {status}{_server_says(e)}; try again later")
            if status == 409:
                return UsageError(f"{repo_id}: conflict (HTTP 409){_server_says(e)}")
            return HubError(f"{repo_id}: the hub refused the request (HTTP {status}){_server_says(e)}")
        if isinstance(e, (httpx2.TransportError, ConnectionError, TimeoutError)):
            return HubNetworkError(
                f"cannot reach {endpoint} ({e.__class__.__name__}); check the network, "
                "HF_ENDPOINT and proxies"
            )
        if isinstance(e, hf.HFValidationError):
            return UsageError(f"{repo_id}: {' '.join(str(e).split())[:200]}")
        if isinstance(e, hf.LocalEntryNotFoundError):
            continue  # look at the cause (offline, unreachable, 403 ...); without one it is a network problem
    if isinstance(exc, hf.LocalEntryNotFoundError):
        return HubNetworkError(f"cannot reach {endpoint} and {repo_id}{rev} is not cached")
    if isinstance(exc, ValueError) and "Invalid metadata in README.md" in str(exc):
        return HubError(
            f"{repo_id}: the hub rejected the model card metadata: {' '.join(str(exc).split())[:200]}"
        )
    return None
