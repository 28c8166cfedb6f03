"""The one Adapter model every command uses: the resolved metadata plus lazy per-tensor access.

``open_adapter`` detects what it is given (a native loraformat file, a PEFT directory, a PEFT-style
.safetensors with its config, a pickle with ``allow_pickle``) and returns the same model for all of them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraformat import spec
from loraformat.constants import (
    DIFFUSERS_WEIGHTS_NAME,
    METADATA_KEY,
    PEFT_CONFIG,
    PEFT_PICKLE,
    PEFT_PREFIX,
    PEFT_WEIGHTS,
    FindingCode,
    Format,
    LayerKind,
    Problem,
)
from loraformat.errors import AdapterError, InputNotFoundError, PickleRefusedError, SchemaError, UsageError
from loraformat.io.header import FLOAT_DTYPES, TensorInfo
from loraformat.io.tensors import MemorySource, SafetensorsSource, TensorSource
from loraformat.io.untrusted_json import load_json
from loraformat.metadata import AdapterMetadata, ModuleEntry
from loraformat.rules import first_problem
from loraformat.schema import validate_document

if TYPE_CHECKING:
    import torch

DIFFUSERS_WEIGHTS = DIFFUSERS_WEIGHTS_NAME  # what diffusers' save_lora_weights writes


@dataclass(frozen=True)
class ModuleKeys:
    """The tensor keys of one module in the file (PEFT naming, spec/v1.md §Tensor keys)."""

    A: str
    B: str
    magnitude: str | None = None
    bias: str | None = None


def module_keys(
    module: str, entry: ModuleEntry, *, dora: bool = False, lora_bias: bool = False
) -> ModuleKeys:
    prefix = PEFT_PREFIX + module
    if entry.kind == LayerKind.EMBEDDING:
        a, b = f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B"
    else:
        a, b = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
    return ModuleKeys(
        A=a,
        B=b,
        magnitude=f"{prefix}.lora_magnitude_vector" if dora else None,
        bias=f"{prefix}.lora_B.bias" if lora_bias else None,
    )


def expected_shapes(entry: ModuleEntry) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of A and B that the metadata entry implies."""
    r = entry.rank
    if entry.kind == LayerKind.CONV:
        ks = tuple(entry.kernel_size or ())
        return (r, entry.in_features, *ks), (entry.out_features, r, *(1 for _ in ks))
    return (r, entry.in_features), (entry.out_features, r)


@dataclass
class Adapter:
    meta: AdapterMetadata
    source: TensorSource
    source_format: Format  # loraformat, peft, peft-pickle, kohya, diffusers
    path: str
    raw_metadata: dict[str, str] = field(default_factory=dict)  # the safetensors __metadata__ as found
    peft_config: dict[str, Any] | None = None

    # -- keys and tensors -------------------------------------------------------------------------------------
    def keys(self, module: str) -> ModuleKeys:
        return module_keys(
            module, self.meta.modules[module], dora=self.meta.dora, lora_bias=self.meta.lora_bias
        )

    def tensor(self, key: str) -> torch.Tensor:
        return self.source.get(key)

    def lora_A(self, module: str) -> torch.Tensor:
        return self.tensor(self.keys(module).A)

    def lora_B(self, module: str) -> torch.Tensor:
        return self.tensor(self.keys(module).B)

    def scale(self, module: str) -> float:
        return self.meta.scale(module)

    @property
    def modules(self) -> dict[str, ModuleEntry]:
        return self.meta.modules

    @property
    def file_size(self) -> int:
        try:
            return os.path.getsize(self.source.path)
        except OSError:
            return 0

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- consistency ------------------------------------------------------------------------------------------
    def problems(self) -> list[Problem]:
        """Every disagreement between tensors and metadata as (code, location, message); header-only.

        Codes: missing-tensor, wrong-ndim, rank-mismatch (lora_A vs lora_B), metadata-rank (the rank the
        metadata or PEFT config gives vs the tensors'), shape-mismatch, bad-dtype, unexpected-tensor.
        """
        out: list[Problem] = []
        infos = self.source.infos
        used: set[str] = set()
        what = "config" if self.source_format != Format.LORAFORMAT else "metadata"
        for module, entry in sorted(self.meta.modules.items()):
            keys = self.keys(module)
            out.extend(_pair_problems(module, entry, keys, infos, what))
            out.extend(_scale_problems(module, self.meta))
            used.update(k for k in (keys.A, keys.B) if k in infos)
            extra_shape = _vector_shape(entry)
            for role, key in (("lora_magnitude_vector", keys.magnitude), ("lora_B.bias", keys.bias)):
                if key is None:
                    continue
                info = infos.get(key)
                if info is None:
                    out.append((FindingCode.MISSING_TENSOR, module, f"{role} tensor {key!r} is missing"))
                    continue
                used.add(key)
                want = extra_shape if role == "lora_magnitude_vector" else (entry.out_features,)
                if entry.out_features and info.shape != want:
                    out.append(
                        (
                            FindingCode.SHAPE_MISMATCH,
                            module,
                            f"{role} shape {list(info.shape)} != {list(want)}",
                        )
                    )
                if info.dtype not in FLOAT_DTYPES:
                    out.append(
                        (FindingCode.BAD_DTYPE, module, f"{role} dtype {info.dtype} is not floating point")
                    )
        for key in sorted(self.meta.saved_tensors):
            if key not in infos:
                out.append(
                    (FindingCode.MISSING_TENSOR, key, "saved tensor listed in the metadata is missing")
                )
            used.add(key)
        for key in sorted(set(infos) - used):
            out.append((FindingCode.UNEXPECTED_TENSOR, key, "tensor not described by the metadata"))
        return out

    def check(self) -> None:
        """Raise AdapterError on the first problem (with a count of the others)."""
        problems = self.problems()
        if problems:
            raise AdapterError(first_problem(problems), path=self.path)


