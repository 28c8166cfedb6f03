"""``loraformat validate``: every check of spec/v1.md §Validation levels, reported as findings, never raised.

Levels are cumulative: ``header`` (structure, schema, version, A/B pairing, ranks and shapes against the
metadata, PEFT config value types: no tensor data read), ``data``, the default (+ NaN/Inf in any tensor, all-zero
lora_B, the recorded content hash against the data section; from the raw bits, without torch) and ``base`` (+ targets against a base
checkpoint: existence, shapes, structure hash, target digests). A broken file yields error findings so that a CI
run over many adapters reports every file; only a path that does not exist (or a base that cannot be opened)
raises, because that is a usage error rather than a property of the adapter.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraformat import spec
from loraformat.adapter import Adapter, open_adapter
from loraformat.constants import (
    DEFAULT_LEVEL,
    FORMAT_KEY,
    FORMAT_VALUE,
    HASH_ALGORITHM,
    LEVELS,
    METADATA_KEY,
    PEFT_CONFIG,
    FindingCode,
    Format,
    Level,
    ModelSpecKey,
    Severity,
)
from loraformat.errors import (
    AdapterError,
    HeaderError,
    InputNotFoundError,
    InvalidInputError,
    LoraformatError,
    PickleRefusedError,
    SchemaError,
    UnsupportedVersionError,
    UsageError,
)
from loraformat.io.discovery import expand_paths
from loraformat.io.header import read_header
from loraformat.io.tensors import RawTensorBytes
from loraformat.io.untrusted_json import load_json
from loraformat.metadata import BaseQuantization
from loraformat.schema import violations as schema_violations

if TYPE_CHECKING:
    from loraformat.io.checkpoint import Checkpoint

ERROR, WARNING = Severity.ERROR, Severity.WARNING

#: typed open errors -> finding code (most specific class first)
_ERROR_CODES: tuple[tuple[type[LoraformatError], FindingCode], ...] = (
    (HeaderError, FindingCode.HEADER),
    (UnsupportedVersionError, FindingCode.UNSUPPORTED_VERSION),
    (SchemaError, FindingCode.SCHEMA),
    (PickleRefusedError, FindingCode.PICKLE_REFUSED),
    (AdapterError, FindingCode.ADAPTER),
    (InvalidInputError, FindingCode.INVALID),
    (LoraformatError, FindingCode.UNREADABLE),
)


@dataclass(frozen=True)
class Finding:
    code: FindingCode
    severity: Severity
    location: str  # module path, tensor key, JSON path or file name; "" for the file as a whole
    message: str

    def to_json(self) -> dict[str, str]:
        return {
            "code": self.code,
            "severity": self.severity,
            "location": self.location,
            "message": self.message,
        }

    def format(self, path: str) -> str:
        return f"{path}: {self.severity}: {self.code}: {self.location or '-'}: {self.message}"


@dataclass
class ValidationReport:
    path: str
    level: str
    findings: list[Finding] = field(default_factory=list)
    source_format: str | None = None
    modules: int = 0

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    def ok(self, strict: bool = False) -> bool:
        """Valid: no errors, and with ``strict`` no warnings either."""
        return not self.errors and not (strict and self.warnings)

    def to_json(self, strict: bool = False) -> dict[str, Any]:
        return {
            "path": self.path,
            "level": self.level,
            "ok": self.ok(strict),
            "source_format": self.source_format,
            "modules": self.modules,
            "findings": [f.to_json() for f in self.findings],
        }

    def _add(self, code: FindingCode, severity: Severity, location: str, message: str) -> None:
        self.findings.append(Finding(code, severity, location, message))


# --- public API ------------------------------------------------------------------------------------------------


def resolve_level(level: str | None, base: object | None) -> str:
    """``--base`` without ``--level`` means level base; level base without a base is a usage error."""
    if level is None:
        return Level.BASE if base is not None else DEFAULT_LEVEL
    if level not in LEVELS:
        raise UsageError(f"--level must be one of {', '.join(LEVELS)}, not {level!r}")
    if level == Level.BASE and base is None:
        raise UsageError("--level base needs --base BASE")
    return level


def validate(
    path: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | Checkpoint | None = None,
    level: str | None = None,
    strict: bool = False,
    config: str | os.PathLike[str] | dict[str, Any] | None = None,
    allow_pickle: bool = False,
) -> ValidationReport:
    """Validate one adapter (native file or PEFT directory). ``strict`` is recorded for ``report.ok()`` callers
    that pass it on; it does not change which checks run."""
    level = resolve_level(level, base)
    p = os.fspath(path)
    if not os.path.exists(p):
        raise InputNotFoundError("no such file or directory", path=p)
    ck = _open_base(base) if level == Level.BASE else None
    return _validate_one(p, level=level, ck=ck, config=config, allow_pickle=allow_pickle)


def validate_many(
    paths: Iterable[str | os.PathLike[str]],
    *,
    base: str | os.PathLike[str] | Checkpoint | None = None,
    level: str | None = None,
    strict: bool = False,
    config: str | os.PathLike[str] | dict[str, Any] | None = None,
    allow_pickle: bool = False,
) -> list[ValidationReport]:
    """Validate every adapter named or found under the given paths (see :func:`expand_paths`); the base is
    opened once for all of them."""
    level = resolve_level(level, base)
    targets = expand_paths(paths)
    ck = _open_base(base) if level == Level.BASE else None
    return [_validate_one(t, level=level, ck=ck, config=config, allow_pickle=allow_pickle) for t in targets]


# --- checks ----------------------------------------------------------------------------------------------------


def _open_base(base: str | os.PathLike[str] | Checkpoint | None) -> Checkpoint | Path:
    """The base checkpoint, or a diffusers pipeline directory (checked per component)."""
    from loraformat.io.checkpoint import Checkpoint, open_checkpoint
    from loraformat.io.pipeline import is_pipeline
    from loraformat.io.quantized import attach

    if isinstance(base, Checkpoint):
        return base
    assert base is not None
    if is_pipeline(base):
        return Path(base)
    ck = open_checkpoint(base)
    attach(ck, check_scales=False)  # packed 4-bit targets are checked against their logical shapes
    return ck


def _validate_one(
    path: str, *, level: str, ck: Checkpoint | Path | None, config: Any, allow_pickle: bool
) -> ValidationReport:
    report = ValidationReport(path=path, level=level)
    if not os.path.exists(path):
        raise InputNotFoundError("no such file or directory", path=path)
    try:
        base = ck if isinstance(ck, Path) else ck.path if ck is not None else None  # resolves kohya names
        adapter = open_adapter(path, config=config, allow_pickle=allow_pickle, check=False, base=base)
    except LoraformatError as exc:
        _open_error(report, exc)
        return report
    with adapter:
        report.source_format = adapter.source_format
        report.modules = len(adapter.modules)
        _check_header(report, adapter)
        if level in (Level.DATA, Level.BASE) and not report.errors:
            _check_data(report, adapter)
        if level == Level.BASE and ck is not None and not any(f.code in _STRUCTURAL for f in report.findings):
            _check_base(report, adapter, ck)
    return report


#: findings after which tensors cannot be trusted to be where the metadata says
_STRUCTURAL = {
    FindingCode.MISSING_TENSOR,
    FindingCode.WRONG_NDIM,
    FindingCode.SHAPE_MISMATCH,
    FindingCode.SCHEMA,
    FindingCode.HEADER,
}


def _open_error(report: ValidationReport, exc: LoraformatError) -> None:
    code = next(c for cls, c in _ERROR_CODES if isinstance(exc, cls))
    location = os.path.basename(exc.path) if exc.path else ""
    if isinstance(exc, SchemaError) and exc.path:
        detailed = _schema_findings_of_file(exc.path)
        if detailed:
            report.findings.extend(detailed)
            return
    report._add(code, ERROR, location, exc.message)


def _schema_findings_of_file(path: str) -> list[Finding]:
    """Every schema violation of a native file's document (open_adapter stops at the first)."""
    try:
        raw = read_header(path).metadata[METADATA_KEY]
        document = load_json(raw, what=METADATA_KEY, error=SchemaError, path=path)
    except (LoraformatError, KeyError):
        return []
    modules = document.get("modules") if isinstance(document, dict) else None
    if not isinstance(document, dict) or (isinstance(modules, dict) and len(modules) > spec.MAX_MODULES):
        return []
    return [
        Finding(FindingCode.SCHEMA, ERROR, where, message) for where, message in schema_violations(document)
    ]


