"""Publishing and fetching adapters: the Hugging Face Hub (through huggingface_hub) and the embedded local hub.

``push``, ``pull`` and ``list_repos`` are the public API (``loraformat.push`` / ``loraformat.pull``); hub
selection and reference syntax are in refs.py, the local hub in local.py, the Hugging Face Hub in hf.py.
Importing this package imports neither torch nor huggingface_hub.
"""

from __future__ import annotations

from loraformat.hub.api import PullResult, PushResult, list_repos, pull, push
from loraformat.hub.local import RepoListing
from loraformat.hub.refs import HubRef, HubSpec, is_hub_ref, parse_hub_ref, select_hub

__all__ = [
    "push",
    "pull",
    "list_repos",
    "PushResult",
    "PullResult",
    "RepoListing",
    "HubSpec",
    "HubRef",
    "select_hub",
    "parse_hub_ref",
    "is_hub_ref",
]