#: the largest scale a merge can apply: float32's largest finite value (merges compute in float32 or wider)
MAX_SCALE = 3.4028234663852886e38


def _scale_problems(module: str, meta: AdapterMetadata) -> list[Problem]:
    """The module's scale (alpha/r or alpha/sqrt(r)) must be finite, positive and within float32 range, or a
    merge would write inf/NaN or fail (spec/v1.md §16)."""
    entry = meta.modules[module]
    try:
        scale = meta.scale(module)
    except (ArithmeticError, TypeError, ValueError):
        scale = math.nan
    if 0 < scale <= MAX_SCALE:
        return []
    return [
        (
            FindingCode.BAD_SCALE,
            module,
            f"scale {scale!r} (alpha {entry.alpha!r}, rank {entry.rank!r}) is not a positive float32 number",
        )
    ]


def _vector_shape(entry: ModuleEntry) -> tuple[int, ...]:
    """Shape of a DoRA magnitude: (out,), or (1, out, 1, ...) for conv layers, as PEFT stores it."""
    if entry.kind == LayerKind.CONV:
        return (1, entry.out_features, *(1 for _ in entry.kernel_size or ()))
    return (entry.out_features,)


def _pair_problems(
    module: str, entry: ModuleEntry, keys: ModuleKeys, infos: dict[str, TensorInfo], what: str
) -> list[Problem]:
    """Findings for one module's lora_A/lora_B pair, most specific first."""
    out: list[Problem] = []
    want_a, want_b = expected_shapes(entry)
    a, b = infos.get(keys.A), infos.get(keys.B)
    for role, key, info in (("A", keys.A, a), ("B", keys.B, b)):
        if info is None:
            out.append((FindingCode.MISSING_TENSOR, module, f"lora_{role} tensor {key!r} is missing"))
        elif info.dtype not in FLOAT_DTYPES:
            out.append(
                (FindingCode.BAD_DTYPE, module, f"lora_{role} dtype {info.dtype} is not floating point")
            )
    ndim_ok = True
    for role, info, want in (("A", a, want_a), ("B", b, want_b)):
        if info is not None and len(info.shape) != len(want):
            ndim_ok = False
            out.append(
                (
                    FindingCode.WRONG_NDIM,
                    module,
                    f"lora_{role} has {len(info.shape)} dims {list(info.shape)}, expected {len(want)} for a "
                    f"{entry.kind} layer",
                )
            )
    if not ndim_ok:
        return out
    rank_a = a.shape[0] if a is not None else None
    rank_b = b.shape[1] if b is not None else None
    if rank_a is not None and rank_b is not None and rank_a != rank_b:
        out.append((FindingCode.RANK_MISMATCH, module, f"lora_A rank {rank_a} != lora_B rank {rank_b}"))
        return out
    rank = rank_a if rank_a is not None else rank_b
    if rank is not None and rank != entry.rank:
        out.append(
            (
                FindingCode.METADATA_RANK,
                module,
                f"{what} says rank {entry.rank} but the tensors have rank {rank}",
            )
        )
        want_a, want_b = (rank, *want_a[1:]), (want_b[0], rank, *want_b[2:])
    for role, info, want in (("A", a, want_a), ("B", b, want_b)):
        if info is not None and info.shape != want:
            out.append(
                (
                    FindingCode.SHAPE_MISMATCH,
                    module,
                    f"lora_{role} shape {list(info.shape)} != {list(want)} from the {what}",
                )
            )
    return out


