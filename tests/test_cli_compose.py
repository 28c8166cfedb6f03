"""The compose / rescale / inspect --spectrum command lines: outputs, JSON, exit codes, one-line errors, and
nothing written on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraformat.adapter import open_adapter
from loraformat.cli.main import main
from loraformat.conversion import convert
from tests.compose_helpers import listing


def run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop whatever fixtures printed
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_compose_cat_json(peft_adapters, tmp_path, capsys):
    out = tmp_path / "mix.safetensors"
    code, stdout, _ = run(
        capsys,
        "compose",
        peft_adapters["plain"],
        peft_adapters["patterns"],
        "-o",
        out,
        "--method",
        "cat",
        "--weights",
        "-0.7,0.3",
        "--json",
    )
    assert code == 0
    doc = json.loads(stdout)
    assert doc["output"] == str(out) and doc["method"] == "cat" and doc["min_energy_kept"] == 1.0
    assert [p["weight"] for p in doc["parents"]] == [-0.7, 0.3]  # a leading minus is a value, not an option
    meta = open_adapter(out).meta
    assert meta.provenance.method == "cat" and meta.modules["model.layers.1.mlp.down_proj"].rank == 10


def test_compose_svd_auto_reports_energy(peft_adapters, tmp_path, capsys):
    out = tmp_path / "svd.safetensors"
    code, stdout, _ = run(
        capsys,
        "compose",
        peft_adapters["plain"],
        peft_adapters["rslora"],
        "-o",
        out,
        "--method",
        "svd",
        "--rank",
        "auto:0.9",
    )
    assert code == 0 and "energy kept: min 0.9" in stdout and "svd" in stdout
    assert open_adapter(out).meta.provenance.rank == "auto:0.9"


def test_compose_dare_seeded(peft_adapters, tmp_path, capsys):
    hashes = []
    for i, seed in enumerate(("5", "5", "6")):
        code, stdout, _ = run(
            capsys,
            "compose",
            peft_adapters["plain"],
            peft_adapters["rslora"],
            "-o",
            tmp_path / f"d{i}.safetensors",
            "--method",
            "dare_ties",
            "--density",
            "0.5",
            "--seed",
            seed,
            "--rank",
            "4",
            "--json",
        )
        assert code == 0
        hashes.append(json.loads(stdout)["content_hash"])
    assert hashes[0] == hashes[1] != hashes[2]


def test_rescale_json(peft_adapters, tmp_path, capsys):
    out = tmp_path / "small.safetensors"
    code, stdout, _ = run(
        capsys, "rescale", peft_adapters["plain"], "-o", out, "--rank", "4", "--scale", "0.5", "--json"
    )
    assert code == 0
    doc = json.loads(stdout)
    assert doc["parameters_after"] * 2 == doc["parameters_before"]
    assert doc["file_size_after"] == out.stat().st_size < doc["file_size_before"]
    assert all(m["rank_after"] == 4 and 0 < m["energy_kept"] < 1 for m in doc["modules"].values())
    code, stdout, _ = run(
        capsys, "rescale", peft_adapters["plain"], "-o", tmp_path / "a.safetensors", "--alpha", "4"
    )
    assert code == 0 and "0 truncated" in stdout


def test_inspect_spectrum(peft_adapters, capsys):
    code, stdout, _ = run(capsys, "inspect", peft_adapters["patterns"], "--spectrum", "--json")
    assert code == 0
    spectrum = json.loads(stdout)["spectrum"]
    module = spectrum["modules"]["model.layers.1.mlp.down_proj"]
    assert module["rank"] == 2 and len(module["singular_values"]) == 2
    assert set(module["energy"]) == {"4", "8", "16", "32"} and module["energy"]["4"] == 1.0
    code, stdout, _ = run(capsys, "inspect", peft_adapters["plain"], "--spectrum")
    assert code == 0 and "E@4" in stdout and "model.layers.0.self_attn.q_proj" in stdout


@pytest.fixture
def bases_differ(peft_adapters, tmp_path) -> tuple[Path, Path]:
    a, b = tmp_path / "in" / "a.safetensors", tmp_path / "in" / "b.safetensors"
    a.parent.mkdir()
    convert(peft_adapters["plain"], a, base_id="org/one")
    convert(peft_adapters["rslora"], b, base_id="org/two")
    return a, b


def test_different_bases_exit_1_then_force(bases_differ, tmp_path, capsys):
    out = tmp_path / "ab.safetensors"
    code, _, err = run(capsys, "compose", *bases_differ, "-o", out, "--method", "cat")
    assert code == 1 and "different bases" in one_line_error(err) and not out.exists()
    code, stdout, _ = run(capsys, "compose", *bases_differ, "-o", out, "--method", "cat", "--force")
    assert code == 0 and out.exists() and "different bases" in stdout


BAD_COMPOSE = [
    (["--method", "cat", "--weights", "1,2,3"], 2, "3 weights for 2 adapters"),
    (["--method", "cat", "--weights", "1,x"], 2, "comma-separated"),
    (["--method", "svd", "--rank", "0"], 2, "positive integer"),
    (["--method", "svd", "--rank", "-4"], 2, "positive integer"),
    (["--method", "svd", "--rank", "auto:0"], 2, "(0, 1]"),
    (["--method", "svd", "--rank", "auto:1.01"], 2, "(0, 1]"),
    (["--method", "svd", "--rank", "many"], 2, "neither"),
    (["--method", "average"], 2, "unknown method"),
    (["--method", "cat", "--rank", "4"], 2, "does not apply"),
    (["--method", "ties"], 2, "--density"),
    (["--method", "ties", "--density", "1.5"], 2, "--density"),
    (["--method", "cat", "--device", "quantum"], 2, "device"),
]


@pytest.mark.parametrize("args,code,message", BAD_COMPOSE)
def test_compose_bad_input(peft_adapters, tmp_path, capsys, args, code, message):
    work = tmp_path / "work"
    work.mkdir()
    out = work / "x.safetensors"
    got, _, err = run(capsys, "compose", peft_adapters["plain"], peft_adapters["rslora"], "-o", out, *args)
    assert got == code
    assert message in one_line_error(err)
    assert listing(work) == []  # nothing written, not even a temporary


def test_compose_content_errors_exit_1(peft_adapters, llama_base, tmp_path, capsys):
    from tests.fixtures import make_llama_base, make_peft_adapter

    work = tmp_path / "work"
    work.mkdir()
    small = make_llama_base(tmp_path / "small", hidden=32, intermediate=64)
    other = make_peft_adapter(small, tmp_path / "other", r=4, lora_alpha=8, target_modules=["q_proj"])
    for adapters, message in (
        ([peft_adapters["plain"], other], "disagree"),
        ([peft_adapters["plain"], peft_adapters["dora"]], "DoRA"),
    ):
        code, _, err = run(
            capsys, "compose", *adapters, "-o", work / "x.safetensors", "--method", "cat", "--force"
        )
        assert code == 1 and message in one_line_error(err)
    assert listing(work) == []


def test_compose_missing_input_and_existing_output(peft_adapters, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    code, _, err = run(
        capsys, "compose", peft_adapters["plain"], tmp_path / "nope", "-o", out, "--method", "cat"
    )
    assert code == 2 and "no such file" in one_line_error(err) and not out.exists()
    out.write_bytes(b"keep me")
    code, _, err = run(capsys, "compose", peft_adapters["plain"], "-o", out, "--method", "cat")
    assert code == 2 and "already exists" in one_line_error(err) and out.read_bytes() == b"keep me"
    code, _, _ = run(capsys, "compose", peft_adapters["plain"], "-o", out, "--method", "cat", "--overwrite")
    assert code == 0 and open_adapter(out).meta.provenance.method == "cat"


BAD_RESCALE = [
    (["--scale", "2", "--alpha", "4"], 2, "exclusive"),
    (["--rank", "16"], 2, "only lowers ranks"),
    (["--rank", "0"], 2, "positive integer"),
    (["--rank", "auto:2"], 2, "(0, 1]"),
    (["--scale", "0"], 2, "non-zero"),
    (["--alpha", "-1"], 2, "positive"),
    ([], 2, "nothing to do"),
]


@pytest.mark.parametrize("args,code,message", BAD_RESCALE)
def test_rescale_bad_input(peft_adapters, tmp_path, capsys, args, code, message):
    work = tmp_path / "work"
    work.mkdir()
    got, _, err = run(capsys, "rescale", peft_adapters["plain"], "-o", work / "x.safetensors", *args)
    assert got == code and message in one_line_error(err)
    assert listing(work) == []


def test_rescale_dora_exit_1(peft_adapters, tmp_path, capsys):
    code, _, err = run(
        capsys, "rescale", peft_adapters["dora"], "-o", tmp_path / "x.safetensors", "--scale", "2"
    )
    assert code == 1 and "DoRA" in one_line_error(err) and not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("command,needle", [("compose", "PEFT's"), ("rescale", "--scale")])
def test_help_has_examples(capsys, command, needle):
    code, stdout, _ = run(capsys, command, "--help")
    assert code == 0 and "Example" in stdout and needle in stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compose_on_cuda_matches_cpu(peft_adapters, tmp_path, capsys):
    outs = []
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.safetensors"
        code, _, _ = run(
            capsys,
            "compose",
            peft_adapters["plain"],
            peft_adapters["rslora"],
            "-o",
            out,
            "--method",
            "svd",
            "--rank",
            "4",
            "--device",
            device,
        )
        assert code == 0
        outs.append(open_adapter(out))
    for module in outs[0].modules:
        d0 = outs[0].lora_B(module).double() @ outs[0].lora_A(module).double()
        d1 = outs[1].lora_B(module).double() @ outs[1].lora_A(module).double()
        assert float((d0 - d1).norm() / d0.norm()) < 1e-4