def _check_header(report: ValidationReport, adapter: Adapter) -> None:
    meta = adapter.meta
    native = adapter.source_format == Format.LORAFORMAT
    problems = adapter.problems()
    for code, location, message in problems:
        report._add(code, ERROR, location, message)
    if not native and not problems:
        # the resolved PEFT config must make a valid v1 document (e.g. r and lora_alpha positive)
        for where, message in schema_violations(meta.to_dict()):
            report._add(FindingCode.CONFIG, ERROR, f"{PEFT_CONFIG} (resolved) {where}", message)
    for key, base_name in sorted(meta.saved_tensors.items()):
        if not base_name:
            report._add(FindingCode.SAVED_TENSOR, ERROR, key, "saved tensor names no base tensor to replace")
    if native:
        _check_native_keys(report, adapter)
    bm = meta.base_model
    if bm.hash_algorithm and bm.hash_algorithm != HASH_ALGORITHM:
        report._add(
            FindingCode.HASH_ALGORITHM,
            WARNING,
            "base_model.hash_algorithm",
            f"unknown hash algorithm {bm.hash_algorithm!r} (this reader implements "
            f"{HASH_ALGORITHM!r}): base hashes cannot be verified",
        )
    elif (bm.structure_hash or bm.content_hash or bm.target_digests) and not bm.hash_algorithm:
        report._add(
            FindingCode.HASH_ALGORITHM,
            WARNING,
            "base_model.hash_algorithm",
            "base hashes are recorded without their hash_algorithm",
        )
    if bm.quantization is not None:
        _check_quantization(report, bm.quantization)


