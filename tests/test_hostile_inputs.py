"""Malformed and hostile adapter files and PEFT configs through the real CLI: every one ends in a one-line typed
error (exit 1) naming the field, never "internal error" (exit 70), within the limits of spec/v1.md §16; the
largest headers the reader accepts are checked within bounded time and memory."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from loraformat import spec
from loraformat.cli.main import main
from loraformat.constants import METADATA_KEY
from loraformat.io.header import encode_header, read_header
from tests.spec_helpers import document, one_module_adapter

MODULE = "model.layers.0.mlp.up_proj"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return one_module_adapter(
        tmp_path_factory.mktemp("good") / "good.safetensors", out_features=8, in_features=4, rank=2
    )


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and the whole of stdout+stderr of one in-process CLI run."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out + out.err


def native(good: Path, out: Path, raw_doc: str | None = None, metadata: dict[str, str] | None = None) -> Path:
    """``good`` with its metadata document (or whole __metadata__) replaced; the tensors stay as they are."""
    header = read_header(good)
    md = dict(header.metadata)
    if raw_doc is not None:
        md[METADATA_KEY] = raw_doc
    if metadata is not None:
        md = metadata
    order = sorted(header.tensors.values(), key=lambda t: t.start)
    prefix, _ = encode_header([(t.name, t.dtype, t.shape) for t in order], md)
    out.write_bytes(prefix + good.read_bytes()[header.data_start :])
    return out


def raw_file(out: Path, header: bytes, data: bytes = b"") -> Path:
    header += b" " * (-len(header) % 8)
    out.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return out


def doc_text(good: Path, **changes: object) -> str:
    doc = document(good)
    doc.update(changes)
    return json.dumps(doc)


def alpha_text(good: Path, literal: str) -> str:
    doc = document(good)
    doc["modules"][MODULE]["alpha"] = "@ALPHA@"
    return json.dumps(doc).replace('"@ALPHA@"', literal)


NATIVE_CASES = {
    "spec_version of 5000 digits": (lambda g: doc_text(g, spec_version="1" * 5000 + ".0"), "spec_version"),
    "spec_version in circled digits": (lambda g: doc_text(g, spec_version="①.0"), "spec_version"),
    "spec_version with a newline": (lambda g: doc_text(g, spec_version="1.0\n"), "spec_version"),
    "deeply nested document": (
        lambda g: '{"spec_version":"1.0","x":' + "[" * 100_000 + "]" * 100_000 + "}",
        "nested deeper",
    ),
    "nested just past the limit": (
        lambda g: doc_text(g, x=json.loads("[" * 70 + "]" * 70)),
        "nested deeper than 64",
    ),
    "alpha 1e400": (lambda g: alpha_text(g, "1e400"), "alpha"),
    "alpha NaN": (lambda g: alpha_text(g, "NaN"), "alpha"),
    "alpha Infinity": (lambda g: alpha_text(g, "Infinity"), "alpha"),
    "alpha -Infinity": (lambda g: alpha_text(g, "-Infinity"), "alpha"),
    "alpha of 400 digits": (lambda g: alpha_text(g, "1" + "0" * 400), "alpha"),
    "lone surrogate in the name": (lambda g: doc_text(g).replace('"worked-example"', '"\\ud800"'), "name"),
    "too many modules": (
        lambda g: doc_text(g, modules={f"m{i}": {} for i in range(spec.MAX_MODULES + 1)}),
        "modules, above the limit",
    ),
}


@pytest.mark.parametrize("case", sorted(NATIVE_CASES))
def test_malformed_metadata_document_is_a_typed_error(
    good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    build, field = NATIVE_CASES[case]
    path = native(good, tmp_path / "bad.safetensors", raw_doc=build(good))
    code, out = cli(["validate", str(path)], capsys)
    assert code == 1 and "internal error" not in out and field in out, out
    code, out = cli(["inspect", str(path)], capsys)
    assert code == 1 and "internal error" not in out and len(out.strip().splitlines()) == 1, out
    assert field in out, out


HEADER_CASES = {
    "shape product overflows a float": (
        {"t": {"dtype": "F32", "shape": [10**300, 10**300], "data_offsets": [0, 0]}},
        "bytes for shape",
    ),
    "shape of 9 dimensions": (
        {"t": {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}},
        "at most 8",
    ),
    "offsets beyond 64 bits": (
        {"t": {"dtype": "F32", "shape": [1], "data_offsets": [2**70, 2**70 + 4]}},
        "t",
    ),
    "metadata value with a lone surrogate": ({"__metadata__": {"format": "\ud800"}}, "surrogate"),
    "too many metadata keys": (
        {"__metadata__": {f"k{i}": "" for i in range(spec.MAX_METADATA_KEYS + 1)}},
        "keys, above the limit",
    ),
    "too many tensors": (
        {
            f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
            for i in range(spec.MAX_TENSORS + 1)
        },
        "above the limit",
    ),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_malformed_header_is_a_typed_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    header, fragment = HEADER_CASES[case]
    text = json.dumps(header).encode("utf-8", "surrogatepass")
    path = raw_file(tmp_path / "bad.safetensors", text, b"\0" * 4)
    code, out = cli(["validate", str(path)], capsys)
    assert code == 1 and "internal error" not in out and fragment in out, out


def peft_dir(good: Path, root: Path, config_text: str) -> Path:
    """A PEFT-layout adapter (no loraformat metadata) with the given adapter_config.json text."""
    header = read_header(good)
    order = sorted(header.tensors.values(), key=lambda t: t.start)
    prefix, _ = encode_header([(t.name, t.dtype, t.shape) for t in order], {"format": "pt"})
    root.mkdir()
    (root / "adapter_model.safetensors").write_bytes(prefix + good.read_bytes()[header.data_start :])
    (root / "adapter_config.json").write_text(config_text)
    return root


def config(**fields: object) -> str:
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 16, "target_modules": ["up_proj"]}
    return json.dumps({**base, **fields})


PEFT_CASES = {
    "lora_alpha 1e400": (config().replace('"lora_alpha": 16', '"lora_alpha": 1e400'), "lora_alpha"),
    "lora_alpha NaN": (config(lora_alpha=float("nan")), "lora_alpha"),
    "lora_alpha Infinity": (config(lora_alpha=float("inf")), "lora_alpha"),
    "lora_alpha of 400 digits": (config(lora_alpha=10**400), "lora_alpha"),
    "alpha_pattern NaN": (config(alpha_pattern={"up_proj": float("nan")}), "alpha_pattern"),
    "base model with a lone surrogate": (
        config().replace('"LORA"', '"LORA", "base_model_name_or_path": "\\ud800"'),
        "base_model_name_or_path",
    ),
    "nested config": ('{"peft_type": "LORA", "x": ' + "[" * 50_000 + "]" * 50_000 + "}", "nested"),
    "pattern repeat count past the engine limit": (config(rank_pattern={"a{4294967296}": 4}), "rank_pattern"),
    "pattern repeat count of 10^8": (config(rank_pattern={"a{99999999}": 4}), "repetition"),
    "thousands of nested groups": (
        config(rank_pattern={"(" * 3000 + "a" + ")" * 3000: 4}),
        "characters long",
    ),
    "20,000 pattern keys": (
        config(rank_pattern={f"k{i}x": 4 for i in range(20_000)}),
        "keys, above the limit",
    ),
    "backreference": (config(rank_pattern={r"(up)\1": 4}), "backreferences"),
    "lookahead": (config(rank_pattern={r"(?=up)up_proj": 4}), "lookaround"),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_malformed_peft_config_is_a_typed_error(
    good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    text, field = PEFT_CASES[case]
    adapter = peft_dir(good, tmp_path / "peft", text)
    code, out = cli(["convert", str(adapter), "-o", str(tmp_path / "out.safetensors")], capsys)
    assert code == 1 and "internal error" not in out and field in out, out
    assert len(out.strip().splitlines()) == 1 and not (tmp_path / "out.safetensors").exists()
    code, out = cli(["validate", str(adapter)], capsys)
    assert code == 1 and "internal error" not in out, out


def test_catastrophic_pattern_keys_resolve_quickly(
    good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Keys that make a backtracking engine run for minutes on a matching-looking path cost nothing here."""
    import time

    evil = {"(a|aa)+c": 3, "(x+x+)+y": 5, "(.*a){25}": 6, r"(\w+\.?)+z": 7, "(" * 450 + "b" + ")" * 450: 8}
    name = "base_model.model." + "a" * 60 + ".lora_A.weight"  # a module path crafted to backtrack
    header = read_header(good)
    tensors = sorted(header.tensors.values(), key=lambda t: t.start)
    renamed = [
        (t.name.replace(f"base_model.model.{MODULE}", name.rsplit(".lora_A", 1)[0]), t.dtype, t.shape)
        for t in tensors
    ]
    prefix, _ = encode_header(renamed, {"format": "pt"})
    root = tmp_path / "peft"
    root.mkdir()
    (root / "adapter_model.safetensors").write_bytes(prefix + good.read_bytes()[header.data_start :])
    (root / "adapter_config.json").write_text(config(rank_pattern=evil))
    started = time.process_time()
    code, out = cli(["validate", str(root)], capsys)
    assert time.process_time() - started < 2 and "internal error" not in out, out


