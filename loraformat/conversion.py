"""``loraformat convert``: any supported adapter layout -> a native file or a PEFT directory.

The input is only read; the output is checked (schema, tensors against metadata) before it is written and
appears atomically: a failure leaves nothing under its name, and an existing output is kept unless --overwrite.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraformat.adapter import Adapter, open_adapter
from loraformat.base import base_problems, infer_fan_in_fan_out, saved_shape_problems, stamp
from loraformat.components import check_pipeline_base, fits_as_is, qualify, requalified_tensors
from loraformat.constants import CONVERT_TARGETS, PEFT_CONFIG, PEFT_WEIGHTS, Format
from loraformat.errors import BaseMismatchError, UsageError
from loraformat.hashing import hash_base
from loraformat.io.atomic import atomic_dir
from loraformat.io.checkpoint import Checkpoint, open_checkpoint, read_config, read_model_card
from loraformat.io.diffusers import write_diffusers
from loraformat.io.kohya import write_kohya
from loraformat.io.names import split_component
from loraformat.io.native import write_native
from loraformat.io.peft import peft_config_from_metadata
from loraformat.io.pipeline import is_pipeline
from loraformat.io.quantized import attach as attach_quantized
from loraformat.metadata import AdapterMetadata, BaseQuantization, Provenance
from loraformat.quantization import from_peft_card, from_quantization_config, parse_user_spec
from loraformat.rules import check_not_an_input, first_problem


def _write_native(out: Path, meta: AdapterMetadata, tensors: dict[str, Any], *, overwrite: bool) -> str:
    return write_native(out, meta, tensors, overwrite=overwrite)


def _write_peft(out: Path, meta: AdapterMetadata, tensors: dict[str, Any], *, overwrite: bool) -> str:
    return write_peft_dir(out, meta, tensors, overwrite=overwrite)


#: convert --to NAME -> writer(output, metadata, canonical tensors, overwrite=) returning the content hash;
#: engine exports add their entry here
WRITERS: dict[Format, Callable[..., str]] = {
    Format.LORAFORMAT: _write_native,
    Format.PEFT: _write_peft,
    Format.KOHYA: write_kohya,
    Format.DIFFUSERS: write_diffusers,
}


@dataclass
class ConvertResult:
    output: str
    to: str
    content_hash: str
    modules: int
    base_stamped: bool
    source_format: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def adapter_tensors(adapter: Adapter) -> dict[str, Any]:
    """Every tensor of the adapter, in memory (adapters are small: ranks 4-64 over a few hundred modules)."""
    return {k: adapter.tensor(k) for k in adapter.source.infos}


def write_peft_dir(
    out: str | os.PathLike[str], meta: AdapterMetadata, tensors: dict[str, Any], *, overwrite: bool = False
) -> str:
    """A PEFT adapter directory whose weights file is the native (self-describing) loraformat file: PEFT reads
    the tensors and the generated config, loraformat reads the full metadata."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        content_hash = write_native(tmp / PEFT_WEIGHTS, meta, tensors)
        config = peft_config_from_metadata(meta)
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", "utf-8")
    return content_hash


def _check_paths(src: Path, dst: Path, config: str | os.PathLike[str] | None) -> None:
    """Refuse any output that would overwrite or delete an input (inputs are never modified)."""
    check_not_an_input(dst, [src] if config is None else [src, config])