def _check_quantization(report: ValidationReport, q: BaseQuantization) -> None:
    """§Base quantization: an unknown method is a warning (a newer writer), an inconsistent record an error."""
    from loraformat.quantization import problems

    for location, message in problems(q):
        severity = WARNING if location.endswith(".method") else ERROR
        report._add(FindingCode.QUANTIZATION, severity, location, message)


def _check_native_keys(report: ValidationReport, adapter: Adapter) -> None:
    """§Metadata: ``format: pt`` and the ModelSpec keys beside the loraformat document."""
    raw = adapter.raw_metadata
    if raw.get(FORMAT_KEY) != FORMAT_VALUE:
        report._add(
            FindingCode.FORMAT_KEY,
            ERROR,
            "__metadata__.format",
            f"must be {FORMAT_VALUE!r} (transformers and PEFT refuse other values), "
            f"found {raw.get(FORMAT_KEY)!r}",
        )
    recorded = adapter.meta.content_hash
    if recorded is None:
        report._add(FindingCode.CONTENT_HASH, WARNING, "content_hash", "no content hash recorded")
    ms_hash = raw.get(ModelSpecKey.HASH_SHA256)
    if ms_hash is None or ModelSpecKey.SAI_MODEL_SPEC not in raw:
        report._add(
            FindingCode.MODELSPEC, WARNING, "__metadata__", "ModelSpec keys (modelspec.*) are missing"
        )
    elif recorded is not None and ms_hash.lower() != "0x" + recorded:
        report._add(
            FindingCode.MODELSPEC,
            ERROR,
            "__metadata__.modelspec.hash_sha256",
            f"{ms_hash} differs from content_hash {recorded}",
        )


