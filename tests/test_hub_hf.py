"""The Hugging Face Hub backend with the real huggingface_hub client over real HTTP, against the Hub-protocol
server in tests/hub_server.py (HF_HUB_DISABLE_XET=1: plain LFS uploads)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import loraformat
from loraformat.errors import (
    HubAuthError,
    HubNetworkError,
    HubNotFoundError,
    UsageError,
    VerificationError,
)
from loraformat.hub import pull, push
from loraformat.hub.resolve import resolve_adapter_arg
from tests.hub_helpers import (
    ADAPTER_FILES,
    BAD_TOKEN,
    BASE_ID,
    READ_TOKEN,
    TOKENS,
    closed_port_url,
    hf_env,
    make_native,
)
from tests.hub_server import HubServer

FILES = ADAPTER_FILES


@pytest.fixture(scope="module")
def native(
    peft_adapters: dict[str, Path], llama_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("native") / "plain.safetensors"
    return make_native(
        peft_adapters["plain"],
        out,
        base=llama_base,
        base_id=BASE_ID,
        license="apache-2.0",
        task="CAUSAL_LM",
        description="Summarises things.",
    )


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with HubServer(tmp_path / "server", tokens=TOKENS) as srv:
        hf_env(monkeypatch, endpoint=srv.url)
        yield srv


def _calls(srv: HubServer, method: str, pattern: str) -> list[str]:
    return [p for m, p in srv.requests if m == method and re.search(pattern, p)]


def test_push_pull_round_trip_over_http(server: HubServer, native: Path, tmp_path: Path) -> None:
    pushed = push(native, "acme/plain", hub=server.url, tag="v1")
    assert (
        pushed.created
        and len(pushed.commit) == 40
        and pushed.url.endswith(f"/acme/plain/commit/{pushed.commit}")
    )
    # one commit holding the three files; the weights went through the LFS batch API as a plain PUT (no Xet)
    assert len(_calls(server, "POST", r"/commit/main$")) == 1
    assert _calls(server, "PUT", r"^/lfs-upload/") and _calls(server, "POST", r"lfs/objects/batch$")
    commit = server.repos["acme/plain"].commits[pushed.commit]
    assert FILES <= set(commit.files) and commit.files["adapter_model.safetensors"].sha256
    assert commit.message.startswith("Upload LoRA adapter plain (rank 8, 14 modules, content ")
    assert server.repos["acme/plain"].tags == {"v1": pushed.commit}

    pulled = pull("acme/plain", tmp_path / "out", hub=server.url, revision="v1")
    assert (pulled.commit, pulled.cached, pulled.content_hash) == (pushed.commit, False, pushed.content_hash)
    assert {p.name for p in (tmp_path / "out").iterdir()} == FILES  # no .cache/, no .gitattributes
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == native.read_bytes()

    server.requests.clear()
    by_commit = pull("acme/plain", tmp_path / "again", hub=server.url, revision=pushed.commit)
    assert by_commit.cached and server.requests == []  # a cached commit costs no request at all
    assert (tmp_path / "again" / "README.md").read_bytes() == (tmp_path / "out" / "README.md").read_bytes()

    same = push(native, "acme/plain", hub=server.url)
    assert not same.created and same.commit == pushed.commit  # the Hub skips the empty commit


def test_model_card(server: HubServer, native: Path, tmp_path: Path) -> None:
    pushed = push(native, "acme/plain", hub=server.url)
    pull("acme/plain", tmp_path / "out", hub=server.url)
    text = (tmp_path / "out" / "README.md").read_text()
    front = yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", text, re.S).group(1))
    assert front["base_model"] == BASE_ID and front["base_model_relation"] == "adapter"
    assert front["library_name"] == "peft" and front["license"] == "apache-2.0"
    assert front["pipeline_tag"] == "text-generation"
    assert {"lora", "loraformat", f"base_model:adapter:{BASE_ID}"} <= set(front["tags"])
    body = text.split("---\n", 2)[2]
    assert "| rank | 8 |" in body and "| alpha | 16 |" in body and "alpha/r (s = 2)" in body
    assert pushed.content_hash in body and "Summarises things." in body
    assert "`q_proj`" in body and "base content hash" in body
    assert "loraformat merge ./base-model hf://acme/plain" in body
    assert 'PeftModel.from_pretrained(base, "acme/plain")' in body
    info = server.repos["acme/plain"]
    assert info.commits[pushed.commit].files["README.md"].data == text.encode()


def test_branches_and_pins(
    server: HubServer, native: Path, peft_adapters: dict[str, Path], tmp_path: Path
) -> None:
    main = push(native, "acme/a", hub=server.url, tag="v1")
    dev = push(peft_adapters["rslora"], "acme/a", hub=server.url, revision="feature/dev")
    assert server.repos["acme/a"].branches["main"] == main.commit
    assert server.repos["acme/a"].branches["feature/dev"] == dev.commit
    assert pull("acme/a", tmp_path / "d", hub=server.url, revision="feature/dev").commit == dev.commit
    assert pull("acme/a", tmp_path / "m", hub=server.url).commit == main.commit
    assert pull("acme/a", tmp_path / "c", hub=server.url, revision=dev.commit).commit == dev.commit
    with pytest.raises(UsageError, match="tag 'v1' already exists"):
        push(peft_adapters["rslora"], "acme/a", hub=server.url, tag="v1")
    assert server.repos["acme/a"].branches["main"] == main.commit  # refused before anything was committed


def test_not_found_errors(server: HubServer, native: Path, tmp_path: Path) -> None:
    push(native, "acme/a", hub=server.url)
    server.create("acme/empty", "acme")
    cases = [
        ("acme/missing", None, "repository not found"),
        ("acme/a", "nope", "revision 'nope' not found"),
        ("acme/empty", None, "no adapter_model.safetensors"),
    ]
    for repo, rev, match in cases:
        with pytest.raises(HubNotFoundError, match=match) as err:
            pull(repo, tmp_path / "out", hub=server.url, revision=rev)
        assert err.value.exit_code == 3
    assert not (tmp_path / "out").exists()


def test_auth_errors_never_show_the_token(
    server: HubServer, native: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    push(native, "acme/a", hub=server.url)
    with pytest.raises(HubAuthError) as err:
        pull("acme/a", tmp_path / "out", hub=server.url, token=BAD_TOKEN)
    assert err.value.exit_code == 4 and BAD_TOKEN not in str(err.value)
    with pytest.raises(HubAuthError) as err:
        push(native, "acme/a", hub=server.url, token=BAD_TOKEN)
    assert BAD_TOKEN not in str(err.value)
    # the server echoes a read-only token in its 403 message: it must not reach ours
    with pytest.raises(HubAuthError, match="HTTP 403") as err:
        push(native, "acme/a", hub=server.url, token=READ_TOKEN, validate=False)
    assert READ_TOKEN not in str(err.value) and "***" in str(err.value)
    server.create("acme/gated", "acme", gated=True)
    server.repos["acme/gated"].commits.update(server.repos["acme/a"].commits)
    server.repos["acme/gated"].branches["main"] = server.repos["acme/a"].branches["main"]
    with pytest.raises(HubAuthError, match="gated"):
        pull("acme/gated", tmp_path / "out", hub=server.url, token=READ_TOKEN)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubAuthError, match="no Hugging Face token"):
        push(native, "acme/a", hub=server.url, validate=False)
    server.create("acme/private", "acme", private=True)
    with pytest.raises(HubNotFoundError, match="if it is private, check your token"):
        pull(
            "acme/private", tmp_path / "out", hub=server.url
        )  # the Hub answers 401 RepoNotFound, as for missing


def test_offline_mode_and_network_failure(
    server: HubServer, native: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    pushed = push(native, "acme/a", hub=server.url, tag="v1")
    pull("acme/a", tmp_path / "warm", hub=server.url, revision="v1")  # caches the revision and the tag
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubNetworkError, match="offline mode") as err:
        pull("acme/other", tmp_path / "out", hub=server.url)
    assert err.value.exit_code == 5
    with pytest.raises(HubNetworkError, match="offline mode"):
        push(native, "acme/a", hub=server.url, validate=False)
    # what is cached still works offline: a commit directly, a tag through the remembered ref
    assert pull("acme/a", tmp_path / "c", hub=server.url, revision=pushed.commit).cached
    offline = pull("acme/a", tmp_path / "t", hub=server.url, revision="v1")
    assert offline.cached and offline.offline and offline.commit == pushed.commit
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    dead = closed_port_url()
    with pytest.raises(HubNetworkError, match="cannot reach") as err:
        pull("acme/a", tmp_path / "out", hub=dead)
    assert err.value.exit_code == 5
    with pytest.raises(HubNetworkError, match="cannot reach"):
        push(native, "acme/a", hub=dead, validate=False)
    assert not (tmp_path / "out").exists()


def test_hostile_server_names_and_corruption(server: HubServer, native: Path, tmp_path: Path) -> None:
    pushed = push(native, "acme/a", hub=server.url)
    server.inject_commit("acme/a", {"../../escape.txt": b"pwned"})
    (tmp_path / "sub").mkdir()
    with pytest.raises(VerificationError, match="would escape the output directory") as err:
        pull("acme/a", tmp_path / "sub" / "out", hub=server.url)
    assert err.value.exit_code == 1
    assert not list(tmp_path.rglob("escape.txt")) and not (tmp_path / "sub" / "out").exists()
    # a blob altered on the server (same size) fails the sha256 check against the tree listing
    server.corrupt_blob(
        server.repos["acme/a"].commits[pushed.commit].files["adapter_model.safetensors"].sha256
    )
    with pytest.raises(VerificationError, match="hashes to"):
        pull("acme/a", tmp_path / "out", hub=server.url, revision=pushed.commit)
    assert not (tmp_path / "out").exists()


def test_hf_references_are_pulled_into_the_cache_and_reused(server: HubServer, native: Path) -> None:
    pushed = push(native, "acme/a", hub=server.url, tag="v1")
    path = Path(resolve_adapter_arg("hf://acme/a@v1"))  # HF_ENDPOINT's constants point at the server
    assert path.name == pushed.commit
    assert (path / "adapter_model.safetensors").read_bytes() == native.read_bytes()
    server.requests.clear()
    assert resolve_adapter_arg("hf://acme/a@v1") == str(path)
    assert [m for m, _ in server.requests] == ["GET"]  # only resolving the tag; nothing downloaded
    server.requests.clear()
    assert resolve_adapter_arg(f"hf://acme/a@{pushed.commit}") == str(path) and server.requests == []
    with loraformat.open_adapter(path) as adapter:
        assert adapter.meta.content_hash == pushed.content_hash


def test_peft_loads_the_pulled_directory(
    server: HubServer, native: Path, peft_adapters: dict[str, Path], llama_base: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    push(native, "acme/a", hub=server.url)
    pull("acme/a", tmp_path / "pulled", hub=server.url)
    ids = torch.arange(12).reshape(1, 12) % 256
    logits = []
    for source in (peft_adapters["plain"], tmp_path / "pulled"):
        base = AutoModelForCausalLM.from_pretrained(llama_base, torch_dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(source)).eval()
        with torch.no_grad():
            logits.append(model(ids).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def test_both_hubs_report_progress_and_return_one_result_type(
    server: HubServer, native: Path, tmp_path: Path
) -> None:
    """The Hugging Face backend dropped the progress callback (the CLI showed no bar for hf://); both backends
    now report every byte of a push and a pull, and publish the same result type."""
    from loraformat.hub.backend import Published
    from loraformat.hub.hf import HfHub
    from loraformat.hub.local import LocalHub

    for hub in (server.url, str(tmp_path / "local-hub")):
        moved: list[int] = []
        pushed = push(native, "acme/progress", hub=hub, progress=moved.append)
        assert pushed.commit and sum(moved) >= native.stat().st_size, (hub, moved)
        moved.clear()
        pull("acme/progress", tmp_path / f"out-{len(hub)}", hub=hub, progress=moved.append)
        assert sum(moved) >= native.stat().st_size, (hub, moved)
    for backend in (HfHub, LocalHub):
        assert backend.publish.__annotations__["return"] in ("Published", Published)
