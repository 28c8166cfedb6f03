"""The rules several commands share (loraformat/rules.py): one strictness for "the output may not be an input",
one wording for "first problem and N more", one device resolution."""

from __future__ import annotations

import os
import shutil

import pytest

from loraformat.composition import compose
from loraformat.errors import UsageError
from loraformat.rules import and_more, check_not_an_input, first_problem, resolve_device


def test_output_inside_or_around_an_input_is_refused(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.safetensors").write_bytes(b"x")
    link = tmp_path / "link.safetensors"
    link.symlink_to(d / "a.safetensors")
    for out in (d, d / "out.safetensors", tmp_path, link, tmp_path / "x" / ".." / "in"):
        with pytest.raises(UsageError, match="inputs are never modified"):
            check_not_an_input(out, [d / "a.safetensors", d])
    check_not_an_input(tmp_path / "elsewhere", [d])  # a sibling is fine


def test_compose_refuses_an_output_inside_an_input_directory(peft_adapters, tmp_path):
    """compose compared the output with each input path only for equality: an output written into a PEFT
    adapter's directory, or reached through a symlink, slipped through."""
    src = tmp_path / "peft"
    shutil.copytree(peft_adapters["plain"], src)
    before = sorted(os.listdir(src))
    with pytest.raises(UsageError, match="inputs are never modified"):
        compose([src, peft_adapters["rslora"]], src / "composed.safetensors", method="cat")
    assert sorted(os.listdir(src)) == before
    alias = tmp_path / "alias"
    alias.symlink_to(src)
    with pytest.raises(UsageError, match="inputs are never modified"):
        compose([alias, peft_adapters["rslora"]], src, method="cat", overwrite=True)
    assert sorted(os.listdir(src)) == before


def test_problem_summaries_say_how_many_more():
    problems = [("c", "m.q", "first"), ("c", "m.k", "second"), ("c", "m.v", "third")]
    assert first_problem(problems) == "m.q: first (and 2 more)"
    assert first_problem(problems[:1]) == "m.q: first"
    assert and_more(1) == "" and and_more(4) == " (and 3 more)"


def test_device_resolution():
    assert resolve_device("CPU ") == "cpu"
    assert resolve_device("auto") in ("cpu",) or resolve_device("auto").startswith("cuda:")
    assert resolve_device("cpu-staged", staged=True) == "cpu-staged"
    for bad, match in (("cpu-staged", "auto, cpu, cuda"), ("tpu", "--device must be"), ("cuda:x", "cuda")):
        with pytest.raises(UsageError, match=match):
            resolve_device(bad)


def test_sizes_parse_like_the_hub_client_and_in_binary_units():
    from loraformat.rules import parse_size

    assert (
        parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 500 * 10**6 and parse_size("10KB") == 10**4
    )
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("1.5gb") == 1_500_000_000
    assert parse_size("1000000") == 10**6 and parse_size(123) == 123
    for bad in ("", "GB", "5 XB", "-1GB", "1e9"):
        with pytest.raises(ValueError):
            parse_size(bad)