# --- opening ---------------------------------------------------------------------------------------------------


def parse_native_metadata(raw: dict[str, str], *, path: str) -> AdapterMetadata:
    """Parse and schema-check ``__metadata__["loraformat"]``, applying the versioning rule first."""
    document = load_json(
        raw[METADATA_KEY], what=f"__metadata__[{METADATA_KEY!r}]", error=SchemaError, path=path
    )
    if not isinstance(document, dict):
        raise SchemaError(f"__metadata__[{METADATA_KEY!r}] is not a JSON object", path=path)
    spec.check_version(document.get("spec_version"), path=path)
    modules = document.get("modules")
    if isinstance(modules, dict) and len(modules) > spec.MAX_MODULES:
        raise SchemaError(
            f"{len(modules)} modules, above the limit of {spec.MAX_MODULES} (spec/v1.md §16)", path=path
        )
    validate_document(document, path=path)
    return AdapterMetadata.from_dict(document)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            text = f.read(spec.MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise InputNotFoundError("no such file", path=path) from None
    except OSError as exc:
        raise InputNotFoundError(
            f"cannot be read ({exc.strerror or exc.__class__.__name__})", path=path
        ) from None
    if len(text) > spec.MAX_CONFIG_BYTES:
        raise AdapterError(f"is larger than {spec.MAX_CONFIG_BYTES} bytes (spec/v1.md §16)", path=path)
    data = load_json(text, what="", error=AdapterError, path=path)
    if not isinstance(data, dict):
        raise AdapterError("is not a JSON object", path=path)
    return data


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _pickle_refused(path: Path) -> PickleRefusedError:
    src = path.parent if path.name == PEFT_PICKLE else path
    return PickleRefusedError(
        "is a pickle checkpoint, which can run arbitrary code when loaded, and is refused by default; if you "
        f"trust it, convert it once with 'loraformat convert {src} -o adapter.safetensors --allow-pickle' "
        "(loads with torch.load(weights_only=True))",
        path=path,
    )


def _locate(
    p: Path, config_data: dict[str, Any] | None, allow_pickle: bool
) -> tuple[Path, str, dict[str, Any] | None]:
    """(weights file, adapter name, PEFT config or None) for what the user gave."""
    if p.is_dir():
        weights, pickle_file = p / PEFT_WEIGHTS, p / PEFT_PICKLE
        if not weights.is_file() and (p / DIFFUSERS_WEIGHTS).is_file():
            return p / DIFFUSERS_WEIGHTS, p.resolve().name, config_data
        if not weights.is_file():
            if not pickle_file.is_file():
                raise InputNotFoundError(
                    f"is a directory without {PEFT_WEIGHTS} or {PEFT_PICKLE}: not a PEFT adapter directory",
                    path=p,
                )
            if not allow_pickle:
                raise _pickle_refused(pickle_file)
            weights = pickle_file
        if config_data is None and (p / PEFT_CONFIG).is_file():
            config_data = _load_json(p / PEFT_CONFIG)
        return weights, p.resolve().name, config_data
    if p.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise _pickle_refused(p)
    sibling = p.parent / PEFT_CONFIG
    if config_data is None and p.name in (PEFT_WEIGHTS, PEFT_PICKLE) and sibling.is_file():
        config_data = _load_json(sibling)
    name = p.parent.resolve().name if p.name in (PEFT_WEIGHTS, PEFT_PICKLE) else p.stem
    return p, name, config_data


def open_adapter(
    path: str | os.PathLike[str],
    *,
    config: str | os.PathLike[str] | dict[str, Any] | None = None,
    allow_pickle: bool = False,
    check: bool = True,
    base: str | os.PathLike[str] | None = None,
) -> Adapter:
    """Open an adapter of any supported layout. ``check`` raises AdapterError if tensors and metadata disagree.

    A native file's own metadata always wins over a config; a PEFT-style file needs its adapter_config.json
    (beside it as ``adapter_model.safetensors``, or given as ``config``). kohya and diffusers files are
    recognised by their keys (io/layouts.py); ``base`` (a pipeline, component folder or checkpoint) resolves
    kohya's underscored module paths against real module names. Pickles are refused unless ``allow_pickle``,
    and then loaded with ``torch.load(weights_only=True)`` (no code runs).
    """
    from loraformat.io import peft as peft_io

    p = Path(path)
    if not p.exists():
        raise InputNotFoundError("no such file or directory", path=p)
    if isinstance(config, dict):
        config_data: dict[str, Any] | None = config
    elif config is not None:
        config_data = _load_json(Path(config))
    else:
        config_data = None

    file, name, config_data = _locate(p, config_data, allow_pickle)
    if file.suffix in PICKLE_SUFFIXES:
        if config_data is None:
            raise AdapterError(
                f"a pickle adapter needs its {PEFT_CONFIG} (beside it, or --config)", path=file
            )
        adapter = _open_pickle(file, config_data, name, str(p))
    else:
        source = SafetensorsSource(file)
        raw = source.header.metadata
        if METADATA_KEY in raw:
            meta = parse_native_metadata(raw, path=str(file))
            adapter = Adapter(meta, source, Format.LORAFORMAT, str(p), dict(raw), config_data)
        elif config_data is not None:
            meta = peft_io.metadata_from_peft(config_data, source.infos, name=name, path=str(file))
            adapter = Adapter(meta, source, Format.PEFT, str(p), dict(raw), config_data)
        else:
            adapter = _open_layout(source, name, str(p), base)
    if check:
        adapter.check()
    return adapter


def _open_layout(
    source: SafetensorsSource, name: str, given: str, base: str | os.PathLike[str] | None
) -> Adapter:
    """A kohya or diffusers file, seen under canonical keys (a PEFT-keyed file needs its config)."""
    from loraformat.io.layouts import detect_layout, read_layout
    from loraformat.io.pipeline import base_module_names

    layout = detect_layout(source.header)
    if layout == Format.PEFT:
        raise AdapterError(
            f"has no loraformat metadata and no {PEFT_CONFIG} beside it; give the PEFT config with "
            "--config, or convert the adapter first",
            path=source.path,
        )
    modules = base_module_names(base) if base is not None and layout == Format.KOHYA else None
    meta, renamed = read_layout(source.header, layout, name=name, base_modules=modules)
    return Adapter(meta, renamed, Format(layout), given, dict(source.header.metadata), None)


def _open_pickle(file: Path, config_data: dict[str, Any], name: str, given: str) -> Adapter:
    import pickle

    import torch

    from loraformat.io import peft as peft_io

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc.__class__.__name__
        raise AdapterError(
            f"cannot be loaded with torch.load(weights_only=True): {first}", path=file
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise AdapterError("pickle does not hold a flat name -> tensor state dict", path=file)
    try:
        source = MemorySource(dict(state), path=str(file))
    except ValueError as exc:
        raise AdapterError(str(exc), path=file) from None
    meta = peft_io.metadata_from_peft(config_data, source.infos, name=name, path=str(file))
    return Adapter(meta, source, Format.PEFT_PICKLE, given, {}, config_data)


def adapter_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """The per-adapter weights of a merge or compose: one finite number per adapter, 1.0 each by default."""
    if weights is None:
        return [1.0] * n
    ws = [float(w) for w in weights]
    if len(ws) != n:
        raise UsageError(f"{len(ws)} weights for {n} adapters: give one weight per adapter")
    if not all(math.isfinite(w) for w in ws):
        raise UsageError("weights must be finite numbers")
    return ws
