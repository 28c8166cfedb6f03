"""``loraformat extract`` and ``loraformat unmerge`` on the command line: JSON, exit codes, one-line errors."""

from __future__ import annotations

import json

import pytest

import loraformat
from loraformat.cli.main import main
from tests.fixtures import make_llama_base
from tests.merge_helpers import load_dir


def run_cli(args: list[object], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


@pytest.mark.parametrize("command", ["extract", "unmerge"])
def test_help_has_an_example(capsys, command):
    code, out, _ = run_cli([command, "--help"], capsys)
    assert code == 0 and "Example" in out and f"loraformat {command}" in out


def test_extract_then_unmerge_round_trip_on_the_command_line(tmp_path, llama32, peft_adapters, capsys):
    merged = tmp_path / "merged"
    loraformat.merge(llama32, [peft_adapters["plain"]], merged)
    adapter = tmp_path / "x.safetensors"
    code, out, err = run_cli(["extract", llama32, merged, "-o", adapter, "--rank", "8", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert len(report["modules"]) == 14 and report["max_relative_error"] < 1e-4
    assert report["rank"] == 8 and report["targets"] == "all-linear"
    # the extracted adapter, merged into the base, recreates MERGED; unmerging it gives the base back
    remerged, back = tmp_path / "remerged", tmp_path / "back"
    assert run_cli(["merge", llama32, adapter, "-o", remerged], capsys)[0] == 0
    code, out, err = run_cli(["unmerge", remerged, adapter, "-o", back, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["verified"]["merge_record"] == "present"
    base, got = load_dir(llama32), load_dir(back)
    for name in base:
        assert float((got[name] - base[name]).abs().max()) < 1e-5, name


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["--rank", "0"], 2, "positive integer"),
        (["--rank", "auto:1.5"], 2, "energy must be in (0, 1]"),
        (["--rank", "8", "--targets", "nope"], 2, "--targets nope: matches no linear weight"),
        (["--rank", "8", "--min-rank", "9", "--max-rank", "4"], 2, "min-rank"),
    ],
)
def test_bad_arguments_get_one_line_and_exit_2(tmp_path, llama_base, capsys, args, code, needle):
    got, out, err = run_cli(
        ["extract", llama_base, llama_base, "-o", tmp_path / "x.safetensors", *args], capsys
    )
    assert got == code and needle in err and err.count("\n") == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_mismatched_shapes_exit_1_with_one_line(tmp_path, llama_base, capsys):
    other = make_llama_base(tmp_path / "other", hidden=32, layers=2)
    capsys.readouterr()
    code, out, err = run_cli(
        ["extract", llama_base, other, "-o", tmp_path / "x.safetensors", "--rank", "4"], capsys
    )
    assert code == 1 and "in BASE but" in err and err.count("\n") == 1


def test_existing_output_is_not_replaced_without_overwrite(tmp_path, llama_base, capsys):
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"keep")
    code, _, err = run_cli(["extract", llama_base, llama_base, "-o", out, "--rank", "4"], capsys)
    assert code == 2 and "already exists" in err and out.read_bytes() == b"keep"


def test_unmerge_refuses_a_weight_count_mismatch(tmp_path, llama_base, peft_adapters, capsys):
    a = peft_adapters["plain"]
    code, _, err = run_cli(
        ["unmerge", llama_base, a, "-o", tmp_path / "x", "--weight", "1", "--weight", "2"], capsys
    )
    assert code == 2 and "one per adapter" in err


def test_targets_list_and_text_report(tmp_path, llama32, peft_adapters, capsys):
    merged = tmp_path / "merged"
    loraformat.merge(llama32, [peft_adapters["plain"]], merged)
    args = ["extract", llama32, merged, "-o", tmp_path / "q.safetensors", "--rank", "auto:0.99"]
    code, out, err = run_cli([*args, "--targets", "q_proj,v_proj", "--max-rank", "6"], capsys)
    assert code == 0 and "wrote" in out and "4 modules" in out
    assert "10 changed tensors are not in the adapter" in err  # the other projections, named, not dropped
    assert "--max-rank" in err
