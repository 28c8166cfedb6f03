"""What every hub backend provides (local.py ``LocalHub``, hf.py ``HfHub``), so that push, pull and the cache
treat them alike: the same publish result, the same progress callback, honoured by both."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

Progress = Callable[[int], None]  # bytes moved since the last call


@dataclass(frozen=True)
class Published:
    """The revision a publish left the branch at."""

    commit: str
    created: bool  # False: the branch head already held exactly these files, nothing new was committed
    url: str  # where the revision can be seen or fetched


class HubBackend(Protocol):
    kind: str

    def describe(self) -> str: ...

    def resolve(self, repo_id: str, revision: str | None = None) -> str: ...

    def files(self, repo_id: str, commit: str) -> Mapping[str, Any]: ...

    def download(
        self, repo_id: str, commit: str, names: list[str], dest: Path, progress: Progress | None = None
    ) -> None: ...

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
    ) -> Published: ...


if TYPE_CHECKING:  # the type checker proves that both backends provide the protocol

    def _conforming(local: LocalHub, hf: HfHub) -> list[HubBackend]:
        return [local, hf]

    from loraformat.hub.hf import HfHub
    from loraformat.hub.local import LocalHub
