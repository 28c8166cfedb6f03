"""diffusers pipeline directories on disk: ``model_index.json`` plus one folder per component (unet/,
transformer/, text_encoder*/, vae/, ...). Headers only; nothing is loaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

from loraformat.constants import MODEL_INDEX, PIPELINE_COMPONENTS
from loraformat.errors import HeaderError, InputNotFoundError
from loraformat.io.checkpoint import Checkpoint, open_checkpoint


def is_pipeline(path: str | os.PathLike[str]) -> bool:
    return Path(path, MODEL_INDEX).is_file()


def pipeline_components(path: str | os.PathLike[str]) -> dict[str, Path]:
    """The component folders model_index.json names (``"_"``-keys are settings, not components), each checked
    to be a plain sub-folder of the pipeline."""
    root = Path(path)
    try:
        index = json.loads((root / MODEL_INDEX).read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise HeaderError(f"is not a readable JSON object ({exc})", path=root / MODEL_INDEX) from None
    if not isinstance(index, dict):
        raise HeaderError("is not a JSON object", path=root / MODEL_INDEX)
    out = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list):
            continue
        if not name.isidentifier():
            raise HeaderError(
                f"names a component {name!r} that is not a plain folder name", path=root / MODEL_INDEX
            )
        if (root / name).is_dir():
            out[name] = root / name
    return out


def component_of(folder: Path) -> str:
    """A component folder's role: its name when it is one of the LoRA-targeted components, else '*'."""
    return folder.name if folder.name in PIPELINE_COMPONENTS else "*"


def module_names(ck: Checkpoint) -> list[str]:
    """Module paths of a checkpoint: every tensor ending in .weight, the suffix removed."""
    return sorted(name[: -len(".weight")] for name in ck.locations if name.endswith(".weight"))


def base_module_names(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Module names per component of a pipeline, a component folder or a single checkpoint ('*': any)."""
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError("no such file or directory", path=p)
    if is_pipeline(p):
        out = {}
        for name, folder in pipeline_components(p).items():
            if any(folder.glob("*.safetensors")):
                out[name] = module_names(open_checkpoint(folder))
        return out
    return {component_of(p) if p.is_dir() else "*": module_names(open_checkpoint(p))}
