"""The embedded local hub: push/pull round trips, revisions and refs, verification, the pull cache, hub
references, and concurrent publishers from several processes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import loraformat
from loraformat.errors import (
    AdapterError,
    HubNotFoundError,
    OutputExistsError,
    UsageError,
    VerificationError,
)
from loraformat.hub import list_repos, pull, push, select_hub
from loraformat.hub.local import LocalHub, canonical_json, check_consistency
from loraformat.hub.refs import HubSpec, parse_hub_ref, safe_relpath
from loraformat.hub.resolve import is_hub_ref, resolve_adapter_arg
from tests.hub_helpers import ADAPTER_FILES, BASE_ID, make_nan_adapter, make_native

FILES = ADAPTER_FILES


@pytest.fixture(scope="module")
def native(
    peft_adapters: dict[str, Path], llama_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("native") / "plain.safetensors"
    return make_native(peft_adapters["plain"], out, base=llama_base, base_id=BASE_ID, license="apache-2.0")


@pytest.fixture
def hub(tmp_path: Path) -> Path:
    return tmp_path / "hub"


def test_push_pull_round_trip_is_byte_identical(native: Path, hub: Path, tmp_path: Path) -> None:
    pushed = push(native, "acme/plain", hub=hub, tag="v1", validate=False)
    assert pushed.created and pushed.branch == "main" and pushed.tag == "v1" and not pushed.converted
    assert len(pushed.commit) == 64 and pushed.url.endswith(f"acme/plain@{pushed.commit}")
    pulled = pull("acme/plain", tmp_path / "out", hub=hub, revision="v1")
    assert pulled.commit == pushed.commit and not pulled.cached
    assert {p.name for p in (tmp_path / "out").iterdir()} == FILES
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == native.read_bytes()
    assert pulled.content_hash == pushed.content_hash
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["base_model_name_or_path"] == BASE_ID
    assert check_consistency(hub) == []


def test_peft_dir_is_converted_and_validated(
    peft_adapters: dict[str, Path], hub: Path, tmp_path: Path
) -> None:
    pushed = push(peft_adapters["patterns"], "acme/patterns", hub=hub)
    assert pushed.converted
    pull("acme/patterns", tmp_path / "out", hub=hub)
    with loraformat.open_adapter(tmp_path / "out") as adapter:
        assert adapter.source_format == "loraformat"
        assert adapter.meta.content_hash == pushed.content_hash
        assert {m.rank for m in adapter.modules.values()} == {2, 4, 8}


def test_revisions_branches_tags_and_commit_ids(
    native: Path, peft_adapters: dict[str, Path], hub: Path, tmp_path: Path
) -> None:
    first = push(native, "acme/a", hub=hub, tag="v1", validate=False)
    dev = push(peft_adapters["rslora"], "acme/a", hub=hub, revision="dev", validate=False)
    assert dev.branch == "dev" and dev.commit != first.commit
    local = LocalHub(hub)
    refs = local.refs("acme/a")
    assert refs == {"branches": {"main": first.commit, "dev": dev.commit}, "tags": {"v1": first.commit}}
    # the branch started from main: its revision's parent is main's head
    assert local.revision("acme/a", dev.commit).parents == [first.commit]
    manifest = hub / "repos" / "acme" / "a" / "revisions" / f"{dev.commit}.json"
    assert hashlib.sha256(manifest.read_bytes()).hexdigest() == dev.commit  # content-addressed
    for rev, want in (
        ("main", first.commit),
        ("v1", first.commit),
        ("dev", dev.commit),
        (dev.commit, dev.commit),
        (dev.commit[:10], dev.commit),
        (None, first.commit),
    ):
        out = tmp_path / f"o-{rev}"
        assert pull("acme/a", out, hub=hub, revision=rev).commit == want
    assert (tmp_path / "o-dev" / "adapter_model.safetensors").read_bytes() != native.read_bytes()


def test_unchanged_push_and_immutable_tags(native: Path, hub: Path) -> None:
    first = push(native, "acme/a", hub=hub, tag="v1", validate=False)
    again = push(native, "acme/a", hub=hub, validate=False)
    assert not again.created and again.commit == first.commit
    with pytest.raises(UsageError, match="tag 'v1' already exists") as err:
        push(native, "acme/a", hub=hub, tag="v1", validate=False)
    assert err.value.exit_code == 2
    assert LocalHub(hub).refs("acme/a")["tags"] == {"v1": first.commit}


def test_missing_repo_revision_and_hub(native: Path, hub: Path, tmp_path: Path) -> None:
    push(native, "acme/a", hub=hub, validate=False)
    for repo, rev, match in (
        ("acme/missing", None, "repository acme/missing not found"),
        ("acme/a", "nope", "revision 'nope' not found"),
        ("acme/a", "ab" * 32, "not found"),
    ):
        with pytest.raises(HubNotFoundError, match=match) as err:
            pull(repo, tmp_path / "out", hub=hub, revision=rev)
        assert err.value.exit_code == 3
    with pytest.raises(HubNotFoundError, match="no loraformat hub"):
        pull("acme/a", tmp_path / "out", hub=tmp_path / "nowhere")
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError):
        pull("acme/a", tmp_path / "out", hub=hub)


def test_refuses_a_directory_that_is_not_a_hub(native: Path, tmp_path: Path) -> None:
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a loraformat hub"):
        push(native, "acme/a", hub=tmp_path / "stuff", validate=False)
    assert sorted(p.name for p in (tmp_path / "stuff").iterdir()) == ["notes.txt"]


def test_push_refuses_invalid_adapter_unless_no_validate(native: Path, hub: Path, tmp_path: Path) -> None:
    bad = make_nan_adapter(native, tmp_path / "nan.safetensors")
    with pytest.raises(AdapterError, match="refusing to push an invalid adapter: non-finite") as err:
        push(bad, "acme/nan", hub=hub)
    assert err.value.exit_code == 1
    assert not (hub / "repos" / "acme" / "nan").exists()
    pushed = push(bad, "acme/nan", hub=hub, validate=False)
    assert pull("acme/nan", tmp_path / "out", hub=hub).commit == pushed.commit


def test_pull_verifies_objects_and_leaves_nothing(native: Path, hub: Path, tmp_path: Path) -> None:
    pushed = push(native, "acme/a", hub=hub, validate=False)
    sha = LocalHub(hub).files("acme/a", pushed.commit)["adapter_model.safetensors"].sha256
    obj = hub / "objects" / sha[:2] / sha
    os.chmod(obj, 0o644)
    data = bytearray(obj.read_bytes())
    data[-5] ^= 0x01  # same size, one bit flipped in the tensor data
    obj.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="sha256") as err:
        pull("acme/a", tmp_path / "out", hub=hub)
    assert err.value.exit_code == 1
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / ".lfcache").rglob(pushed.commit))
    assert check_consistency(hub) and "corrupt" in check_consistency(hub)[0]


def test_tampered_content_hash_is_caught(native: Path, hub: Path, tmp_path: Path) -> None:
    """An object whose tensor data no longer matches the adapter's recorded content hash (a hub whose objects
    and manifest were rewritten consistently) is refused."""
    tampered = tmp_path / "tampered.safetensors"
    data = bytearray(native.read_bytes())
    data[-5] ^= 0x01
    tampered.write_bytes(bytes(data))
    push(tampered, "acme/t", hub=hub, validate=False)
    with pytest.raises(VerificationError, match="tensor data hashes to"):
        pull("acme/t", tmp_path / "out", hub=hub)
    assert not (tmp_path / "out").exists()


def _forge_revision(hub: Path, repo: str, files: dict[str, bytes]) -> str:
    """Write objects and a manifest by hand (a hostile or broken hub), and point main at it."""
    entries = {}
    for name, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        (hub / "objects" / sha[:2]).mkdir(parents=True, exist_ok=True)
        (hub / "objects" / sha[:2] / sha).write_bytes(data)
        entries[name] = {"sha256": sha, "size": len(data)}
    manifest = canonical_json(
        {
            "format": "loraformat-hub-revision",
            "version": 1,
            "repo": repo,
            "parents": [],
            "message": "forged",
            "files": entries,
        }
    )
    commit = hashlib.sha256(manifest).hexdigest()
    d = hub / "repos" / repo
    (d / "revisions" / f"{commit}.json").write_bytes(manifest)
    (d / "refs.json").write_text(json.dumps({"branches": {"main": commit}, "tags": {}}))
    return commit


def test_remote_name_escaping_the_output_is_refused(native: Path, hub: Path, tmp_path: Path) -> None:
    push(native, "acme/a", hub=hub, validate=False)
    _forge_revision(
        hub, "acme/a", {"adapter_model.safetensors": native.read_bytes(), "../escape.txt": b"pwned"}
    )
    (tmp_path / "sub").mkdir()
    with pytest.raises(VerificationError, match="would escape the output directory"):
        pull("acme/a", tmp_path / "sub" / "out", hub=hub)
    assert not (tmp_path / "sub" / "out").exists()
    assert not list(tmp_path.rglob("escape.txt"))
    for name in ("/etc/passwd", "a/../../b", "..", "a\\b", "C:evil", "./a", "a//b"):
        with pytest.raises(VerificationError):
            safe_relpath(name)
    assert safe_relpath("sub/adapter_config.json") == "sub/adapter_config.json"


def test_cached_revision_costs_nothing(native: Path, hub: Path, tmp_path: Path) -> None:
    pushed = push(native, "acme/a", hub=hub, tag="v1", validate=False)
    first = pull("acme/a", tmp_path / "one", hub=hub, revision="v1")
    assert not first.cached
    for obj in (hub / "objects").rglob("*"):  # the hub's objects are no longer needed for this revision
        if obj.is_file():
            obj.unlink()
    second = pull("acme/a", tmp_path / "two", hub=hub, revision=pushed.commit)
    assert second.cached and second.commit == pushed.commit
    assert (tmp_path / "two" / "adapter_model.safetensors").read_bytes() == native.read_bytes()
    again = pull("acme/a", tmp_path / "two", hub=hub, revision="v1", overwrite=True)
    assert again.cached


def test_an_altered_cache_entry_is_fetched_again(native: Path, hub: Path, tmp_path: Path) -> None:
    """Pulled files may be hard links into the cache: editing one in place must not poison later pulls."""
    push(native, "acme/a", hub=hub, validate=False)
    pull("acme/a", tmp_path / "one", hub=hub)
    weights = tmp_path / "one" / "adapter_model.safetensors"
    os.chmod(weights, 0o644)
    with open(weights, "r+b") as f:  # in place, as some editors do
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x00\x00")
    again = pull("acme/a", tmp_path / "two", hub=hub)
    assert not again.cached  # the entry no longer matched its record: dropped and fetched again
    assert (tmp_path / "two" / "adapter_model.safetensors").read_bytes() == native.read_bytes()
    assert pull("acme/a", tmp_path / "three", hub=hub).cached


def test_hub_references_pull_into_the_cache_and_are_reused(
    native: Path, hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pushed = push(native, "acme/a", hub=hub, tag="v1", validate=False)
    assert resolve_adapter_arg(str(native)) == str(native) and not is_hub_ref(str(native))
    with pytest.raises(UsageError, match="LORAFORMAT_HUB"):
        resolve_adapter_arg("lfhub://acme/a@v1")
    monkeypatch.setenv("LORAFORMAT_HUB", str(hub))
    path = Path(resolve_adapter_arg("lfhub://acme/a@v1"))
    assert path.name == pushed.commit and str(path).startswith(os.environ["LORAFORMAT_CACHE"])
    assert (path / "adapter_model.safetensors").read_bytes() == native.read_bytes()
    mtime = (path / "adapter_model.safetensors").stat().st_mtime_ns
    assert resolve_adapter_arg(f"lfhub://{hub}/acme/a@{pushed.commit}") == str(path)  # explicit hub path form
    assert resolve_adapter_arg("lfhub://acme/a") == str(path)  # main
    assert (path / "adapter_model.safetensors").stat().st_mtime_ns == mtime  # reused, not rewritten
    with loraformat.open_adapter(path) as adapter:
        assert adapter.meta.content_hash == pushed.content_hash


def test_hub_selection_and_reference_syntax(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAFORMAT_HUB", raising=False)
    assert select_hub(None) == HubSpec("hf")
    assert select_hub("hf") == HubSpec("hf")
    assert select_hub("https://hub.example.org/") == HubSpec("hf", endpoint="https://hub.example.org")
    assert select_hub(f"file://{tmp_path}") == HubSpec("local", path=tmp_path)
    monkeypatch.setenv("LORAFORMAT_HUB", str(tmp_path))
    assert select_hub(None) == HubSpec("local", path=tmp_path)
    ref = parse_hub_ref("hf://org/name@feature/x")
    assert (ref.hub.kind, ref.repo_id, ref.revision) == ("hf", "org/name", "feature/x")
    ref = parse_hub_ref(f"lfhub://{tmp_path}/org/name")
    assert (ref.hub, ref.repo_id, ref.revision) == (HubSpec("local", path=tmp_path), "org/name", None)
    for bad in (
        "hf://name",
        "hf://org/name@",
        "hf://org/na me",
        "hf://../x",
        "lfhub:///org",
        "hf://a/b/c",
        "hf://org/name@../x",
    ):
        with pytest.raises(UsageError):
            parse_hub_ref(bad)


def test_list_repos(native: Path, hub: Path) -> None:
    push(native, "acme/a", hub=hub, tag="v1", validate=False)
    push(native, "other/b", hub=hub, revision="dev", private=True, validate=False)
    listing = {r.repo_id: r for r in list_repos(hub)}
    assert set(listing) == {"acme/a", "other/b"}
    assert set(listing["acme/a"].tags) == {"v1"} and set(listing["other/b"].branches) == {"dev"}
    assert listing["other/b"].private and listing["acme/a"].revisions == 1
    with pytest.raises(UsageError, match="local hub"):
        list_repos("hf")


_PUSHER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from loraformat.hub import push
    adapter, hub, index, go = sys.argv[1:]
    while not Path(go).exists():
        time.sleep(0.005)
    push(adapter, "acme/shared", hub=hub, tag=f"t{index}", message=f"push {index}", validate=False)
""")


