"""Bounded downloads from a Hugging Face Hub-protocol server: each file is fetched with one streaming GET through
huggingface_hub's own HTTP session (its headers, token handling, redirects and error classes), and never more
than the commit's file list promised is read (spec/v1.md §16).

* an announced ``Content-Length`` other than the promised size is refused before the body is read;
* the body is read in 1 MiB pieces and reading stops, with an error, once it would exceed the promised size
  (a 200 MB answer for a 2 KB file costs at most 2 KB + one piece);
* a body that ends early (the server hung up) is a one-line network error (exit 5);
* a failed write (disk full, file size limit) surfaces as the OSError it is: the caller turns it into exit 2.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from loraformat.errors import HubNetworkError, VerificationError

CHUNK = 1 << 20
Progress = Callable[[int], None]


def fetch_file(
    url: str,
    headers: dict[str, str],
    target: Path,
    size: int,
    *,
    where: str,
    progress: Progress | None = None,
) -> None:
    """GET ``url`` into ``target``: exactly ``size`` bytes or an error (see the module docstring)."""
    import httpx2
    from huggingface_hub.utils import get_session, hf_raise_for_status

    name = target.name
    with get_session().stream(
        "GET", url, headers={**headers, "Accept-Encoding": "identity"}, follow_redirects=True
    ) as response:
        if response.status_code >= 400:
            response.read()
            hf_raise_for_status(response)
        announced = response.headers.get("Content-Length")
        if announced is not None and announced.strip() != str(size):
            raise VerificationError(
                f"{where}: the server announces {announced.strip()[:40]} bytes for {name}, the file list "
                f"promised {size}; refusing before reading it"
            )
        got = 0
        with open(target, "wb") as f:
            try:
                for piece in response.iter_bytes(CHUNK):
                    got += len(piece)
                    if got > size:
                        raise VerificationError(
                            f"{where}: the server sends more than the {size} bytes the file list promised for "
                            f"{name}; stopped reading"
                        )
                    f.write(piece)
                    if progress:
                        progress(len(piece))
            except httpx2.TransportError as exc:
                raise HubNetworkError(
                    f"{where}: the download of {name} broke off after {got} of {size} bytes "
                    f"({exc.__class__.__name__}); try again"
                ) from None
    if got < size:
        raise HubNetworkError(f"{where}: the download of {name} ended after {got} of {size} bytes; try again")