def training_quantization(
    source_format: str, adapter_path: str, ck: Checkpoint | None, user: str | None
) -> tuple[bool, BaseQuantization | None]:
    """(whether anything said so, the base quantization) of spec §8 Base quantization: ``--base-quantization``
    wins; else the base's config.json ``quantization_config``; else the bitsandbytes config a PEFT card lists."""
    if user is not None:
        return True, parse_user_spec(user)
    if ck is not None:
        config = read_config(ck)
        if config is not None and config.get("quantization_config") is not None:
            return True, from_quantization_config(config["quantization_config"], "config")
    if source_format != Format.LORAFORMAT:
        card = read_model_card(adapter_path)
        found = from_peft_card(card) if card else None
        if found is not None:
            return True, found
    return False, None


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str | None = None,
    engine: str | None = None,
    max_rank: int | None = None,
    uniform: bool = False,
    base: str | os.PathLike[str] | None = None,
    name: str | None = None,
    base_id: str | None = None,
    base_quantization: str | None = None,
    description: str | None = None,
    task: str | None = None,
    license: str | None = None,
    config: str | os.PathLike[str] | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    use_cache: bool = True,
    progress: Callable[[int], None] | None = None,
    component: str | None = None,
) -> ConvertResult:
    """Convert ``src`` (native file, PEFT dir, PEFT .safetensors + ``config``, pickle with ``allow_pickle``,
    kohya or diffusers file) to any of CONVERT_TARGETS (constants.py): a native file, a PEFT directory, a kohya
    or diffusers file. ``engine`` ("vllm", "llama.cpp", "peft") writes the layout that engine reads so that its
    reading rule yields exactly the adapter (loraformat/exporting.py; a GGUF file for llama.cpp), optionally under
    ``max_rank`` or with one ``uniform`` rank and alpha.
    ``base`` stamps the base identity, both hashes and the digests of exactly the targeted tensors, after
    checking that every target fits; a diffusers pipeline base is checked per component (and resolves kohya
    names) but not stamped. ``component`` declares which pipeline model a single-model adapter is for.
    ``base_quantization`` (``--base-quantization``) records how the training base was quantized, overriding the
    base's config and a PEFT card (:func:`training_quantization`)."""
    from loraformat.engines import target_for

    to = target_for(engine, to)
    if to not in CONVERT_TARGETS:
        raise UsageError(f"--to must be one of {', '.join(CONVERT_TARGETS)}, not {to!r}")
    if engine is not None or to == Format.GGUF or max_rank is not None or uniform:
        _check_paths(Path(src), Path(dst), config)
        return _engine_export(
            src, dst, to, engine, base, max_rank, uniform, config, allow_pickle, overwrite=overwrite
        )
    src_p, dst_p = Path(src), Path(dst)
    _check_paths(src_p, dst_p, config)
    with open_adapter(src_p, config=config, allow_pickle=allow_pickle, base=base) as adapter:
        meta = copy.deepcopy(adapter.meta)
        source_format = adapter.source_format
        adapter_path = adapter.path
        tensors = adapter_tensors(adapter)
    if source_format != Format.LORAFORMAT:
        read = meta.provenance
        keep = read is not None and read.source_format == source_format
        meta.provenance = read if keep else Provenance(method="convert", source_format=source_format)
    if component is not None:
        qualify(meta, component)
        tensors = requalified_tensors(tensors, component)
    for attr, value in (("name", name), ("description", description), ("task", task), ("license", license)):
        if value is not None:
            setattr(meta, attr, value)
    if base_id is not None:
        meta.base_model.id = base_id
    ck = open_checkpoint(base) if base is not None and not is_pipeline(base) else None
    found, quant = training_quantization(source_format, adapter_path, ck, base_quantization)
    if found:
        meta.base_model.quantization = quant
    if base is not None:
        _check_base(meta, base, tensors, src, base_id=base_id, use_cache=use_cache, progress=progress)
    meta.created_by = {}
    content_hash = WRITERS[Format(to)](dst_p, meta, tensors, overwrite=overwrite)
    return ConvertResult(str(dst), to, content_hash, len(meta.modules), base is not None, source_format)


def _engine_export(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    to: str,
    engine: str | None,
    base: str | os.PathLike[str] | None,
    max_rank: int | None,
    uniform: bool,
    config: str | os.PathLike[str] | None,
    allow_pickle: bool,
    *,
    overwrite: bool,
) -> ConvertResult:
    """``--for`` / ``--to gguf`` / ``--max-rank`` / ``--uniform``: an engine's layout (loraformat/exporting.py)."""
    if to not in (Format.PEFT, Format.GGUF):
        raise UsageError("--for, --max-rank and --uniform write an engine's layout: --to peft or gguf")
    from loraformat.exporting import export

    return export(
        src,
        dst,
        engine=engine,
        to=to,
        base=base,
        max_rank=max_rank,
        uniform=uniform,
        config=config,
        allow_pickle=allow_pickle,
        overwrite=overwrite,
    )


def _check_base(
    meta: AdapterMetadata,
    base: str | os.PathLike[str],
    tensors: dict[str, Any],
    src: str | os.PathLike[str],
    *,
    base_id: str | None,
    use_cache: bool,
    progress: Callable[[int], None] | None,
) -> None:
    """Refuse an adapter that does not fit the base; stamp a single-checkpoint base's identity."""
    qualified = any(split_component(m)[0] for m in meta.modules)
    if is_pipeline(base) or (qualified and not fits_as_is(meta, base)):
        check_pipeline_base(meta, base, path=os.fspath(src))
        return
    ck = open_checkpoint(base)
    attach_quantized(ck, check_scales=False)  # a quantized base: targets have their logical shapes
    infer_fan_in_fan_out(meta, ck)
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    problems = base_problems(meta, ck) + saved_shape_problems(meta, ck, shapes)
    if problems:
        raise BaseMismatchError(f"does not fit base {base}: {first_problem(problems)}", path=src)
    stamp(meta, ck, hash_base(ck, use_cache=use_cache, progress=progress), base_id=base_id)
