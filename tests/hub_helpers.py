"""Shared helpers for the hub tests: environment for the real huggingface_hub client against tests/hub_server.py,
adapters to publish, and running the CLI as a real process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

GOOD_TOKEN = "hf_goodTokenForTests0123456789"
READ_TOKEN = "hf_readOnlyTokenForTests98765"
BAD_TOKEN = "hf_badTokenNeverValid55555555"
TOKENS = {GOOD_TOKEN: ("acme", True), READ_TOKEN: ("reader", False)}
BASE_ID = "acme/tiny-llama"


def hf_env(
    monkeypatch: pytest.MonkeyPatch, endpoint: str | None = None, token: str | None = GOOD_TOKEN
) -> None:
    """What the tests set for huggingface_hub in this process: no Xet (plain LFS uploads: the test server
    speaks LFS only), no telemetry, online (tests/fixtures.py turns offline mode on for PEFT/transformers), a
    token, and optionally HF_ENDPOINT's constants (read at import, so patched here)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(Path(os.environ["HF_HOME"]) / "no-token-file"))
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    if endpoint is not None:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )


def subprocess_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Environment for a CLI process: isolated caches, the Hub-protocol settings the tests rely on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LORAFORMAT_"))}
    env.update(
        {
            "HF_HOME": str(tmp / ".hf"),
            "LORAFORMAT_CACHE": str(tmp / ".lfcache"),
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
    )
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from loraformat.cli.main import main; main()", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def closed_port_url() -> str:
    """An endpoint on which nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def make_native(peft_dir: Path, out: Path, base: Path | None = None, **kwargs: Any) -> Path:
    from loraformat.conversion import convert

    convert(peft_dir, out, base=base, **kwargs)
    return out


def make_nan_adapter(native: Path, out: Path) -> Path:
    """A well-formed native file (correct content hash) whose first tensor holds a NaN: valid in structure,
    invalid at data level."""
    import torch

    from loraformat.adapter import open_adapter
    from loraformat.conversion import adapter_tensors
    from loraformat.io.native import write_native

    with open_adapter(native) as adapter:
        meta, tensors = adapter.meta, {k: v.clone() for k, v in adapter_tensors(adapter).items()}
    first = sorted(tensors)[0]
    tensors[first].view(-1)[0] = torch.nan
    write_native(out, meta, tensors)
    return out


#: the files a push publishes and a pull brings back
ADAPTER_FILES = {"adapter_model.safetensors", "adapter_config.json", "README.md"}