PROBE = """
import json, resource, sys
from loraformat.cli.main import main
try:
    main(["validate", sys.argv[1]])
except SystemExit as exc:
    code = exc.code
usage = resource.getrusage(resource.RUSAGE_SELF)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"code": code, "cpu": usage.ru_utime + usage.ru_stime, "mib": hwm / 1024}), file=sys.stderr)
"""


@pytest.mark.parametrize("case", ["tensors", "metadata"])
def test_largest_accepted_headers_stay_bounded(tmp_path: Path, case: str) -> None:
    """At the caps, a 100 MB header: validate (a fresh process, VmHWM is its own) stays under 512 MiB and a
    few CPU seconds (spec/v1.md §16 promises 2 s; the bound here leaves room for a loaded CI machine)."""
    if case == "tensors":
        parts = [
            f'"t{i:07d}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(spec.MAX_TENSORS)
        ]
        header = ("{" + ",".join(parts) + "}").encode()
    else:
        value = "v" * 9_900
        header = json.dumps(
            {"__metadata__": {f"k{i}": value for i in range(spec.MAX_METADATA_KEYS)}}
        ).encode()
    path = raw_file(tmp_path / "big.safetensors", header)
    del header
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=120
    )
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    assert stats["code"] == 1 and "internal error" not in proc.stdout + proc.stderr  # no adapter in it
    assert stats["mib"] < 512 and stats["cpu"] < 6, stats


def test_the_largest_pattern_config_validates_quickly(
    good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """10,000 regex keys of the maximal length (the caps), none matching: compiling every one of them under
    Python's re took 25 s; keys are now compiled only as the search reaches them, within one budget."""
    import time

    keys = {
        ("(a|b)*" * 200)[: spec.MAX_PATTERN_LENGTH - 8] + f"x{i}": 2 for i in range(spec.MAX_PATTERN_KEYS)
    }
    adapter = peft_dir(good, tmp_path / "peft", config(rank_pattern=keys))
    started = time.process_time()
    code, out = cli(["validate", str(adapter)], capsys)
    assert time.process_time() - started < 2 and code in (0, 1) and "internal error" not in out, out
