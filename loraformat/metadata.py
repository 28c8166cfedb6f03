"""The loraformat metadata document (spec/v1.md §Metadata ↔ schemas/adapter-v1.schema.json) as dataclasses.

Each dataclass mirrors one object of the schema. ``from_dict`` keeps unknown fields (``extra``) so a file of a
newer minor version round-trips without losing what this reader does not understand.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field, fields
from typing import Any

from loraformat import spec
from loraformat.constants import SPEC_VERSION, LayerKind, ScalingRule


def _split_known(cls: type, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    names = {f.name for f in fields(cls)} - {"extra"}
    known = {k: v for k, v in data.items() if k in names}
    extra = {k: v for k, v in data.items() if k not in names}
    return known, extra


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class ModuleEntry:
    """One adapted module: spec/v1.md §Modules. Fully resolved: no patterns."""

    kind: str  # linear | embedding | conv
    rank: int
    alpha: float
    in_features: int
    out_features: int
    base_tensor: str  # the base weight this module's delta adds to
    fan_in_fan_out: bool = False  # base weight stored (in, out), as GPT-2's Conv1D
    kernel_size: list[int] | None = None  # conv only
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": self.kind,
            "rank": self.rank,
            "alpha": _num(self.alpha),
            "in_features": self.in_features,
            "out_features": self.out_features,
            "base_tensor": self.base_tensor,
            "fan_in_fan_out": self.fan_in_fan_out,
        }
        if self.kernel_size is not None:
            d["kernel_size"] = list(self.kernel_size)
        return {**self.extra, **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModuleEntry:
        known, extra = _split_known(cls, data)
        return cls(**known, extra=extra)

    @property
    def base_shape(self) -> tuple[int, ...]:
        """The shape of the base weight this module merges into."""
        if self.kind == LayerKind.EMBEDDING:
            return (self.in_features, self.out_features)
        if self.kind == LayerKind.CONV:
            return (self.out_features, self.in_features, *(self.kernel_size or []))
        if self.fan_in_fan_out:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)


@dataclass
class BaseQuantization:
    """spec/v1.md §Base quantization (1.1): how the base the adapter was trained against was quantized."""

    method: str  # bnb-nf4 | bnb-fp4 | bnb-int8 | fp8-e4m3 | fp8-e5m2 (constants.QuantMethod)
    block_size: int | list[int] | None = None  # bnb 4-bit: elements per block; fp8 block layout: [rows, cols]
    double_quant: bool | None = None  # bnb 4-bit: the block scales are themselves 8-bit quantized
    compute_dtype: str | None = None  # bfloat16 | float16 | float32
    scale_layout: str | None = None  # fp8: tensor | channel | block
    source: str | None = None  # where it was read: config | peft-card | user
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "method": self.method,
            "block_size": list(self.block_size) if isinstance(self.block_size, list) else self.block_size,
            "double_quant": self.double_quant,
            "compute_dtype": self.compute_dtype,
            "scale_layout": self.scale_layout,
            "source": self.source,
        }
        return {**self.extra, **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseQuantization:
        known, extra = _split_known(cls, data)
        known.setdefault("method", "")
        return cls(**known, extra=extra)


@dataclass
class BaseModel:
    """spec/v1.md §Base model identity."""

    id: str | None = None
    revision: str | None = None
    structure_hash: str | None = None
    content_hash: str | None = None
    hash_algorithm: str | None = None
    target_digests: dict[str, str] = field(default_factory=dict)  # base tensor name -> hex digest
    quantization: BaseQuantization | None = None  # 1.1: the base was quantized for training (QLoRA, FP8)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "revision": self.revision,
            "structure_hash": self.structure_hash,
            "content_hash": self.content_hash,
            "hash_algorithm": self.hash_algorithm,
            "target_digests": dict(sorted(self.target_digests.items())),
            "quantization": self.quantization.to_dict() if self.quantization else None,
        }
        return {**self.extra, **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseModel:
        known, extra = _split_known(cls, data)
        q = known.get("quantization")
        known["quantization"] = BaseQuantization.from_dict(q) if isinstance(q, dict) else None
        return cls(**known, extra=extra)

    def same_base(self, other: BaseModel) -> bool:
        """True when nothing recorded contradicts that both name the same base."""
        for attr in ("content_hash", "structure_hash"):
            a, b = getattr(self, attr), getattr(other, attr)
            if a and b:
                return a == b
        if self.id and other.id:
            return self.id == other.id
        return True


@dataclass
class Parent:
    """spec/v1.md §Provenance: one input of a compose or rescale."""

    content_hash: str | None
    weight: float = 1.0
    name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra,
            "content_hash": self.content_hash,
            "weight": _num(self.weight),
            "name": self.name,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Parent:
        known, extra = _split_known(cls, data)
        return cls(**known, extra=extra)


@dataclass
class Provenance:
    method: str  # "train", "convert", "cat", "svd", "ties", "rescale", ...
    parents: list[Parent] = field(default_factory=list)
    rank: int | str | None = None  # target rank of a compose/rescale ("auto:0.99" allowed)
    source_format: str | None = None  # "peft", "peft-pickle", "loraformat"
    details: dict[str, Any] = field(default_factory=dict)  # method parameters: density, seed, energy kept
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra,
            "method": self.method,
            "parents": [p.to_dict() for p in self.parents],
            "rank": self.rank,
            "source_format": self.source_format,
            "details": self.details,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Provenance:
        known, extra = _split_known(cls, data)
        known["parents"] = [Parent.from_dict(p) for p in known.get("parents", [])]
        return cls(**known, extra=extra)


@dataclass
class AdapterMetadata:
    """The whole document stored under ``__metadata__["loraformat"]``."""

    modules: dict[str, ModuleEntry]
    scaling: str = ScalingRule.STANDARD
    dora: bool = False
    bias: str = "none"
    lora_bias: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    #: tensor key in the file -> base tensor it replaces (modules_to_save, bias, saved embedding base layers)
    saved_tensors: dict[str, str] = field(default_factory=dict)
    name: str = "adapter"
    description: str = ""
    task: str | None = None
    license: str | None = None
    created: str = field(default_factory=now_iso)
    created_by: dict[str, str] = field(default_factory=dict)
    base_model: BaseModel = field(default_factory=BaseModel)
    provenance: Provenance | None = None
    content_hash: str | None = None
    spec_version: str = SPEC_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def scale(self, module: str) -> float:
        m = self.modules[module]
        return spec.scale_for(self.scaling, m.rank, m.alpha)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "spec_version": self.spec_version,
            "name": self.name,
            "description": self.description,
            "task": self.task,
            "license": self.license,
            "created": self.created,
            "created_by": self.created_by,
            "scaling": self.scaling,
            "dora": self.dora,
            "bias": self.bias,
            "lora_bias": self.lora_bias,
            "modules": {k: v.to_dict() for k, v in sorted(self.modules.items())},
            "modules_to_save": list(self.modules_to_save),
            "saved_tensors": dict(sorted(self.saved_tensors.items())),
            "base_model": self.base_model.to_dict(),
            "provenance": self.provenance.to_dict() if self.provenance else None,
            "content_hash": self.content_hash,
        }
        return {**self.extra, **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterMetadata:
        known, extra = _split_known(cls, data)
        known["modules"] = {k: ModuleEntry.from_dict(v) for k, v in known.get("modules", {}).items()}
        known["base_model"] = BaseModel.from_dict(known.get("base_model") or {})
        prov = known.get("provenance")
        known["provenance"] = Provenance.from_dict(prov) if prov else None
        for key in ("task", "license"):
            known.setdefault(key, None)
        return cls(**known, extra=extra)

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})

    @property
    def alphas(self) -> list[float]:
        return sorted({m.alpha for m in self.modules.values()})


def _num(x: float) -> float | int:
    """Write 16.0 as 16 so JSON stays readable and PEFT configs keep ints where they had them; a float too large
    for an exact integer (beyond 2**53) stays a float, so every reader (ours included) reads it back."""
    return int(x) if float(x).is_integer() and abs(x) <= 2**53 else float(x)