def _check_data(report: ValidationReport, adapter: Adapter) -> None:
    """Every float tensor's bits (NaN/Inf), lora_B all zero, the content hash: from the raw bytes, no torch."""
    from loraformat.io.native import data_section_hash
    from loraformat.ops.finite import checkable, non_finite

    with RawTensorBytes(adapter.source) as raw:
        for key, info in sorted(adapter.source.infos.items()):
            if not checkable(info.dtype):
                continue
            data = raw.get(key)
            if data is None:
                report._add(
                    FindingCode.UNREADABLE_TENSOR, ERROR, key, "cannot be read (the file is too short)"
                )
                continue
            nan, inf = non_finite(data, info.dtype)
            if nan or inf:
                message = f"{nan} NaN and {inf} Inf values in {info.numel} elements"
                report._add(FindingCode.NON_FINITE, ERROR, key, message)
        if not report.errors:
            _check_zero_delta(report, adapter, raw)
    meta = adapter.meta
    header = getattr(adapter.source, "header", None)
    if adapter.source_format == Format.LORAFORMAT and meta.content_hash and header is not None:
        actual = data_section_hash(adapter.source.path, header.data_start)
        if actual != meta.content_hash:
            report._add(
                FindingCode.CONTENT_HASH,
                ERROR,
                "content_hash",
                f"data section hashes to {actual}, metadata records {meta.content_hash}: "
                "the tensors were changed after the file was written",
            )


def _check_zero_delta(report: ValidationReport, adapter: Adapter, raw: RawTensorBytes) -> None:
    from loraformat.ops.finite import all_zero, checkable

    for module in adapter.modules:
        key = adapter.keys(module).B
        info, data = adapter.source.infos[key], raw.get(key)
        if data is None or not checkable(info.dtype) or not all_zero(data, info.dtype):
            return
    meta = adapter.meta
    others = [
        what
        for what, present in (
            ("DoRA magnitudes", meta.dora),
            ("lora_B biases", meta.lora_bias),
            ("saved tensors", bool(meta.saved_tensors)),
        )
        if present
    ]
    if others:
        message = f"every lora_B is zero: the low-rank delta is zero (only the {', '.join(others)} change the model)"
    else:
        message = "every lora_B is zero: this adapter changes nothing"
    report._add(FindingCode.ZERO_DELTA, WARNING, "", message)


def _check_base(report: ValidationReport, adapter: Adapter, ck: Checkpoint | Path) -> None:
    from loraformat.base import base_problems, digest_problems, infer_fan_in_fan_out, saved_shape_problems
    from loraformat.components import pipeline_problems

    if isinstance(ck, Path):  # a diffusers pipeline: names and shapes per component (no hashes recorded)
        for code, location, message in pipeline_problems(adapter.meta, ck):
            report._add(code, ERROR, location, message)
        return
    meta = adapter.meta
    if adapter.source_format != Format.LORAFORMAT:
        # PEFT itself corrects fan_in_fan_out from the layer type when it loads; mirror that
        meta = copy.deepcopy(meta)
        infer_fan_in_fan_out(meta, ck)
    shapes = {key: info.shape for key, info in adapter.source.infos.items()}
    problems = base_problems(meta, ck) + saved_shape_problems(meta, ck, shapes)
    for code, location, message in problems:
        report._add(code, ERROR, location, message)
    bm = meta.base_model
    if not (bm.structure_hash or bm.target_digests):
        report._add(
            FindingCode.UNSTAMPED,
            WARNING,
            "base_model",
            "no base hashes recorded: only names and shapes were checked (convert with --base to stamp)",
        )
        return
    if bm.target_digests and bm.hash_algorithm == HASH_ALGORITHM:
        for code, location, message in digest_problems(meta, ck):
            report._add(code, ERROR, location, message)
    missing = sorted({m.base_tensor for m in meta.modules.values()} - set(bm.target_digests))
    if bm.target_digests and missing:
        report._add(
            FindingCode.TARGET_DIGEST,
            WARNING,
            missing[0],
            f"{len(missing)} target tensor(s) have no recorded digest and were not verified",
        )


def summarize(reports: list[ValidationReport], *, strict: bool = False) -> dict[str, int]:
    return {
        "checked": len(reports),
        "valid": sum(r.ok(strict) for r in reports),
        "invalid": sum(not r.ok(strict) for r in reports),
        "errors": sum(len(r.errors) for r in reports),
        "warnings": sum(len(r.warnings) for r in reports),
    }
