"""Fuzzing the readers of untrusted input (spec/v1.md §16): the safetensors header, the JSON loader, the metadata
document, the PEFT config and its pattern keys. Over 10,000 generated cases per run (hypothesis, derandomized:
the same cases every run, no example database), each held to: nothing escapes but the typed errors, nothing
hangs (a per-case deadline), memory stays bounded. Explicit examples pin every class issue 14 found."""

from __future__ import annotations

import json
import re
import resource
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from loraformat.adapter import parse_native_metadata
from loraformat.constants import METADATA_KEY
from loraformat.errors import InvalidInputError, LoraformatError
from loraformat.io.header import DTYPE_BITS, TensorInfo, parse_header_bytes
from loraformat.io.patterns import build_table, resolve_all
from loraformat.io.peft import metadata_from_peft
from loraformat.io.untrusted_json import load_json
from loraformat.metadata import AdapterMetadata, ModuleEntry

CASES = {"run": 0}  # inputs handed to a reader in this run (several per generated example)


def fuzz(n: int):  # noqa: ANN201 - a hypothesis settings decorator
    return settings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=2000,  # ms per case: a hang or a blow-up fails the case
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
EVIL_TEXT = [
    "1e400",
    "NaN",
    "-Infinity",
    "1" + "0" * 400,
    '"\\ud800"',
    '{"a": "\\udfff"}',
    "[" * 5000 + "]" * 5000,
    '{"x":' * 100 + "1" + "}" * 100,
    "",
    "\xff",
]


def _dump(value: object) -> str:
    return json.dumps(value, allow_nan=True)


# -- the JSON loader -------------------------------------------------------------------------------------------


@fuzz(1000)
@given(st.one_of(JSON.map(_dump), st.text(max_size=60), st.sampled_from(EVIL_TEXT)), st.booleans())
def test_load_json_raises_only_typed_errors(text: str, as_bytes: bool) -> None:
    data: str | bytes = text.encode("utf-8", "surrogatepass") if as_bytes else text
    for variant in (data, data[: len(data) // 2], data[1:]):  # the text and two truncations
        CASES["run"] += 1
        try:
            doc = load_json(variant, what="x", error=InvalidInputError)
        except InvalidInputError as exc:
            assert "\n" not in str(exc)
            continue
        json.dumps(doc, allow_nan=False).encode("utf-8")  # whatever is accepted can be written back


# -- the safetensors header ------------------------------------------------------------------------------------

ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*DTYPE_BITS, "F99", "", 7]),
        "shape": st.lists(st.integers(min_value=-2, max_value=2**40) | JSON_SCALARS, max_size=10) | JSON,
        "data_offsets": st.lists(st.integers(min_value=-3, max_value=2**66) | JSON_SCALARS, max_size=3)
        | JSON,
    },
    optional={"junk": JSON},
)
HEADER = st.dictionaries(st.text(max_size=10), ENTRY | JSON, max_size=6) | st.fixed_dictionaries(
    {"__metadata__": st.dictionaries(st.text(max_size=6), JSON_SCALARS, max_size=4) | JSON}
)


@fuzz(800)
@given(HEADER.map(_dump), st.integers(min_value=0, max_value=64), st.binary(max_size=8))
@example('{"t": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}', 4, b"")
@example('{"t": {"dtype": "F32", "shape": [' + "1," * 20 + "1], " + '"data_offsets": [0, 4]}}', 4, b"")
@example('{"__metadata__": {"\\ud800": "x"}}', 0, b"")
@example("[" * 3000, 0, b"")
def test_header_raises_only_header_errors(text: str, data_size: int, noise: bytes) -> None:
    raw = text.encode("utf-8", "surrogatepass") + noise
    cut = len(raw) // 3
    flipped = raw[:cut] + bytes([raw[cut] ^ 0x20]) + raw[cut + 1 :] if raw else raw
    for variant in (raw, raw[:cut], flipped, raw + b"  "):  # the header, truncated, one bit flipped, padded
        CASES["run"] += 1
        try:
            header = parse_header_bytes(variant, path="fuzz", file_size=8 + len(variant) + data_size)
        except LoraformatError as exc:
            assert "\n" not in str(exc)
            continue
        for info in header.tensors.values():
            assert 0 <= info.nbytes and info.end <= header.file_size


# -- the metadata document -------------------------------------------------------------------------------------

VALID_DOC = AdapterMetadata(
    modules={"m.q": ModuleEntry("linear", 2, 4, 4, 8, "m.q.weight")}, created_by={"tool": "t", "version": "1"}
).to_dict()
PATHS = [
    ("spec_version",),
    ("modules",),
    ("modules", "m.q"),
    ("modules", "m.q", "alpha"),
    ("modules", "m.q", "rank"),
    ("scaling",),
    ("base_model",),
    ("provenance",),
    ("name",),
]


