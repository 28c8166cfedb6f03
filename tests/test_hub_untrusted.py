"""A hostile hub must never write or delete outside its place: a Hugging Face-protocol server that lies (commit
ids, file names, sizes, hashes) driven through the real huggingface_hub client, and a tampered local hub. After
every attack the whole tree around the target is digested and compared: nothing outside the cache may change,
nothing appears under the output, and the error is one line with a documented exit code."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraformat.errors import LoraformatError, VerificationError
from loraformat.hub import pull, push
from loraformat.hub.cache import RECORD
from loraformat.hub.local import canonical_json
from loraformat.hub.untrusted import FILE_SIZE_CAPS, join_under, remove_tree
from tests.hub_helpers import BASE_ID, TOKENS, hf_env, make_native, run_cli, subprocess_env
from tests.hub_server import HubServer

WEIGHTS = "adapter_model.safetensors"
FILES = {WEIGHTS, "adapter_config.json", "README.md"}


@pytest.fixture(scope="module")
def native(
    peft_adapters: dict[str, Path], llama_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("native") / "plain.safetensors"
    return make_native(peft_adapters["plain"], out, base=llama_base, base_id=BASE_ID)


@pytest.fixture(scope="module")
def hf_server(tmp_path_factory: pytest.TempPathFactory, native: Path) -> Iterator[HubServer]:
    """One server for the module holding acme/a (pushed once through the real client); tests set ``hostile``."""
    home = tmp_path_factory.mktemp("pusher")
    with (
        HubServer(tmp_path_factory.mktemp("server"), tokens=TOKENS) as srv,
        pytest.MonkeyPatch.context() as mp,
    ):
        mp.setenv("HF_HOME", str(home / ".hf"))
        mp.setenv("LORAFORMAT_CACHE", str(home / ".lfcache"))
        hf_env(mp, endpoint=srv.url)
        push(native, "acme/a", hub=srv.url)
        yield srv


@pytest.fixture
def server(hf_server: HubServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    hf_env(monkeypatch, endpoint=hf_server.url)
    hf_server.hostile = {}
    hf_server.requests.clear()
    yield hf_server
    hf_server.hostile = {}


@pytest.fixture
def world(tmp_path: Path) -> Path:
    """User data an attack could aim at: a victim directory beside the cache and the output's parent."""
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "precious.txt").write_text("user data")
    (victim / "sub" / "data.bin").write_bytes(os.urandom(64))
    (tmp_path / "work").mkdir()
    return tmp_path


