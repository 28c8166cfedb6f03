"""Push, pull and the error mapping against the test Hub server, run by tests/test_hub_oldest.py under the
oldest huggingface-hub pyproject.toml allows (a separate interpreter; no transformers or PEFT needed here).

    python tests/hub_oldest_scenario.py WORKDIR   -> prints "ok <huggingface_hub version>"
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(work: Path) -> None:
    os.environ.update(
        {
            "HF_HOME": str(work / ".hf"),
            "LORAFORMAT_CACHE": str(work / ".lfcache"),
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
    )
    from tests.hub_helpers import GOOD_TOKEN, TOKENS, closed_port_url
    from tests.hub_server import HubServer
    from tests.spec_helpers import one_module_adapter

    os.environ["HF_TOKEN"] = GOOD_TOKEN
    import huggingface_hub

    from loraformat.errors import HubNetworkError, HubNotFoundError
    from loraformat.hub import pull, push

    adapter = one_module_adapter(work / "adapter.safetensors")
    with HubServer(work / "server", tokens=TOKENS) as server:
        moved: list[int] = []
        pushed = push(adapter, "acme/oldest", hub=server.url, tag="v1", progress=moved.append)
        assert pushed.created and len(pushed.commit) == 40 and sum(moved) >= adapter.stat().st_size
        pulled = pull("acme/oldest", work / "out", hub=server.url, revision="v1")
        assert pulled.commit == pushed.commit
        assert (work / "out" / "adapter_model.safetensors").read_bytes() == adapter.read_bytes()
        for repo, hub, error in (
            ("acme/missing", server.url, HubNotFoundError),
            ("acme/oldest", closed_port_url(), HubNetworkError),  # a transport error of the HTTP client
        ):
            try:
                pull(repo, work / "never", hub=hub, revision="main")
            except error:
                pass
            else:
                raise AssertionError(f"{repo} on {hub}: no {error.__name__}")
    print("ok", huggingface_hub.__version__)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