def _mutated(doc: dict, path: tuple[str, ...], value: object) -> dict:
    out = json.loads(json.dumps(doc))
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


@fuzz(800)
@given(st.sampled_from(PATHS), JSON | st.sampled_from(["①.0", "1" * 5000 + ".0", "1.0\n", 1e308, 10**30]))
def test_metadata_document_raises_only_typed_errors(path: tuple[str, ...], value: object) -> None:
    text = _dump(_mutated(VALID_DOC, path, value))
    for variant in (text, text[: len(text) // 2]):
        CASES["run"] += 1
        try:
            meta = parse_native_metadata({METADATA_KEY: variant}, path="fuzz")
        except LoraformatError as exc:
            assert "\n" not in str(exc)
            continue
        json.dumps(meta.to_dict(), allow_nan=False).encode("utf-8")


# -- the PEFT config and its pattern keys ----------------------------------------------------------------------

INFOS = {
    "base_model.model.m.layers.0.q_proj.lora_A.weight": TensorInfo("a", "F32", (2, 4), 0, 32),
    "base_model.model.m.layers.0.q_proj.lora_B.weight": TensorInfo("b", "F32", (8, 2), 32, 96),
    "base_model.model.m.layers.1.v_proj.lora_A.weight": TensorInfo("c", "F32", (2, 4), 96, 128),
    "base_model.model.m.layers.1.v_proj.lora_B.weight": TensorInfo("d", "F32", (8, 2), 128, 192),
}
CONFIG_KEYS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "bias", "modules_to_save"]
REGEX_ALPHABET = list("ab.*+?|()[]{}^$\\01qv_") + ["proj", "q_proj", r"\d", "{2}", "{1001}", "(?=", r"\1"]
REGEX = st.lists(st.sampled_from(REGEX_ALPHABET), max_size=8).map("".join)


@fuzz(600)
@given(st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON | st.dictionaries(REGEX, JSON_SCALARS, max_size=3)))
def test_peft_config_raises_only_typed_errors(fields: dict) -> None:
    text = _dump({"peft_type": "LORA", **fields})
    CASES["run"] += 1
    try:
        config = load_json(text, what="", error=InvalidInputError)
        meta = metadata_from_peft(config, INFOS, name="fuzz", path="fuzz")
    except LoraformatError as exc:
        assert "\n" not in str(exc)
        return
    for entry in meta.modules.values():
        assert entry.rank > 0 and entry.alpha > 0


MODULES = ["m.layers.0.q_proj", "m.layers.1.v_proj", "q_proj", "a.b", "ab", "x.proj", "layers.10.q_proj"]


@fuzz(600)
@given(st.lists(REGEX, min_size=1, max_size=4))
@example(["(a|aa)+c", "q_proj"])
@example([r"layers\.\d+\.q_proj", "proj"])
@example(["^a\\.b", "b"])
def test_pattern_resolution_agrees_with_pythons_re(keys: list[str]) -> None:
    """Where Python's re (PEFT's engine) accepts every key, our resolution picks the same key PEFT does, or
    refuses the config with a typed error (constructs the linear-time matcher does not take)."""
    patterns = {k: i + 1 for i, k in enumerate(dict.fromkeys(keys))}
    CASES["run"] += len(MODULES)
    try:
        table = build_table("rank_pattern", patterns, "fuzz")
        ours = resolve_all(MODULES, [table], [0], "fuzz")
    except LoraformatError as exc:
        assert "\n" not in str(exc)
        return
    for module in MODULES:
        peft = next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", module)), 0)
        assert ours[module][0] == peft, (module, patterns)


@pytest.fixture(scope="module", autouse=True)
def _memory_stays_bounded():
    """The whole module's cases together may not grow the process by more than 256 MiB."""
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start < 256 * 1024


def test_lying_length_prefixes(tmp_path) -> None:  # noqa: ANN001
    """The 8-byte length prefix: short files and lengths past the cap or the file are header errors."""
    from loraformat.errors import HeaderError
    from loraformat.io.header import read_header

    cases = [
        b"",
        b"\x01",
        struct.pack("<Q", 2**63),
        struct.pack("<Q", 100_000_001),
        struct.pack("<Q", 16) + b"{}",
    ]
    for i, raw in enumerate(cases):
        path = tmp_path / f"{i}.safetensors"
        path.write_bytes(raw)
        with pytest.raises(HeaderError):
            read_header(path)


def test_at_least_ten_thousand_cases() -> None:
    """Runs last: the module handed over 10,000 generated inputs to the readers (when run as a whole)."""
    if CASES["run"] == 0:
        pytest.skip("run the whole module to count its cases")
    assert CASES["run"] >= 10_000, CASES