def digest_tree(root: Path, skip: tuple[str, ...] = (".lfcache", ".hf")) -> dict[str, str]:
    """Every path under root (hidden ones too) with its kind and content digest; ``skip`` top-level names."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel == ".":
            dirnames[:] = [d for d in dirnames if d not in skip]
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = os.path.relpath(path, root)
            if path.is_symlink():
                out[key] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[key] = "dir"
            else:
                out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_contained(world: Path, before: dict[str, str], err: LoraformatError) -> None:
    """Nothing outside the cache changed, no output appeared, the cache holds nothing outside its hub tree,
    and the error is one line with a documented exit code."""
    assert digest_tree(world) == before
    assert not (world / "work" / "out").exists()
    cache = world / ".lfcache"
    if cache.exists():
        assert {p.name for p in cache.iterdir()} <= {"hub"}
    assert "\n" not in str(err) and err.exit_code in (1, 3, 4, 5), (err.exit_code, str(err))


def _pull_fails(world: Path, *args: object, **kwargs: object) -> LoraformatError:
    with pytest.raises(LoraformatError) as info:
        pull(*args, world / "work" / "out", **kwargs)  # type: ignore[arg-type,misc]
    return info.value


# -- the helpers themselves -------------------------------------------------------------------------------------


def test_join_under_refuses_every_escape(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    for name in ("/etc", "..", "../x", "a/../../x", "a\x00b", "", ".", "a//b", "link/x", "C:x", "a\\b"):
        with pytest.raises(VerificationError):
            join_under(root, name)
    assert join_under(root, "a", "b.json") == root / "a" / "b.json"
    with pytest.raises(VerificationError, match="refusing to delete"):
        remove_tree(tmp_path, root)
    with pytest.raises(VerificationError, match="refusing to delete"):
        remove_tree(root / "link", root)
    assert tmp_path.is_dir() and root.is_dir()


# -- a hostile Hugging Face-protocol server ---------------------------------------------------------------------


def _repo_cache(world: Path, server: HubServer) -> Path:
    port = server.url.rsplit(":", 1)[1]
    return world / ".lfcache" / "hub" / f"hf-127.0.0.1_{port}" / "acme" / "a"


def hostile_shas(world: Path, server: HubServer) -> list[object]:
    victim = world / "victim"
    return [
        str(victim),  # absolute: the cache entry would be the victim, and the stale-entry cleanup delete it
        os.path.relpath(victim, _repo_cache(world, server)),  # ../../../../../victim
        "../../../../../victim",
        "..",
        "a" * 39 + "/",
        "0" * 39 + "\x00",
        "A" * 40,  # not lowercase
        "0" * 64,  # a local-hub id, not a Hugging Face one
        12345,
        ["x"],
    ]


def test_hostile_commit_ids_never_touch_the_file_system(server: HubServer, world: Path) -> None:
    for sha in hostile_shas(world, server):
        server.hostile = {"sha": sha}
        before = digest_tree(world)
        err = _pull_fails(world, "acme/a", hub=server.url)
        assert_contained(world, before, err)
        assert isinstance(err, VerificationError) and "commit id" in str(err), (sha, str(err))
        assert not [p for m, p in server.requests if "/resolve/" in p]  # refused before any download


def test_hostile_commit_id_through_the_cli(server: HubServer, world: Path) -> None:
    server.hostile = {"sha": str(world / "victim")}
    env = subprocess_env(world, HF_ENDPOINT=server.url, HF_TOKEN=next(iter(TOKENS)))
    before = digest_tree(world)
    proc = run_cli(["pull", "acme/a", "-o", str(world / "work" / "out"), "--hub", server.url], env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "commit id" in lines[0], proc.stderr
    assert digest_tree(world) == before


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"size": 10**15}, "above the"),
        ({"size": FILE_SIZE_CAPS[WEIGHTS] + 1}, "above the"),
        ({"size": -1}, "not a byte count"),
        ({"size": "123"}, "not a byte count"),
        ({"size": True}, "not a byte count"),
        ({"lfs": {"oid": "../../x", "size": 1, "pointerSize": 134}}, "LFS sha256"),
        ({"lfs": None, "oid": "/etc/passwd"}, "git blob id"),
        ({"lfs": {"size": 1}}, "malformed answer"),
        ({"path": None}, "malformed answer|escape"),
    ],
)
def test_hostile_listing_is_refused_before_download(
    server: HubServer, world: Path, fields: dict[str, object], match: str
) -> None:
    server.hostile = {"tree": {WEIGHTS: fields}}
    before = digest_tree(world)
    err = _pull_fails(world, "acme/a", hub=server.url)
    assert_contained(world, before, err)
    assert err.exit_code == 1 and __import__("re").search(match, str(err)), str(err)
    assert not [p for m, p in server.requests if "/resolve/" in p]


@pytest.mark.parametrize("name", ["/abs/evil", "../evil", "a/../../evil", "nul\x00evil", "a\\..\\evil"])
def test_hostile_file_names_in_the_listing(server: HubServer, world: Path, name: str) -> None:
    server.hostile = {"tree": {name: {"oid": "0" * 40, "size": 3}}}
    before = digest_tree(world)
    err = _pull_fails(world, "acme/a", hub=server.url)
    assert_contained(world, before, err)
    assert "escape the output directory" in str(err)


def test_altered_download_of_the_promised_size_is_refused(
    server: HubServer, world: Path, native: Path
) -> None:
    data = bytearray(native.read_bytes())
    data[-3] ^= 0xFF
    server.hostile = {"download": {WEIGHTS: {"body": bytes(data)}}}
    before = digest_tree(world)
    err = _pull_fails(world, "acme/a", hub=server.url)
    assert_contained(world, before, err)
    assert isinstance(err, VerificationError) and "hashes to" in str(err)


def _weights_size(server: HubServer) -> int:
    repo = server.repos["acme/a"]
    return repo.commits[repo.branches["main"]].files[WEIGHTS].size


def test_enormous_content_length_is_refused_before_reading(server: HubServer, world: Path) -> None:
    server.hostile = {"download": {WEIGHTS: {"length": 10**15, "body": b"x" * 4096}}}
    before = digest_tree(world)
    err = _pull_fails(world, "acme/a", hub=server.url)
    assert_contained(world, before, err)
    assert err.exit_code == 1 and "announces 1000000000000000 bytes" in str(err), str(err)


def test_an_answer_longer_than_promised_is_not_read_to_the_end(server: HubServer, world: Path) -> None:
    """200 MB sent without a length for a file the listing says is a few KB: reading stops right after the
    promised size, the staging never holds more."""
    server.hostile = {"download": {WEIGHTS: {"length": None, "body": b"x" * (1 << 20), "repeat": 200}}}
    before = digest_tree(world)
    err = _pull_fails(world, "acme/a", hub=server.url)
    assert_contained(world, before, err)
    assert err.exit_code == 1 and "stopped reading" in str(err), str(err)
    assert server.hostile_sent < 100 << 20  # the client hung up long before the server was done


def test_a_download_cut_off_midway_is_one_line(server: HubServer, world: Path, native: Path) -> None:
    data = native.read_bytes()
    server.hostile = {"download": {WEIGHTS: {"length": len(data), "body": data[: len(data) // 2]}}}
    before = digest_tree(world)
    err = _pull_fails(world, "acme/a", hub=server.url)
    assert_contained(world, before, err)
    assert err.exit_code == 5 and "broke off" in str(err) or "ended after" in str(err), str(err)
    env = subprocess_env(world, HF_ENDPOINT=server.url, HF_TOKEN=next(iter(TOKENS)))
    proc = run_cli(["pull", "acme/a", "-o", str(world / "work" / "out"), "--hub", server.url], env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 5 and len(lines) == 1, proc.stderr


FULL_DISK = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # every file write beyond 4 KiB fails: a full disk
from loraformat.cli.main import main
main(sys.argv[1:])
"""


