"""convert, library and CLI: stamping, ModelSpec keys, content hash, exit codes, outputs never partial, inputs
never modified."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from loraformat.adapter import open_adapter
from loraformat.base import target_tensors
from loraformat.cli.main import cli
from loraformat.constants import METADATA_KEY, PEFT_CONFIG, PEFT_WEIGHTS
from loraformat.conversion import convert
from loraformat.errors import BaseMismatchError, OutputExistsError, UsageError
from loraformat.hashing import hash_base
from loraformat.io.header import read_header
from tests.fixtures import make_llama_base

EXE = shutil.which("loraformat")


def snapshot(path: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file under path (or of path itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f): (f.read_bytes(), f.stat().st_mtime_ns) for f in files}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True)


def test_convert_cli_json_and_file_contents(peft_adapters, llama_base, tmp_path):
    src = peft_adapters["patterns"]
    before = snapshot(src) | snapshot(llama_base)
    out = tmp_path / "a.safetensors"
    res = CliRunner().invoke(
        cli,
        [
            "convert",
            str(src),
            "-o",
            str(out),
            "--base",
            str(llama_base),
            "--base-id",
            "org/tiny-llama",
            "--name",
            "pat",
            "--license",
            "mit",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["output"] == str(out) and report["to"] == "loraformat" and report["base_stamped"] is True
    assert report["modules"] == 6 and report["source_format"] == "peft"
    assert snapshot(src) | snapshot(llama_base) == before  # inputs untouched, not even their mtime

    header = read_header(out)
    md = header.metadata
    assert md["format"] == "pt"
    for key in (
        "modelspec.sai_model_spec",
        "modelspec.architecture",
        "modelspec.title",
        "modelspec.date",
        "modelspec.hash_sha256",
        "modelspec.implementation",
    ):
        assert key in md, key
    assert md["modelspec.architecture"] == "tiny-llama/lora" and md["modelspec.title"] == "pat"
    data = out.read_bytes()[header.data_start :]
    content = hashlib.sha256(data).hexdigest()
    doc = json.loads(md[METADATA_KEY])
    assert content == report["content_hash"] == doc["content_hash"] == md["modelspec.hash_sha256"][2:]
    assert md["modelspec.hash_sha256"] == "0x" + content
    assert doc["created"] == md["modelspec.date"] and doc["license"] == "mit"
    assert doc["created_by"]["tool"] == "loraformat"
    assert doc["provenance"]["method"] == "convert" and doc["provenance"]["source_format"] == "peft"


def test_base_stamp_is_exact(peft_adapters, llama_base, tmp_path):
    out = tmp_path / "a.safetensors"
    convert(peft_adapters["layers"], out, base=llama_base, base_id="org/tiny")
    meta = open_adapter(out).meta
    hashes = hash_base(llama_base)
    bm = meta.base_model
    assert bm.id == "org/tiny"
    assert (bm.structure_hash, bm.content_hash, bm.hash_algorithm) == (
        hashes.structure_hash,
        hashes.content_hash,
        hashes.algorithm,
    )
    targets = ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"]
    assert sorted(bm.target_digests) == targets == target_tensors(meta)
    assert bm.target_digests == {t: hashes.tensor_digests[t] for t in targets}


def test_without_base_nothing_is_stamped(peft_adapters, tmp_path):
    out = tmp_path / "a.safetensors"
    convert(peft_adapters["plain"], out)
    bm = open_adapter(out).meta.base_model
    assert bm.structure_hash is None and bm.content_hash is None and bm.target_digests == {}
    assert bm.id and bm.id.endswith("llama")  # base_model_name_or_path from the PEFT config


def test_existing_output_is_left_untouched(peft_adapters, tmp_path):
    out = tmp_path / "a.safetensors"
    out.write_bytes(b"precious")
    before = snapshot(out)
    proc = run("convert", str(peft_adapters["plain"]), "-o", str(out))
    assert proc.returncode == 2
    assert proc.stderr == f"error: {out}: already exists (use --overwrite to replace it)\n"
    assert snapshot(out) == before
    assert run("convert", str(peft_adapters["plain"]), "-o", str(out), "--overwrite").returncode == 0
    assert open_adapter(out).meta.name == "plain"
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]  # no temporaries left

    peft_out = tmp_path / "dir"
    peft_out.mkdir()
    (peft_out / "keep").write_text("x")
    with pytest.raises(OutputExistsError):
        convert(out, peft_out, to="peft")
    assert sorted(os.listdir(peft_out)) == ["keep"]
    convert(out, peft_out, to="peft", overwrite=True)
    assert sorted(os.listdir(peft_out)) == [PEFT_CONFIG, PEFT_WEIGHTS]


def test_output_may_not_overwrite_input(peft_adapters, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(peft_adapters["plain"], src)
    before = snapshot(src)
    for dst, to in ((src, "peft"), (src / PEFT_WEIGHTS, "loraformat"), (tmp_path, "peft")):
        with pytest.raises(UsageError, match="inputs are never modified"):
            convert(src, dst, to=to, overwrite=True)
    native = tmp_path / "n.safetensors"
    convert(src, native)
    with pytest.raises(UsageError):
        convert(native, native, overwrite=True)
    assert snapshot(src) == before


def test_base_mismatch_exit_1_and_no_output(peft_adapters, gpt2_base, tmp_path):
    out = tmp_path / "a.safetensors"
    proc = run("convert", str(peft_adapters["plain"]), "-o", str(out), "--base", str(gpt2_base))
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "does not fit base" in proc.stderr and "model.layers.0" in proc.stderr
    assert not out.exists() and os.listdir(tmp_path) == []


def test_resized_saved_tensor_is_a_base_mismatch(peft_adapters, tmp_path):
    other = make_llama_base(tmp_path / "vocab300", vocab=300)  # lm_head (300, 64) vs the saved (256, 64)
    with pytest.raises(BaseMismatchError, match="saved|lm_head"):
        convert(peft_adapters["modules_to_save"], tmp_path / "a.safetensors", base=other)
    assert not (tmp_path / "a.safetensors").exists()


def test_restamp_against_another_structure_refused(peft_adapters, llama_base, tmp_path):
    stamped = tmp_path / "a.safetensors"
    convert(peft_adapters["plain"], stamped, base=llama_base)
    other = make_llama_base(tmp_path / "wide", intermediate=192)  # q_proj fits, the MLP does not
    with pytest.raises(BaseMismatchError):
        convert(stamped, tmp_path / "b.safetensors", base=other)


def test_native_to_native_keeps_metadata(peft_adapters, llama_base, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    convert(peft_adapters["dora"], a, base=llama_base, name="first")
    convert(a, b, description="second pass")
    ma, mb = open_adapter(a).meta, open_adapter(b).meta
    assert mb.name == "first" and mb.description == "second pass"
    assert mb.base_model.to_dict() == ma.base_model.to_dict() and mb.modules == ma.modules
    assert mb.created == ma.created and mb.content_hash == ma.content_hash


def test_write_failure_leaves_nothing(peft_adapters, tmp_path):
    """A file size limit below the output size: exit 2, one line, nothing under the output name."""
    out = tmp_path / "a.safetensors"
    code = (
        "import resource, sys; from loraformat.cli.main import main; "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
        f"main(['convert', {str(peft_adapters['plain'])!r}, '-o', {str(out)!r}])"
    )
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr
        == f"error: {out}: write failed: file too large (size limit reached); nothing was left behind\n"
    )
    assert os.listdir(tmp_path) == []


def test_usage_errors(tmp_path):
    assert run("convert", str(tmp_path / "missing"), "-o", str(tmp_path / "x")).returncode == 2
    proc = run("convert", str(tmp_path), "-o", str(tmp_path / "x"), "--to", "onnx")
    assert proc.returncode == 2
    with pytest.raises(UsageError, match="--to"):
        convert(tmp_path, tmp_path / "x", to="onnx")
