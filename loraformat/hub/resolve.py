"""Turn an adapter argument into a local path: plain paths pass through; hub references are pulled into the
cache first (``hf://org/name@rev`` for the Hugging Face Hub, ``lfhub://org/name@rev`` for the local hub)."""

from __future__ import annotations

HUB_SCHEMES = ("hf://", "lfhub://")


def is_hub_ref(arg: str) -> bool:
    return arg.startswith(HUB_SCHEMES)


def resolve_adapter_arg(arg: str) -> str:
    """A local path for ``arg``; hub references are pulled (cached) first."""
    if not is_hub_ref(arg):
        return arg
    raise NotImplementedError("hub references are implemented by the hub issue")