def test_disk_full_on_another_file_system_than_the_cache(server: HubServer, world: Path) -> None:
    """The cache (tmp_path, ext4) already holds the revision; the output is on /dev/shm (tmpfs), so the pull
    copies instead of linking, and the copy hits the limit: exit 2, one line, nothing under the target."""
    import signal
    import sys
    import tempfile

    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(world).st_dev:
        pytest.skip("needs /dev/shm on a file system of its own")
    env = subprocess_env(world, HF_ENDPOINT=server.url, HF_TOKEN=next(iter(TOKENS)))
    assert (
        run_cli(["pull", "acme/a", "-o", str(world / "work" / "warm"), "--hub", server.url], env).returncode
        == 0
    )
    with tempfile.TemporaryDirectory(dir=shm) as other:
        target = Path(other) / "out"
        before = digest_tree(world)
        proc = subprocess.run(
            [sys.executable, "-c", FULL_DISK, "pull", "acme/a", "-o", str(target), "--hub", server.url],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN),
        )
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and "write failed" in lines[0], proc.stderr
        assert list(Path(other).iterdir()) == [] and digest_tree(world) == before


# -- a tampered local hub ---------------------------------------------------------------------------------------


def _local_hub(world: Path, native: Path) -> tuple[Path, str]:
    hub = world / "hub"
    commit = push(native, "acme/a", hub=hub, validate=False).commit
    return hub, commit