def test_concurrent_pushes_from_processes_leave_a_consistent_registry(
    native: Path, hub: Path, tmp_path: Path
) -> None:
    """Six processes publish different adapters to the same branch at once: every revision complete, every
    ref valid, no update lost (the branch history holds all six, in some order)."""
    from loraformat.conversion import convert

    adapters = []
    for i in range(6):
        adapters.append(tmp_path / f"a{i}.safetensors")
        convert(native, adapters[-1], name=f"adapter-{i}")
    push(native, "acme/shared", hub=hub, validate=False)  # an existing repo and branch to race on
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PUSHER, str(a), str(hub), str(i), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i, a in enumerate(adapters)
    ]
    time.sleep(0.5)
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    assert check_consistency(hub) == []
    local = LocalHub(hub)
    refs = local.refs("acme/shared")
    assert set(refs["tags"]) == {f"t{i}" for i in range(6)} and len(set(refs["tags"].values())) == 6
    chain, commit = [], refs["branches"]["main"]
    while commit:
        chain.append(commit)
        parents = local.revision("acme/shared", commit).parents
        commit = parents[0] if parents else None
    assert len(chain) == 7 and set(refs["tags"].values()) <= set(chain)
    assert not list((hub / "tmp").iterdir())
    for i, adapter in enumerate(adapters):
        pull("acme/shared", tmp_path / f"out{i}", hub=hub, revision=f"t{i}")
        assert (tmp_path / f"out{i}" / "adapter_model.safetensors").read_bytes() == adapter.read_bytes()
