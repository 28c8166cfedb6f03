"""``loraformat push / pull / list`` as real processes: exit codes, JSON output, one-line errors, and the token
never printed. The Hugging Face Hub cases configure huggingface_hub the way users do, through the environment
(HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE, HF_HUB_DISABLE_XET), read when the process imports it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.hub_helpers import (
    BAD_TOKEN,
    BASE_ID,
    GOOD_TOKEN,
    TOKENS,
    closed_port_url,
    make_native,
    run_cli,
    subprocess_env,
)
from tests.hub_server import HubServer


@pytest.fixture(scope="module")
def native(
    peft_adapters: dict[str, Path], llama_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("native") / "plain.safetensors"
    return make_native(peft_adapters["plain"], out, base=llama_base, base_id=BASE_ID)


@pytest.fixture
def server(tmp_path: Path):
    with HubServer(tmp_path / "server", tokens=TOKENS) as srv:
        yield srv


def _one_error_line(proc) -> str:  # noqa: ANN001 - CompletedProcess
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_local_hub_push_pull_list(native: Path, tmp_path: Path) -> None:
    env = subprocess_env(tmp_path, LORAFORMAT_HUB=str(tmp_path / "hub"))
    pushed = run_cli(["push", str(native), "acme/plain", "--tag", "v1", "--no-validate", "--json"], env)
    assert pushed.returncode == 0, pushed.stderr
    result = json.loads(pushed.stdout)
    assert result["tag"] == "v1" and result["created"] and len(result["commit"]) == 64

    pulled = run_cli(["pull", "acme/plain", "-o", str(tmp_path / "out"), "-r", "v1"], env)
    assert pulled.returncode == 0, pulled.stderr
    assert f"commit {result['commit'][:12]}" in pulled.stdout and "verified" in pulled.stdout
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == native.read_bytes()

    again = run_cli(["pull", "acme/plain", "-o", str(tmp_path / "out"), "-r", "v1"], env)
    assert again.returncode == 2 and "already exists" in _one_error_line(again)
    cached = run_cli(
        [
            "pull",
            f"lfhub://{tmp_path / 'hub'}/acme/plain@v1",
            "-o",
            str(tmp_path / "out"),
            "--overwrite",
            "--json",
        ],
        {**env, "LORAFORMAT_HUB": ""},
    )
    assert cached.returncode == 0, cached.stderr
    assert json.loads(cached.stdout)["cached"] is True

    listed = run_cli(["list", "--json"], env)
    assert listed.returncode == 0
    assert json.loads(listed.stdout)[0]["tags"] == {"v1": result["commit"]}
    human = run_cli(["list"], env)
    assert "acme/plain" in human.stdout and "tag    v1" in human.stdout

    for args, code, text in (
        (["pull", "acme/none", "-o", str(tmp_path / "x")], 3, "not found"),
        (["pull", "acme/plain", "-o", str(tmp_path / "x"), "-r", "v9"], 3, "revision 'v9'"),
        (["pull", "bad id", "-o", str(tmp_path / "x")], 2, "ORG/NAME"),
        (["push", str(tmp_path / "nope.safetensors"), "acme/plain"], 2, "no such file"),
    ):
        proc = run_cli(args, env)
        assert proc.returncode == code and text in _one_error_line(proc), proc.stderr

    inspected = run_cli(["inspect", "lfhub://acme/plain@v1"], env)  # other commands take hub references
    assert inspected.returncode == 0, inspected.stderr


def test_push_validates_first(native: Path, tmp_path: Path) -> None:
    from tests.hub_helpers import make_nan_adapter

    bad = make_nan_adapter(native, tmp_path / "nan.safetensors")
    env = subprocess_env(tmp_path, LORAFORMAT_HUB=str(tmp_path / "hub"))
    proc = run_cli(["push", str(bad), "acme/nan"], env)
    assert proc.returncode == 1 and "refusing to push an invalid adapter" in _one_error_line(proc)
    assert not (tmp_path / "hub" / "repos" / "acme" / "nan").exists()


def test_hugging_face_hub_through_the_environment(native: Path, server: HubServer, tmp_path: Path) -> None:
    env = subprocess_env(tmp_path, HF_ENDPOINT=server.url, HF_TOKEN=GOOD_TOKEN)
    pushed = run_cli(
        [
            "--quiet",
            "push",
            str(native),
            "acme/plain",
            "--tag",
            "v1",
            "-m",
            "first release",
            "--no-validate",
            "--json",
        ],
        env,
    )
    assert pushed.returncode == 0, pushed.stderr
    commit = json.loads(pushed.stdout)["commit"]
    assert server.repos["acme/plain"].commits[commit].message == "first release"
    assert not pushed.stderr.strip()  # --quiet: no huggingface_hub progress bars or chatter

    pulled = run_cli(["pull", "hf://acme/plain@v1", "-o", str(tmp_path / "out"), "--json"], env)
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads(pulled.stdout)["commit"] == commit
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == native.read_bytes()
    by_commit = run_cli(
        ["pull", "acme/plain", "--hub", server.url, "-r", commit, "-o", str(tmp_path / "c")], env
    )
    assert by_commit.returncode == 0 and "from the cache" in by_commit.stdout

    missing = run_cli(["pull", "acme/missing", "-o", str(tmp_path / "x")], env)
    assert missing.returncode == 3 and "repository not found" in _one_error_line(missing)
    no_rev = run_cli(["pull", "hf://acme/plain@nope", "-o", str(tmp_path / "x")], env)
    assert no_rev.returncode == 3 and "revision 'nope' not found" in _one_error_line(no_rev)


def test_bad_token_offline_and_unreachable(native: Path, server: HubServer, tmp_path: Path) -> None:
    env = subprocess_env(tmp_path, HF_ENDPOINT=server.url, HF_TOKEN=BAD_TOKEN)
    for args in (
        ["pull", "acme/plain", "-o", str(tmp_path / "x")],
        ["--debug", "push", str(native), "acme/plain", "--no-validate"],
    ):
        proc = run_cli(args, env)
        assert proc.returncode == 4, proc.stderr
        assert BAD_TOKEN not in proc.stdout + proc.stderr
        if "--debug" not in args:
            assert "access refused (HTTP 401)" in _one_error_line(proc)

    offline = run_cli(
        ["pull", "acme/plain", "-o", str(tmp_path / "x")],
        subprocess_env(tmp_path, HF_ENDPOINT=server.url, HF_HUB_OFFLINE="1"),
    )
    assert offline.returncode == 5 and "offline mode" in _one_error_line(offline)

    dead = subprocess_env(tmp_path, HF_ENDPOINT=closed_port_url(), HF_TOKEN=GOOD_TOKEN)
    for args in (
        ["pull", "hf://acme/plain@v1", "-o", str(tmp_path / "x")],
        ["push", str(native), "acme/plain", "--no-validate"],
    ):
        proc = run_cli(args, dead)
        assert proc.returncode == 5 and "cannot reach" in _one_error_line(proc), proc.stderr
    assert not (tmp_path / "x").exists()


def test_help_has_examples() -> None:
    from click.testing import CliRunner

    from loraformat.cli.main import cli

    for command in ("push", "pull", "list"):
        result = CliRunner().invoke(cli, [command, "--help"])
        assert (
            result.exit_code == 0 and "Example" in result.output and f"loraformat {command}" in result.output
        )
