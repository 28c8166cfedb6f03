"""The one Adapter model every command uses: the resolved metadata plus lazy per-tensor access.

``open_adapter`` detects what it is given (a native loraformat file, a PEFT directory, a PEFT-style
.safetensors with its config, a pickle with ``allow_pickle``) and returns the same model for all of them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraformat import spec
from loraformat.errors import AdapterError, InputNotFoundError, PickleRefusedError, SchemaError
from loraformat.io.tensors import MemorySource, SafetensorsSource, TensorSource
from loraformat.metadata import AdapterMetadata, ModuleEntry
from loraformat.schema import validate_document

if TYPE_CHECKING:
    import torch

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_PICKLE = "adapter_model.bin"


@dataclass(frozen=True)
class ModuleKeys:
    """The tensor keys of one module in the file (PEFT naming, spec/v1.md §Tensor keys)."""

    A: str
    B: str
    magnitude: str | None = None
    bias: str | None = None


def module_keys(module: str, entry: ModuleEntry, *, dora: bool = False, lora_bias: bool = False) -> ModuleKeys:
    prefix = spec.PEFT_PREFIX + module
    if entry.kind == spec.KIND_EMBEDDING:
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
    if entry.kind == spec.KIND_CONV:
        ks = tuple(entry.kernel_size or ())
        return (r, entry.in_features, *ks), (entry.out_features, r, *(1 for _ in ks))
    return (r, entry.in_features), (entry.out_features, r)


@dataclass
class Adapter:
    meta: AdapterMetadata
    source: TensorSource
    source_format: str  # "loraformat" | "peft" | "peft-pickle"
    path: str
    raw_metadata: dict[str, str] = field(default_factory=dict)  # the safetensors __metadata__ as found
    peft_config: dict[str, Any] | None = None

    # -- keys and tensors -------------------------------------------------------------------------------------
    def keys(self, module: str) -> ModuleKeys:
        return module_keys(module, self.meta.modules[module], dora=self.meta.dora, lora_bias=self.meta.lora_bias)

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
    def problems(self) -> list[tuple[str, str, str]]:
        """Every disagreement between tensors and metadata as (code, location, message); header-only."""
        out: list[tuple[str, str, str]] = []
        infos = self.source.infos
        used: set[str] = set()
        for module, entry in sorted(self.meta.modules.items()):
            keys = self.keys(module)
            want_a, want_b = expected_shapes(entry)
            for role, key, want in (("A", keys.A, want_a), ("B", keys.B, want_b)):
                info = infos.get(key)
                if info is None:
                    out.append(("missing-tensor", module, f"lora_{role} tensor {key!r} is missing"))
                    continue
                used.add(key)
                if len(info.shape) != len(want):
                    out.append(("wrong-ndim", module, f"lora_{role} has {len(info.shape)} dims, expected {len(want)}"))
                elif info.shape != want:
                    out.append(
                        ("shape-mismatch", module,
                         f"lora_{role} shape {list(info.shape)} != {list(want)} from metadata (rank {entry.rank})")
                    )
                if info.dtype not in ("F16", "BF16", "F32", "F64"):
                    out.append(("bad-dtype", module, f"lora_{role} dtype {info.dtype} is not floating point"))
            for role, key, want in (("magnitude", keys.magnitude, (entry.out_features,)),
                                    ("bias", keys.bias, (entry.out_features,))):
                if key is None:
                    continue
                info = infos.get(key)
                if info is None:
                    out.append(("missing-tensor", module, f"{role} tensor {key!r} is missing"))
                    continue
                used.add(key)
                if info.shape != want:
                    out.append(("shape-mismatch", module, f"{role} shape {list(info.shape)} != {list(want)}"))
        for key in self.meta.saved_tensors:
            if key not in infos:
                out.append(("missing-tensor", key, "saved tensor listed in metadata is missing"))
            used.add(key)
        for key in sorted(set(infos) - used):
            out.append(("unexpected-tensor", key, "tensor not described by the metadata"))
        return out

    def check(self) -> None:
        """Raise AdapterError on the first problem."""
        problems = self.problems()
        if problems:
            code, where, message = problems[0]
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise AdapterError(f"{where}: {message}{more}", path=self.path)


# --- opening ---------------------------------------------------------------------------------------------------


def parse_native_metadata(raw: dict[str, str], *, path: str) -> AdapterMetadata:
    """Parse and schema-check ``__metadata__["loraformat"]``, applying the versioning rule first."""
    try:
        document = json.loads(raw[spec.METADATA_KEY])
    except ValueError as exc:
        raise SchemaError(f"__metadata__[{spec.METADATA_KEY!r}] is not valid JSON ({exc})", path=path) from None
    if not isinstance(document, dict):
        raise SchemaError(f"__metadata__[{spec.METADATA_KEY!r}] is not a JSON object", path=path)
    spec.check_version(document.get("spec_version"), path=path)
    validate_document(document, path=path)
    return AdapterMetadata.from_dict(document)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise InputNotFoundError("no such file", path=path) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(f"not valid JSON ({exc})", path=path) from None
    if not isinstance(data, dict):
        raise AdapterError("is not a JSON object", path=path)
    return data


def _pickle_refused(path: Path) -> PickleRefusedError:
    return PickleRefusedError(
        "is a pickle checkpoint, which can run code when loaded; convert it with "
        f"'loraformat convert {path.parent if path.name == PEFT_PICKLE else path} -o adapter.safetensors "
        "--allow-pickle' if you trust it",
        path=path,
    )


def open_adapter(
    path: str | os.PathLike[str],
    *,
    config: str | os.PathLike[str] | dict[str, Any] | None = None,
    allow_pickle: bool = False,
    check: bool = True,
) -> Adapter:
    """Open an adapter of any supported layout. ``check`` raises AdapterError if tensors and metadata disagree."""
    from loraformat.io import peft as peft_io

    p = Path(path)
    if not p.exists():
        raise InputNotFoundError("no such file or directory", path=p)
    config_data: dict[str, Any] | None
    if isinstance(config, dict):
        config_data = config
    elif config is not None:
        config_data = _load_json(Path(config))
    else:
        config_data = None

    if p.is_dir():
        weights, pickle_file = p / PEFT_WEIGHTS, p / PEFT_PICKLE
        if not weights.exists():
            if pickle_file.exists():
                if not allow_pickle:
                    raise _pickle_refused(pickle_file)
                weights = pickle_file
            else:
                raise InputNotFoundError(
                    f"is a directory without {PEFT_WEIGHTS}: not a PEFT adapter directory", path=p
                )
        if config_data is None and (p / PEFT_CONFIG).exists():
            config_data = _load_json(p / PEFT_CONFIG)
        file, name = weights, p.name
    else:
        file, name = p, p.stem
        if config_data is None and (p.parent / PEFT_CONFIG).exists() and p.suffix == ".safetensors":
            sibling = p.parent / PEFT_CONFIG
            config_data = _load_json(sibling) if p.name == PEFT_WEIGHTS else None

    if file.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        if not allow_pickle:
            raise _pickle_refused(file)
        if config_data is None:
            raise AdapterError(f"a pickle adapter needs its {PEFT_CONFIG}", path=file)
        adapter = _open_pickle(file, config_data, name)
    else:
        source = SafetensorsSource(file)
        raw = source.header.metadata
        if spec.METADATA_KEY in raw:
            meta = parse_native_metadata(raw, path=str(file))
            adapter = Adapter(meta, source, "loraformat", str(p), dict(raw), config_data)
        elif config_data is not None:
            meta = peft_io.metadata_from_peft(config_data, source.infos, name=name, path=str(file))
            adapter = Adapter(meta, source, "peft", str(p), dict(raw), config_data)
        else:
            raise AdapterError(
                f"has no loraformat metadata and no {PEFT_CONFIG} beside it; pass the PEFT config "
                "(--config) or convert it first",
                path=file,
            )
    if check:
        adapter.check()
    return adapter


def _open_pickle(file: Path, config_data: dict[str, Any], name: str) -> Adapter:
    import torch

    from loraformat.io import peft as peft_io

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds here; each means the same thing to the user
        raise AdapterError(f"could not load pickle with weights_only=True ({exc.__class__.__name__})",
                           path=file) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterError("pickle does not hold a flat name -> tensor state dict", path=file)
    source = MemorySource(dict(state), path=str(file))
    meta = peft_io.metadata_from_peft(config_data, source.infos, name=name, path=str(file))
    return Adapter(meta, source, "peft-pickle", str(file), {}, config_data)
