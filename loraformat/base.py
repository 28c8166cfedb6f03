"""How an adapter relates to a base checkpoint: target checks, structure/digest verification, stamping.

Shared by ``validate --level base``, ``convert --base`` and ``merge``, so all three agree on what "fits" means.
"""

from __future__ import annotations

from loraformat.constants import FindingCode, LayerKind, Problem
from loraformat.hashing import BaseHashes, hash_tensors, structure_hash
from loraformat.io.checkpoint import Checkpoint
from loraformat.metadata import AdapterMetadata, ModuleEntry


def infer_fan_in_fan_out(meta: AdapterMetadata, ck: Checkpoint) -> None:
    """Set fan_in_fan_out per linear module from the base's weight layout, as PEFT does by layer type: it
    forces True for GPT-2's Conv1D (weight stored (in, out)) and False for nn.Linear ((out, in)), whatever the
    config said. A square weight does not show its layout; it follows the non-square linear targets of the
    same base when they all agree, and keeps the recorded value otherwise."""
    votes: set[bool] = set()
    square: list[ModuleEntry] = []
    for entry in meta.modules.values():
        shape = ck.logical_shape(entry.base_tensor)
        if entry.kind != LayerKind.LINEAR or shape is None or len(shape) != 2:
            continue
        if entry.in_features == entry.out_features:
            square.append(entry)
        elif shape == (entry.in_features, entry.out_features):
            entry.fan_in_fan_out = True
            votes.add(True)
        elif shape == (entry.out_features, entry.in_features):
            entry.fan_in_fan_out = False
            votes.add(False)
    if len(votes) == 1:
        layout = votes.pop()
        for entry in square:
            entry.fan_in_fan_out = layout


def base_problems(meta: AdapterMetadata, ck: Checkpoint) -> list[Problem]:
    """Header-only checks: every target exists with the shape the adapter implies, every saved tensor replaces
    a base tensor of its own shape, and the recorded structure hash matches."""
    out: list[Problem] = []
    for module, entry in sorted(meta.modules.items()):
        shape = ck.logical_shape(entry.base_tensor)
        if shape is None:
            out.append((FindingCode.MISSING_TARGET, module, f"base has no tensor {entry.base_tensor!r}"))
        elif shape != entry.base_shape:
            out.append(
                (
                    FindingCode.TARGET_SHAPE,
                    module,
                    f"base tensor {entry.base_tensor!r} is {list(shape)}, adapter expects "
                    f"{list(entry.base_shape)}",
                )
            )
    for key, base_name in sorted(meta.saved_tensors.items()):
        if ck.info(base_name) is None:
            out.append((FindingCode.MISSING_TARGET, key, f"base has no tensor {base_name!r} to replace"))
    recorded = meta.base_model.structure_hash
    if recorded and recorded != structure_hash(ck):
        out.append(
            (
                FindingCode.STRUCTURE_HASH,
                "base_model.structure_hash",
                "base structure hash differs from the one recorded: this adapter was made for another base",
            )
        )
    return out


def saved_shape_problems(
    meta: AdapterMetadata, ck: Checkpoint, shapes: dict[str, tuple[int, ...]]
) -> list[Problem]:
    """Saved whole tensors (modules_to_save, biases, embedding base layers) whose shape differs from the base
    tensor they replace, e.g. an embedding resized during training; ``shapes`` maps tensor key -> shape."""
    out: list[Problem] = []
    for key, base_name in sorted(meta.saved_tensors.items()):
        info = ck.info(base_name)
        if info is not None and key in shapes and tuple(shapes[key]) != info.shape:
            out.append(
                (
                    FindingCode.SAVED_SHAPE,
                    key,
                    f"replaces base tensor {base_name!r} of shape {list(info.shape)} "
                    f"but is {list(shapes[key])}",
                )
            )
    return out


def digest_problems(meta: AdapterMetadata, ck: Checkpoint) -> list[Problem]:
    """Read and hash every recorded target tensor; report each digest that differs."""
    recorded = {k: v for k, v in meta.base_model.target_digests.items() if ck.info(k) is not None}
    actual = hash_tensors(ck, recorded)
    return [
        (FindingCode.TARGET_DIGEST, name, "base tensor content differs from the digest the adapter recorded")
        for name in sorted(recorded)
        if actual[name] != recorded[name]
    ]


def target_tensors(meta: AdapterMetadata) -> list[str]:
    return sorted({m.base_tensor for m in meta.modules.values()})


def stamp(meta: AdapterMetadata, ck: Checkpoint, hashes: BaseHashes, *, base_id: str | None = None) -> None:
    """Record the base identity, both hashes and the digests of exactly the targeted tensors."""
    bm = meta.base_model
    if base_id:
        bm.id = base_id
    elif not bm.id:
        bm.id = ck.path.name
    bm.structure_hash = hashes.structure_hash
    bm.content_hash = hashes.content_hash
    bm.hash_algorithm = hashes.algorithm
    bm.target_digests = {name: hashes.tensor_digests[name] for name in target_tensors(meta)}
