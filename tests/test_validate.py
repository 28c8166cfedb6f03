"""``validate``: every broken adapter of issue 2 turns into its own finding, levels are cumulative, several
paths and directories are checked in one call, and the CLI's exit codes and --json follow the contract."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loraformat import spec
from loraformat.cli.main import main
from loraformat.constants import PEFT_CONFIG, PEFT_PICKLE, PEFT_WEIGHTS
from loraformat.conversion import convert
from loraformat.errors import InputNotFoundError, UsageError
from loraformat.validation import ValidationReport, expand_paths, validate, validate_many
from tests.fixtures import make_llama_base
from tests.spec_helpers import document, one_module_adapter, rewrite


def codes(report: ValidationReport, severity: str | None = None) -> set[str]:
    return {f.code for f in report.findings if severity is None or f.severity == severity}


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(["validate", *args])
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


@pytest.fixture(scope="module")
def stamped(
    tmp_path_factory: pytest.TempPathFactory, peft_adapters: dict[str, Path], llama_base: Path
) -> Path:
    """The plain PEFT adapter converted to a native file with the base stamped."""
    out = tmp_path_factory.mktemp("native") / "plain.safetensors"
    convert(peft_adapters["plain"], out, base=llama_base, base_id="test/llama")
    return out


@pytest.fixture(scope="module")
def other_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture, other weights: structure hash equal, target digests differ."""
    return make_llama_base(tmp_path_factory.mktemp("other") / "llama", seed=7)