def _set_refs(hub: Path, main: object) -> None:
    refs = hub / "repos" / "acme" / "a" / "refs.json"
    refs.write_text(json.dumps({"branches": {"main": main}, "tags": {}}))


def test_tampered_local_refs_never_touch_the_file_system(world: Path, native: Path) -> None:
    hub, _ = _local_hub(world, native)
    repo_cache = world / ".lfcache" / "hub" / "local" / "acme" / "a"
    for main in [
        str(world / "victim"),
        os.path.relpath(world / "victim", repo_cache),
        "../../../../../victim",
        "0" * 40,
        "0" * 63 + "/",
        None,
        {"x": 1},
    ]:
        _set_refs(hub, main)
        before = digest_tree(world)
        err = _pull_fails(world, "acme/a", hub=hub)
        assert_contained(world, before, err)
        assert isinstance(err, VerificationError), (main, str(err))
    (hub / "repos" / "acme" / "a" / "refs.json").write_text(json.dumps({"branches": {"../x": "0" * 64}}))
    before = digest_tree(world)
    assert_contained(world, before, _pull_fails(world, "acme/a", hub=hub, revision="v1"))


def _forge(hub: Path, entries: dict[str, object]) -> str:
    """A manifest that hashes to its id (so it passes that check) but lists hostile objects and sizes."""
    manifest = canonical_json(
        {"format": "loraformat-hub-revision", "version": 1, "repo": "acme/a", "parents": [], "files": entries}
    )
    commit = hashlib.sha256(manifest).hexdigest()
    (hub / "repos" / "acme" / "a" / "revisions" / f"{commit}.json").write_bytes(manifest)
    _set_refs(hub, commit)
    return commit


def test_tampered_local_manifest_objects_and_sizes(world: Path, native: Path) -> None:
    hub, _ = _local_hub(world, native)
    victim = str(world / "victim" / "precious.txt")
    size = native.stat().st_size
    for entry in [
        {"sha256": "../../../victim/precious.txt", "size": 9},
        {"sha256": victim, "size": 9},
        {"sha256": "0" * 64, "size": 10**15},
        {"sha256": "0" * 64, "size": "9"},
        {"sha256": "0" * 64, "size": -size},
    ]:
        _forge(hub, {WEIGHTS: entry})
        before = digest_tree(world)
        err = _pull_fails(world, "acme/a", hub=hub)
        assert_contained(world, before, err)
        assert isinstance(err, VerificationError), (entry, str(err))


def test_tampered_cache_record_cannot_redirect_files(world: Path, native: Path) -> None:
    """The pull record in a cache entry names its files; a record pointing outside the entry counts as an altered
    entry (fetched again), never as files to link into the output."""
    hub, commit = _local_hub(world, native)
    pull("acme/a", world / "first", hub=hub)
    entry = world / ".lfcache" / "hub" / "local" / "acme" / "a" / commit
    record = json.loads((entry / RECORD).read_text())
    escape = os.path.relpath(world / "victim" / "precious.txt", entry)
    record["files"][escape] = 9
    st = (world / "victim" / "precious.txt").stat()
    record["stat"][escape] = [st.st_size, st.st_mtime_ns]  # as if it were an intact file of the entry
    os.chmod(entry, 0o755)
    (entry / RECORD).chmod(0o644)
    (entry / RECORD).write_text(json.dumps(record))
    before = digest_tree(world, skip=(".lfcache", ".hf", "work"))
    again = pull("acme/a", world / "work" / "out", hub=hub)
    assert not again.cached and escape not in again.files
    assert {p.name for p in (world / "work" / "out").iterdir()} == FILES
    assert digest_tree(world, skip=(".lfcache", ".hf", "work")) == before
