"""Which hub, which repository, which revision: parsing hub selections and hub references.

No network and no heavy imports here, so that the CLI and ``resolve_adapter_arg`` can decide cheaply whether
huggingface_hub is needed at all.

Hub selection (``--hub``, the ``hub=`` argument), first match wins:

* ``hf``, ``huggingface``, ``hf://`` -> the Hugging Face Hub at HF_ENDPOINT (default https://huggingface.co);
* ``http://HOST...`` / ``https://HOST...`` -> a Hub-protocol server at that endpoint (a mirror, a test server);
* ``file://PATH`` or any other string -> the embedded local hub in directory PATH;
* nothing given -> $LORAFORMAT_HUB if set (same forms), else the Hugging Face Hub.

Hub references (adapter arguments of validate, inspect, merge):

* ``hf://org/name[@rev]`` -> the Hugging Face Hub (HF_ENDPOINT);
* ``lfhub://org/name[@rev]`` -> the local hub named by $LORAFORMAT_HUB;
* ``lfhub:///abs/hub/org/name[@rev]`` or ``lfhub://./rel/hub/org/name[@rev]`` -> the local hub at that path
  (the last two path segments are the repository).

``rev`` is a branch, a tag or a commit id; it defaults to ``main``.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from loraformat.constants import PEFT_CONFIG, PEFT_WEIGHTS, HubKind
from loraformat.errors import UsageError, VerificationError

ENV_HUB = "LORAFORMAT_HUB"
ENV_CACHE = "LORAFORMAT_CACHE"
DEFAULT_BRANCH = "main"
HF_SCHEME, LOCAL_SCHEME, FILE_SCHEME = "hf://", "lfhub://", "file://"
HF_NAMES = {HubKind.HF, "huggingface", "hf://", "huggingface.co"}

#: The files an adapter repository holds: PEFT and vLLM load the first two straight from the repo.
WEIGHTS_FILE = PEFT_WEIGHTS
CONFIG_FILE = PEFT_CONFIG
CARD_FILE = "README.md"
ADAPTER_FILES = (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE)

_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?$")
_REF = re.compile(r"^[A-Za-z0-9._/-]{1,200}$")
HF_COMMIT = re.compile(r"^[0-9a-f]{40}$")
LOCAL_COMMIT = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class HubSpec:
    """A selected hub: ``kind`` "local" (``path``) or "hf" (``endpoint``; None = HF_ENDPOINT)."""

    kind: str
    path: Path | None = None
    endpoint: str | None = None

    def describe(self) -> str:
        if self.kind == "local":
            return f"local hub {self.path}"
        return f"Hugging Face Hub ({self.endpoint})" if self.endpoint else "Hugging Face Hub"


@dataclass(frozen=True)
class HubRef:
    """A parsed hub reference: where, which repository, which revision (None = the default branch)."""

    hub: HubSpec
    repo_id: str
    revision: str | None


def select_hub(hub: str | os.PathLike[str] | HubSpec | None = None) -> HubSpec:
    """The hub a command talks to: the ``hub`` argument, else $LORAFORMAT_HUB, else the Hugging Face Hub."""
    if isinstance(hub, HubSpec):
        return hub
    if hub is None or (isinstance(hub, str) and not hub.strip()):
        env = os.environ.get(ENV_HUB, "").strip()
        if not env:
            return HubSpec("hf")
        hub = env
    text = os.fspath(hub)
    if text.lower() in HF_NAMES:
        return HubSpec("hf")
    if text.startswith(("http://", "https://")):
        return HubSpec("hf", endpoint=text.rstrip("/"))
    if text.startswith(FILE_SCHEME):
        text = text[len(FILE_SCHEME) :]
        if not text:
            raise UsageError("file:// needs a path, e.g. file:///srv/lora-hub")
    return HubSpec("local", path=Path(text).expanduser().absolute())


def check_repo_id(repo_id: str) -> str:
    """``org/name``: two segments of letters, digits, '.', '_' and '-' (as the Hugging Face Hub allows)."""
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    if len(parts) != 2 or not all(_NAME.match(p) for p in parts) or ".." in repo_id or "--" in repo_id:
        raise UsageError(f"repository id {repo_id!r} must be ORG/NAME (letters, digits, '.', '_', '-')")
    return repo_id


def check_ref_name(name: str, what: str = "revision") -> str:
    """Branch and tag names: no '..', no empty or dot-leading segments, nothing that escapes a directory."""
    segments = name.split("/") if isinstance(name, str) else [""]
    if (
        not _REF.match(name or "")
        or any(not s or s.startswith(".") for s in segments)
        or name.endswith(".lock")
    ):
        raise UsageError(f"{what} {name!r} is not a valid branch or tag name")
    return name


def is_hub_ref(arg: str) -> bool:
    return isinstance(arg, str) and arg.startswith((HF_SCHEME, LOCAL_SCHEME))


def parse_hub_ref(arg: str) -> HubRef:
    """Parse ``hf://org/name@rev`` or ``lfhub://[HUBPATH/]org/name@rev`` (see the module docstring)."""
    if arg.startswith(HF_SCHEME):
        body, hub = arg[len(HF_SCHEME) :], HubSpec("hf")
    elif arg.startswith(LOCAL_SCHEME):
        body, hub = arg[len(LOCAL_SCHEME) :], None
    else:
        raise UsageError(f"{arg!r} is not a hub reference (hf://ORG/NAME[@REV] or lfhub://ORG/NAME[@REV])")
    path_part, at, revision = body.partition("@")
    if at and not revision:
        raise UsageError(f"{arg!r}: empty revision after '@'")
    path_part = path_part.rstrip("/")
    if hub is None:
        explicit = path_part.startswith(("/", "./", "../", "~"))
        if explicit:
            hub_path, _, repo = path_part.rpartition("/")
            hub_path, _, org = hub_path.rpartition("/")
            if not hub_path:
                raise UsageError(f"{arg!r}: expected lfhub://HUBPATH/ORG/NAME[@REV]")
            hub, path_part = select_hub(hub_path), f"{org}/{repo}"
            if hub.kind != "local":
                raise UsageError(f"{arg!r}: lfhub:// names a local hub directory")
        else:
            if not os.environ.get(ENV_HUB, "").strip():
                raise UsageError(
                    f"{arg!r}: lfhub://ORG/NAME needs {ENV_HUB} (or write lfhub:///HUB/PATH/ORG/NAME)"
                )
            hub = select_hub(os.environ[ENV_HUB])
    check_repo_id(path_part)
    if revision:
        check_ref_name(revision)
    return HubRef(hub, path_part, revision or None)


def safe_relpath(name: str, *, repo: str = "") -> str:
    """A remote file name that stays inside the output directory, or VerificationError: no absolute paths, no
    '..' segments, no backslashes or NUL bytes (a hostile hub must not write outside DIR)."""
    where = f"{repo}: " if repo else ""
    bad = (
        not isinstance(name, str)
        or not name
        or "\\" in name
        or "\x00" in name
        or name.startswith("/")
        or re.match(r"^[A-Za-z]:", name) is not None
    )
    if not bad:
        parts = name.split("/")
        bad = any(p in ("", ".", "..") for p in parts) or posixpath.normpath(name) != name
    if bad:
        raise VerificationError(
            f"{where}remote file name {name!r} would escape the output directory; refusing"
        )
    return name


def cache_root() -> Path:
    """$LORAFORMAT_CACHE, else $XDG_CACHE_HOME/loraformat, else ~/.cache/loraformat (as hashing.py)."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loraformat"