@pytest.fixture(scope="module")
def narrow_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another architecture: shapes and structure hash differ."""
    return make_llama_base(tmp_path_factory.mktemp("narrow") / "llama", hidden=32, intermediate=96)


def copy_peft(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- valid inputs ----------------------------------------------------------------------------------------------


def test_every_peft_variant_and_native_file_is_valid_at_data_level(peft_adapters, base_of, tmp_path) -> None:
    for name, path in peft_adapters.items():
        report = validate(path, level="data")
        assert report.ok(strict=True), (name, report.findings)
        out = tmp_path / f"{name}.safetensors"
        convert(path, out, base=base_of(name))
        native = validate(out, base=base_of(name))
        assert native.level == "base" and native.source_format == "loraformat"
        assert native.ok(strict=True), (name, native.findings)


def test_level_defaults(stamped: Path, llama_base: Path) -> None:
    assert validate(stamped).level == "data"  # the default reads the data: NaN, zero deltas, content hash
    assert validate(stamped, base=llama_base).level == "base"
    with pytest.raises(UsageError, match="--level base needs --base"):
        validate(stamped, level="base")
    with pytest.raises(UsageError, match="--level must be one of"):
        validate(stamped, level="everything")


# --- header level ----------------------------------------------------------------------------------------------


def test_rank_mismatch_between_metadata_and_tensors(stamped: Path, tmp_path: Path) -> None:
    module = "model.layers.0.self_attn.q_proj"
    bad = rewrite(
        stamped, tmp_path / "rank.safetensors", meta=lambda m: setattr(m.modules[module], "rank", 4)
    )
    report = validate(bad)
    assert not report.ok()
    finding = next(f for f in report.errors if f.location == module)
    assert finding.code == "metadata-rank" and "rank 4" in finding.message and "rank 8" in finding.message


def test_a_and_b_ranks_disagree(stamped: Path, tmp_path: Path) -> None:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    bad = rewrite(stamped, tmp_path / "ab.safetensors", tensors=lambda t: t.__setitem__(key, t[key][:4]))
    report = validate(bad)
    assert "rank-mismatch" in codes(report, "error")


def test_missing_b(stamped: Path, tmp_path: Path) -> None:
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    bad = rewrite(stamped, tmp_path / "noB.safetensors", tensors=lambda t: t.pop(key))
    report = validate(bad)
    [finding] = report.errors
    assert finding.code == "missing-tensor" and finding.location == "model.layers.1.mlp.down_proj"
    assert "lora_B" in finding.message


def test_missing_b_in_peft_dir(peft_adapters: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    d = copy_peft(peft_adapters["rslora"], tmp_path / "peft")
    tensors = load_file(str(d / PEFT_WEIGHTS))
    tensors.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    save_file(tensors, str(d / PEFT_WEIGHTS), {"format": "pt"})
    report = validate(d)
    assert not report.ok() and "lora_B" in report.errors[0].message


def test_wrong_ndim(stamped: Path, tmp_path: Path) -> None:
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    bad = rewrite(stamped, tmp_path / "ndim.safetensors", tensors=lambda t: t.__setitem__(key, t[key][None]))
    report = validate(bad)
    assert "wrong-ndim" in codes(report, "error")


def test_unparsable_config(peft_adapters: dict[str, Path], tmp_path: Path) -> None:
    d = copy_peft(peft_adapters["plain"], tmp_path / "peft")
    (d / PEFT_CONFIG).write_text('{"r": 8,, }')
    report = validate(d)
    [finding] = report.errors
    assert (
        finding.code == "adapter" and finding.location == PEFT_CONFIG and "not valid JSON" in finding.message
    )


def test_config_value_of_wrong_type(peft_adapters: dict[str, Path], tmp_path: Path) -> None:
    d = copy_peft(peft_adapters["plain"], tmp_path / "peft")
    config = json.loads((d / PEFT_CONFIG).read_text())
    config["use_rslora"] = "yes"
    (d / PEFT_CONFIG).write_text(json.dumps(config))
    report = validate(d)
    assert not report.ok() and "use_rslora" in report.errors[0].message


def test_negative_alpha_in_config_is_refused(peft_adapters: dict[str, Path], tmp_path: Path) -> None:
    d = copy_peft(peft_adapters["plain"], tmp_path / "peft")
    config = json.loads((d / PEFT_CONFIG).read_text())
    config["lora_alpha"] = -16
    (d / PEFT_CONFIG).write_text(json.dumps(config))
    report = validate(d)
    assert not report.ok()
    assert any("alpha" in f.location + f.message for f in report.errors)


def test_config_rank_differs_from_tensors(peft_adapters: dict[str, Path], tmp_path: Path) -> None:
    d = copy_peft(peft_adapters["plain"], tmp_path / "peft")
    config = json.loads((d / PEFT_CONFIG).read_text())
    config["r"] = 16
    (d / PEFT_CONFIG).write_text(json.dumps(config))
    report = validate(d)
    assert not report.ok()
    assert any("16" in f.message and "8" in f.message for f in report.errors)


def test_pickle_only_refused_then_allowed(peft_adapters: dict[str, Path], tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    d = copy_peft(peft_adapters["rslora"], tmp_path / "pickled")
    torch.save(load_file(str(d / PEFT_WEIGHTS)), d / PEFT_PICKLE)
    (d / PEFT_WEIGHTS).unlink()
    report = validate(d)
    [finding] = report.errors
    assert finding.code == "pickle-refused" and "--allow-pickle" in finding.message
    allowed = validate(d, allow_pickle=True, level="data")
    assert allowed.ok(strict=True) and allowed.source_format == "peft-pickle"


def test_schema_violations_are_all_reported(stamped: Path, tmp_path: Path) -> None:
    def break_meta(m):
        m.scaling = "alpha"
        m.modules["model.layers.0.self_attn.q_proj"].kind = "dense"

    bad = rewrite(stamped, tmp_path / "schema.safetensors", meta=break_meta)
    report = validate(bad)
    assert codes(report) == {"schema"}
    assert {f.location for f in report.findings} == {
        "scaling",
        "modules/model.layers.0.self_attn.q_proj/kind",
    }


def test_newer_major_version_refused_naming_both(stamped: Path, tmp_path: Path) -> None:
    bad = rewrite(stamped, tmp_path / "v2.safetensors", meta=lambda m: setattr(m, "spec_version", "2.0"))
    report = validate(bad)
    [finding] = report.errors
    assert finding.code == "unsupported-version"
    assert "2.0" in finding.message and spec.SPEC_VERSION in finding.message


def test_newer_minor_with_unknown_fields_accepted(stamped: Path, tmp_path: Path) -> None:
    module = "model.layers.0.self_attn.q_proj"

    def newer(m):
        m.spec_version = "1.7"
        m.extra["quantization"] = {"scheme": "nf4"}
        m.modules[module].extra["init"] = "pissa"
        m.base_model.extra["tokenizer_hash"] = "ab" * 32

    good = rewrite(stamped, tmp_path / "v17.safetensors", meta=newer)
    report = validate(good, level="data")
    assert report.ok(strict=True), report.findings
    doc = document(good)
    assert doc["quantization"] == {"scheme": "nf4"} and doc["modules"][module]["init"] == "pissa"


def test_truncated_file_is_a_finding_not_a_crash(stamped: Path, tmp_path: Path) -> None:
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(stamped.read_bytes()[:-100])
    report = validate(bad)
    [finding] = report.errors
    assert finding.code == "header" and "data buffer" in finding.message


def test_modelspec_hash_disagreeing_with_content_hash(stamped: Path, tmp_path: Path) -> None:
    from loraformat.io.header import encode_header, read_header

    h = read_header(stamped)
    metadata = dict(h.metadata, **{"modelspec.hash_sha256": "0x" + "0" * 64})
    infos = sorted(h.tensors.values(), key=lambda i: i.start)
    header, _ = encode_header([(i.name, i.dtype, i.shape) for i in infos], metadata)
    bad = tmp_path / "ms.safetensors"
    bad.write_bytes(header + stamped.read_bytes()[h.data_start :])
    assert codes(validate(bad), "error") == {"modelspec"}


# --- data level ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf(stamped: Path, tmp_path: Path, value: float) -> None:
    key = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"

    def poison(t):
        t[key] = t[key].clone()
        t[key][3, 1] = value

    bad = rewrite(stamped, tmp_path / "nonfinite.safetensors", tensors=poison)
    assert validate(bad, level="header").ok()  # the header level reads no data
    report = validate(bad)  # the default level does
    [finding] = report.errors
    assert finding.code == "non-finite" and finding.location == key
    assert ("1 NaN" if value != value else "1 Inf") in finding.message


def test_all_zero_b_warns_and_strict_fails(tmp_path: Path, capsys) -> None:
    path = one_module_adapter(tmp_path / "zero.safetensors", zero_b=True)
    report = validate(path, level="data")
    assert report.ok() and not report.ok(strict=True)
    [finding] = report.warnings
    assert finding.code == "zero-delta" and "changes nothing" in finding.message
    assert run_cli(capsys, str(path), "--level", "data")[0] == 0
    code, out, _ = run_cli(capsys, str(path), "--level", "data", "--strict")
    assert code == 1 and "warning: zero-delta" in out


def test_content_hash_mismatch(stamped: Path, tmp_path: Path) -> None:
    blob = bytearray(stamped.read_bytes())
    blob[-3] ^= 0x01  # a low mantissa bit of the last tensor: still finite
    bad = tmp_path / "edited.safetensors"
    bad.write_bytes(bytes(blob))
    assert validate(bad, level="header").ok()  # no data read
    report = validate(bad, level="data")
    assert codes(report, "error") == {"content-hash"}


# --- base level ------------------------------------------------------------------------------------------------


def test_adapter_for_another_base_same_architecture(stamped: Path, other_llama: Path) -> None:
    report = validate(stamped, base=other_llama)
    assert codes(report, "error") == {"target-digest"}
    assert len(report.errors) == 14  # every targeted weight differs


def test_adapter_for_another_architecture(stamped: Path, narrow_llama: Path) -> None:
    report = validate(stamped, base=narrow_llama)
    assert {"target-shape", "structure-hash", "target-digest"} <= codes(report, "error")


def test_adapter_for_another_model_family(stamped: Path, gpt2_base: Path) -> None:
    report = validate(stamped, base=gpt2_base)
    assert {"missing-target", "structure-hash"} <= codes(report, "error")


def test_unstamped_peft_adapter_checks_shapes_and_warns(peft_adapters, llama_base, gpt2_base) -> None:
    report = validate(peft_adapters["plain"], base=llama_base)
    assert report.ok() and codes(report) == {"unstamped"}
    assert "missing-target" in codes(validate(peft_adapters["plain"], base=gpt2_base), "error")


def test_missing_base_is_a_usage_error(stamped: Path, tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError):
        validate(stamped, base=tmp_path / "nowhere")


# --- several paths, directories ------------------------------------------------------------------------------


def test_directory_expansion(peft_adapters, stamped: Path, llama_base: Path, tmp_path: Path) -> None:
    root = tmp_path / "repo"
    copy_peft(peft_adapters["plain"], root / "adapters" / "a")
    copy_peft(peft_adapters["dora"], root / "adapters" / "nested" / "b")
    shutil.copy(stamped, root / "adapters" / "c.safetensors")
    shutil.copytree(llama_base, root / "base")  # a base model's weights are not adapters
    (root / "adapters" / "broken.safetensors").write_bytes(b"\x01")
    found = expand_paths([root])
    assert [Path(p).relative_to(root).as_posix() for p in found] == [
        "adapters/a",
        "adapters/broken.safetensors",
        "adapters/c.safetensors",
        "adapters/nested/b",
    ]
    # a config file or the PEFT weights stand for their directory; duplicates collapse
    a = root / "adapters" / "a"
    assert expand_paths([a / PEFT_CONFIG, a / PEFT_WEIGHTS, a]) == [str(a)]
    reports = validate_many([root])
    assert [r.ok() for r in reports] == [True, False, True, True]
    with pytest.raises(UsageError, match="holds no PEFT adapter"):
        expand_paths([root / "base"])
    with pytest.raises(InputNotFoundError):
        validate_many([a, root / "missing"])


# --- CLI -------------------------------------------------------------------------------------------------------


def test_cli_exit_codes_and_lines(stamped: Path, tmp_path: Path, capsys) -> None:
    code, out, _ = run_cli(capsys, str(stamped))
    assert code == 0 and "1 checked: 1 valid" in out
    bad = rewrite(
        stamped,
        tmp_path / "noB.safetensors",
        tensors=lambda t: t.pop("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"),
    )
    code, out, _ = run_cli(capsys, str(stamped), str(bad))
    assert code == 1
    assert f"{bad}: error: missing-tensor: model.layers.1.mlp.down_proj: lora_B tensor" in out
    assert "2 checked: 1 valid, 1 invalid" in out
    code, _, err = run_cli(capsys, str(stamped), str(tmp_path / "missing.safetensors"))
    assert code == 2 and "no such file" in err
    code, _, err = run_cli(capsys, str(stamped), "--level", "base")
    assert code == 2 and "--level base needs --base" in err
    code, _, err = run_cli(capsys, str(stamped), "--level", "bogus")
    assert code == 2


def test_cli_json(stamped: Path, other_llama: Path, tmp_path: Path, capsys) -> None:
    zero = one_module_adapter(tmp_path / "zero.safetensors", zero_b=True)
    code, out, _ = run_cli(capsys, str(stamped), str(zero), "--level", "data", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["ok"] is True and doc["summary"]["warnings"] == 1
    assert [r["path"] for r in doc["reports"]] == [str(stamped), str(zero)]
    [finding] = doc["reports"][1]["findings"]
    assert set(finding) == {"code", "severity", "location", "message"} and finding["severity"] == "warning"
    code, out, _ = run_cli(capsys, str(stamped), "--base", str(other_llama), "--json")
    doc = json.loads(out)
    assert code == 1 and doc["level"] == "base" and not doc["reports"][0]["ok"]
    assert {f["code"] for f in doc["reports"][0]["findings"]} == {"target-digest"}


def test_cli_help_has_an_example(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    assert "Examples:" in capsys.readouterr().out


def test_bit_tests_count_nan_and_inf_and_find_zeros_in_every_float_dtype():
    import torch

    from loraformat.ops.finite import all_zero, non_finite

    def raw(t):
        return t.contiguous().reshape(-1).view(torch.uint8).numpy()

    for dtype, st in (
        (torch.bfloat16, "BF16"),
        (torch.float16, "F16"),
        (torch.float32, "F32"),
        (torch.float64, "F64"),
    ):
        t = torch.randn(64, 8).to(dtype)
        assert non_finite(raw(t), st) == (0, 0) and not all_zero(raw(t), st)
        u = t.clone()
        u[3, 5], u[4, 1], u[0, 0] = float("nan"), float("inf"), float("-inf")
        assert non_finite(raw(u), st) == (1, 2), dtype
        big = torch.full((4,), torch.finfo(dtype).max, dtype=dtype)  # largest finite value stays finite
        assert non_finite(raw(big), st) == (0, 0), dtype
        zeros = torch.zeros(5, dtype=dtype)
        zeros[2] = -0.0
        assert all_zero(raw(zeros), st) and not all_zero(raw(torch.full((3,), 1e-3).to(dtype)), st)


def test_cli_default_level_catches_nan_without_importing_torch(stamped: Path, tmp_path: Path) -> None:
    """A new user's `loraformat validate adapter/` on a lora_B holding a NaN printed "ok ... level header" and
    exited 0: the default level now reads the data, and does so without torch (whose import costs seconds)."""
    import subprocess
    import sys

    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

    def poison(t):
        t[key] = t[key].clone()
        t[key][0, 0] = float("nan")

    bad = rewrite(stamped, tmp_path / "nan.safetensors", tensors=poison)
    code = (
        "import sys; from loraformat.cli.main import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
        "    print('torch' in sys.modules, file=sys.stderr); raise"
    )
    for path, rc in ((bad, 1), (stamped, 0)):
        done = subprocess.run(
            [sys.executable, "-c", code, "validate", str(path)], capture_output=True, text=True
        )
        assert done.returncode == rc, done.stderr
        assert done.stderr.strip().splitlines()[-1] == "False", done.stderr
    assert (
        "non-finite"
        in subprocess.run(
            [sys.executable, "-c", code, "validate", str(bad)], capture_output=True, text=True
        ).stdout
    )
