"""The model card (README.md) pushed with every adapter, built with huggingface_hub's ModelCard/ModelCardData so
that the Hub indexes it as a PEFT adapter of its base (``base_model_relation: adapter``, tag
``base_model:adapter:<base>``) and so that readers see rank, alpha, targets and hashes without downloading.

The card holds no timestamp: pushing the same adapter twice yields the same README, and the Hub skips the
empty commit.
"""

from __future__ import annotations

import math
import re

from loraformat import spec
from loraformat.constants import LayerKind
from loraformat.metadata import AdapterMetadata

#: licence ids the Hugging Face Hub accepts in card metadata (a common subset; anything else becomes "other")
HF_LICENSES = {
    "apache-2.0",
    "mit",
    "openrail",
    "openrail++",
    "bigscience-openrail-m",
    "creativeml-openrail-m",
    "bigscience-bloom-rail-1.0",
    "bigcode-openrail-m",
    "afl-3.0",
    "artistic-2.0",
    "bsl-1.0",
    "bsd",
    "bsd-2-clause",
    "bsd-3-clause",
    "bsd-3-clause-clear",
    "cc",
    "cc0-1.0",
    "cc-by-2.0",
    "cc-by-2.5",
    "cc-by-3.0",
    "cc-by-4.0",
    "cc-by-sa-3.0",
    "cc-by-sa-4.0",
    "cc-by-nc-2.0",
    "cc-by-nc-3.0",
    "cc-by-nc-4.0",
    "cc-by-nd-4.0",
    "cc-by-nc-nd-3.0",
    "cc-by-nc-nd-4.0",
    "cc-by-nc-sa-2.0",
    "cc-by-nc-sa-3.0",
    "cc-by-nc-sa-4.0",
    "wtfpl",
    "ecl-2.0",
    "epl-1.0",
    "epl-2.0",
    "eupl-1.1",
    "eupl-1.2",
    "agpl-3.0",
    "gfdl",
    "gpl",
    "gpl-2.0",
    "gpl-3.0",
    "lgpl",
    "lgpl-2.1",
    "lgpl-3.0",
    "isc",
    "mpl-2.0",
    "odc-by",
    "odbl",
    "osl-3.0",
    "postgresql",
    "ofl-1.1",
    "ncsa",
    "unlicense",
    "zlib",
    "pddl",
    "llama2",
    "llama3",
    "llama3.1",
    "llama3.2",
    "llama3.3",
    "llama4",
    "gemma",
    "unknown",
    "other",
}
PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def hub_model_id(base_id: str | None) -> str | None:
    """The base id if it names a Hub model (``org/name`` or ``name``); None for a local path or nothing."""
    if base_id and _HUB_ID.match(base_id) and ".." not in base_id:
        return base_id
    return None


def _range(values: list[float]) -> str:
    fmt = [f"{v:g}" for v in values]
    return fmt[0] if len(fmt) == 1 else f"{fmt[0]}–{fmt[-1]} (per module)"


def lora_parameters(meta: AdapterMetadata) -> int:
    total = 0
    for m in meta.modules.values():
        k = math.prod(m.kernel_size or []) if m.kind == LayerKind.CONV else 1
        total += m.rank * m.in_features * k + m.out_features * m.rank
    return total


def target_names(meta: AdapterMetadata) -> list[str]:
    """Module suffixes (q_proj, v_proj ...) as a reader thinks of targets."""
    return sorted({name.rsplit(".", 1)[-1] for name in meta.modules})


def card_metadata(meta: AdapterMetadata) -> dict[str, object]:
    """The YAML front matter as a dict (what ModelCardData serialises)."""
    base = hub_model_id(meta.base_model.id)
    tags = ["lora", "loraformat", "peft"] + ([f"base_model:adapter:{base}"] if base else [])
    data: dict[str, object] = {"library_name": "peft", "tags": tags}
    if base:
        data["base_model"] = base
        data["base_model_relation"] = "adapter"
    if meta.license:
        lic = meta.license.strip().lower()
        if lic in HF_LICENSES:
            data["license"] = lic
        else:
            data["license"], data["license_name"] = (
                "other",
                re.sub(r"[^a-z0-9.-]+", "-", lic).strip("-") or "custom",
            )
    if meta.task in PIPELINE_TAGS:
        data["pipeline_tag"] = PIPELINE_TAGS[meta.task]
    return data


def model_card(meta: AdapterMetadata, *, repo_id: str, ref: str, content_hash: str, size: int) -> str:
    """README.md for an adapter repository. ``ref`` is the hub reference users give loraformat
    (``hf://org/name`` or ``lfhub://org/name``)."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(**card_metadata(meta))  # type: ignore[arg-type]
    base_for_code = hub_model_id(meta.base_model.id) or "path/to/base-model"
    rows = _summary_rows(meta, content_hash, size)
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    short = repo_id.split("/")[-1]
    peft_source = (
        repo_id if ref.startswith("hf://") else f"./{short}"
    )  # a local-hub repo: the pulled directory
    description = f"\n{meta.description.strip()}\n" if meta.description and meta.description.strip() else ""
    body = f"""
# {meta.name}
{description}
A LoRA adapter in the [loraformat](https://github.com/loraformat/loraformat) format.
`adapter_model.safetensors` is a self-describing loraformat file (spec {meta.spec_version}) whose tensor keys
follow PEFT's naming, and `adapter_config.json` is the matching PEFT config, so PEFT and vLLM load this
repository as it is.

## Summary

| | |
|---|---|
{table}

## Usage

With loraformat (verifies the adapter's content hash, and the base's tensor digests while merging):

```bash
loraformat pull {repo_id} -o ./{short}
loraformat merge ./base-model {ref} -o ./merged
```

With PEFT:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{base_for_code}")
model = PeftModel.from_pretrained(base, "{peft_source}")
```
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def _summary_rows(meta: AdapterMetadata, content_hash: str, size: int) -> list[tuple[str, str]]:
    """The card's summary table: base identity, rank/alpha/scaling, targets, sizes and hashes."""
    bm = meta.base_model
    base = bm.id or "(not recorded)"
    ranks, alphas = meta.ranks, meta.alphas
    scaling = meta.scaling
    if len(ranks) == 1 and len(alphas) == 1:
        scaling += f" (s = {spec.scale_for(meta.scaling, ranks[0], alphas[0]):g})"
    targets = target_names(meta)
    return [
        ("base model", f"`{base}`" + (f" @ `{bm.revision}`" if bm.revision else "")),
        ("rank", _range([float(r) for r in ranks])),
        ("alpha", _range(alphas)),
        ("scaling", scaling),
        ("targets", f"{len(meta.modules)} modules: " + ", ".join(f"`{t}`" for t in targets)),
        ("DoRA", "yes" if meta.dora else "no"),
        ("LoRA parameters", f"{lora_parameters(meta):,}"),
        ("base structure hash", f"`{bm.structure_hash}`" if bm.structure_hash else "not recorded"),
        ("base content hash", f"`{bm.content_hash}`" if bm.content_hash else "not recorded"),
        ("adapter content hash", f"`{content_hash}` (sha256 of the tensor data)"),
        ("file size", f"{size:,} bytes"),
    ]
