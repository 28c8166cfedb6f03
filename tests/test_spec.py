"""The spec <-> schema <-> code mirror: what spec/v1.md names, the schema defines and metadata.py writes agree;
real converted adapters validate; the built-in schema evaluator agrees with jsonschema; header-only commands
never import torch."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loraformat import spec
from loraformat.constants import (
    BIAS_MODES,
    HASH_ALGORITHM,
    METADATA_KEY,
    MODELSPEC_VERSION,
    MODULE_KINDS,
    PEFT_PREFIX,
    SPEC_VERSION,
    ScalingRule,
)
from loraformat.conversion import convert
from loraformat.hashing import content_hash_of, structure_hash_of, tensor_digest
from loraformat.io.header import TensorInfo, read_header
from loraformat.metadata import AdapterMetadata, BaseModel, ModuleEntry, Parent, Provenance
from loraformat.schema import jsonschema_validator, load_schema, violations
from tests.spec_helpers import document, one_module_adapter

ROOT = Path(__file__).resolve().parent.parent
SPEC = (ROOT / "spec" / "v1.md").read_text("utf-8")
SCHEMA = load_schema()


def full_metadata() -> AdapterMetadata:
    """Every optional part filled in, so to_dict emits every property."""
    return AdapterMetadata(
        modules={
            "m.q": ModuleEntry("linear", 8, 16, 64, 64, "m.q.weight"),
            "m.c": ModuleEntry("conv", 4, 8, 3, 16, "m.c.weight", kernel_size=[3, 3]),
        },
        modules_to_save=["lm_head"],
        saved_tensors={"base_model.model.lm_head.weight": "lm_head.weight"},
        description="d",
        task="CAUSAL_LM",
        license="mit",
        created_by={"tool": "t", "version": "1"},
        base_model=BaseModel("org/x", "main", "a" * 64, "b" * 64, HASH_ALGORITHM, {"m.q.weight": "c" * 64}),
        provenance=Provenance(
            "cat", [Parent("d" * 64, 0.5, "p")], rank=12, source_format="loraformat", details={"k": 1}
        ),
        content_hash="e" * 64,
    )


# --- mirror ----------------------------------------------------------------------------------------------------


def test_schema_is_valid_2020_12() -> None:
    import jsonschema

    assert SCHEMA["$schema"].endswith("2020-12/schema")
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_every_schema_property_is_written_by_the_code_and_named_in_the_spec() -> None:
    d = full_metadata().to_dict()
    assert set(SCHEMA["properties"]) == set(d)
    defs = SCHEMA["$defs"]
    assert set(defs["module"]["properties"]) == set(d["modules"]["m.c"])
    assert set(defs["base_model"]["properties"]) == set(d["base_model"])
    assert set(defs["provenance"]["properties"]) == set(d["provenance"])
    assert set(defs["parent"]["properties"]) == set(d["provenance"]["parents"][0])
    names = (
        set(SCHEMA["properties"]) | set(defs["module"]["properties"]) | set(defs["base_model"]["properties"])
    )
    names |= set(defs["provenance"]["properties"]) | set(defs["parent"]["properties"])
    for name in sorted(names):
        assert f"`{name}`" in SPEC, f"spec/v1.md does not name `{name}`"
    assert not violations(d)


def test_schema_descriptions_name_existing_spec_sections() -> None:
    headings = set(re.findall(r"^#+ (?:\d+\. )?(.+?)\s*$", SPEC, re.M))
    cited = set(
        re.findall(r"§([A-Za-z][A-Za-z /'-]+?)(?=[,.;:)\x22])", json.dumps(SCHEMA, ensure_ascii=False))
    )
    assert cited, "the schema cites no spec section"
    for section in cited:
        assert section.strip() in headings, f"schema cites §{section} but spec/v1.md has no such heading"
    for prop, sub in SCHEMA["properties"].items():
        assert "§" in sub.get("description", ""), f"schema property {prop} has no spec section"


def test_spec_constants_appear_in_the_spec() -> None:
    for text in (
        SPEC_VERSION,
        METADATA_KEY,
        PEFT_PREFIX,
        ScalingRule.STANDARD,
        ScalingRule.RSLORA,
        HASH_ALGORITHM,
        MODELSPEC_VERSION,
        *MODULE_KINDS,
        *BIAS_MODES,
        "loraformat-tensor/1",
        "modelspec.hash_sha256",
        "modelspec.architecture",
        "modelspec.title",
        "modelspec.date",
        "modelspec.sai_model_spec",
        "format",
    ):
        assert text in SPEC, text


def test_spec_example_document_is_valid() -> None:
    block = SPEC.split("<!-- example-document -->", 1)[1]
    doc = json.loads(re.search(r"```json\n(.*?)```", block, re.S).group(1))
    assert not violations(doc)
    assert not list(jsonschema_validator().iter_errors(doc))
    assert AdapterMetadata.from_dict(doc).to_dict() == doc


def test_spec_hashing_examples_match_the_code() -> None:
    """The worked hashing example in the spec is computed by the code, byte for byte."""
    data = bytes.fromhex("0000803f00000040")  # float32 [1.0, 2.0]
    digest = tensor_digest("w", "F32", (2,), data)
    assert digest in SPEC
    info = TensorInfo("w", "F32", (2,), 0, 8)
    assert structure_hash_of([info]) in SPEC
    assert content_hash_of([digest]) in SPEC


# --- real files ------------------------------------------------------------------------------------------------


def test_converted_adapters_validate_against_the_schema(peft_adapters, base_of, tmp_path: Path) -> None:
    reference = jsonschema_validator()
    for name, path in peft_adapters.items():
        out = tmp_path / f"{name}.safetensors"
        convert(path, out, base=base_of(name), base_id=f"test/{name}")
        doc = document(out)
        assert not list(reference.iter_errors(doc)), name
        assert not violations(doc), name
        raw = read_header(out).metadata
        assert raw["format"] == "pt" and raw["modelspec.hash_sha256"] == "0x" + doc["content_hash"]
        assert raw["modelspec.architecture"].endswith("/lora")


def test_worked_example_numbers(tmp_path: Path) -> None:
    from loraformat.inspection import inspect

    d = inspect(one_module_adapter(tmp_path / "ex.safetensors", out_features=512, in_features=64, rank=8))
    assert d["parameters"]["summary"] == "4,608 vs 32,768: 86% fewer"
    assert "4,608" in SPEC and "32,768" in SPEC and "86%" in SPEC


# --- built-in evaluator == jsonschema --------------------------------------------------------------------------

_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(-2, 2, allow_nan=False),
    st.sampled_from(["", "x", "1.0", "2.0", "conv", "linear", "alpha/r", "a" * 64, "Z"]),
    st.just([]),
    st.just({}),
    st.just([3, 3]),
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


BASE_DOC = full_metadata().to_dict()
ALL_PATHS = [p for p in _paths(BASE_DOC) if p]


@settings(max_examples=400, deadline=None)
@given(
    edits=st.lists(
        st.tuples(st.sampled_from(ALL_PATHS), st.sampled_from(["set", "del"]), _values),
        min_size=1,
        max_size=3,
    )
)
def test_builtin_evaluator_agrees_with_jsonschema(edits) -> None:
    doc = copy.deepcopy(BASE_DOC)
    for path, op, value in edits:
        node = doc
        try:
            for key in path[:-1]:
                node = node[key]
            if op == "del" and isinstance(node, dict):
                node.pop(path[-1], None)
            else:
                node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    reference = bool(list(jsonschema_validator().iter_errors(doc)))
    assert bool(violations(doc)) == reference, (edits, violations(doc))


# --- no torch on the header-only path ------------------------------------------------------------------------


def _torch_imported(code: str) -> bool:
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    marker = [line for line in run.stderr.splitlines() if line.startswith("TORCH=")]
    assert marker, run.stderr
    return marker[-1] == "TORCH=True"


def test_import_and_header_commands_do_not_import_torch(peft_adapters, tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import loraformat.cli.main"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines() if "|" in line}
    assert "loraformat.cli.main" in imported and "torch" not in imported
    native = one_module_adapter(tmp_path / "ex.safetensors")
    for args in (
        ["validate", "--level", "header", str(native), str(peft_adapters["plain"])],
        ["inspect", str(native)],
        ["inspect", str(peft_adapters["dora"]), "--json"],
    ):
        code = (
            "import sys\nfrom loraformat.cli.main import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('TORCH=' + str('torch' in sys.modules), file=sys.stderr)"
        )
        assert not _torch_imported(code), args
    # the data level (validate's default) reads every tensor's bits with numpy: no torch either
    probe = "\nprint('TORCH=' + str('torch' in sys.modules), file=sys.stderr)"
    code = (
        f"import sys\nfrom loraformat.validation import validate\nvalidate({str(native)!r}, level='data')"
        + probe
    )
    assert not _torch_imported(code)
    # the check can fail: the torch kernel does import torch
    assert _torch_imported("import sys\nimport loraformat.ops.kernel_torch" + probe)


@pytest.mark.parametrize("version,ok", [("1.0", True), ("1.9", True), ("2.0", False), ("0.9", False)])
def test_versioning_rule(version: str, ok: bool) -> None:
    from loraformat.errors import UnsupportedVersionError

    if ok:
        assert spec.check_version(version)[0] == 1
    else:
        with pytest.raises(UnsupportedVersionError):
            spec.check_version(version)


# --- code locations --------------------------------------------------------------------------------------------

#: `loraformat/x.py` optionally followed by backticked names: `a`, `b` (a table cell or a sentence)
_LOCATION = re.compile(r"`(loraformat/[\w/]+\.py)`((?:(?:,| and)? `[A-Za-z_][\w.]*`)*)")


def _top_level_names(path: Path) -> set[str]:
    import ast

    names: set[str] = set()
    for node in ast.parse(path.read_text("utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
            for t in node.targets:
                if isinstance(t, ast.Tuple):
                    names.update(e.id for e in t.elts if isinstance(e, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def spec_code_locations() -> list[tuple[str, str, str]]:
    """(spec file, code file, name or "") for every code location any spec/ document names."""
    out = []
    for doc in sorted((ROOT / "spec").rglob("*.md")):
        for m in _LOCATION.finditer(doc.read_text("utf-8")):
            names = re.findall(r"`([A-Za-z_][\w.]*)`", m.group(2))
            out += [(doc.name, m.group(1), n) for n in names] or [(doc.name, m.group(1), "")]
    return out


def test_every_code_location_the_spec_names_exists() -> None:
    locations = spec_code_locations()
    assert len(locations) > 20  # the pattern still finds the spec's pointers
    missing = []
    for doc, file, name in locations:
        path = ROOT / file
        if not path.is_file():
            missing.append(f"{doc}: {file}")
        elif name and name.split(".")[0] not in _top_level_names(path):
            missing.append(f"{doc}: {file} {name}")
    assert not missing, "spec names code that does not exist: " + "; ".join(sorted(set(missing)))
