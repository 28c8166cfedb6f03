"""Turn an adapter argument into a local path: plain paths pass through; hub references are pulled into the
cache first (``hf://org/name@rev`` for the Hugging Face Hub, ``lfhub://org/name@rev`` or
``lfhub:///hub/path/org/name@rev`` for the local hub; syntax in refs.py and docs/hub.md)."""

from __future__ import annotations

from loraformat.hub.refs import is_hub_ref, parse_hub_ref

__all__ = ["is_hub_ref", "resolve_adapter_arg"]


def resolve_adapter_arg(arg: str) -> str:
    """A local path for ``arg``: the verified cache directory of a hub reference (fetched once, then reused),
    or ``arg`` itself."""
    if not is_hub_ref(arg):
        return arg
    from loraformat.hub.cache import fetch, open_backend

    ref = parse_hub_ref(arg)
    return str(fetch(open_backend(ref.hub), ref.repo_id, ref.revision).path)
