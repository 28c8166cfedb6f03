"""Verification of the base tensors a merge targets against the digests their adapters recorded (spec/v1.md §9),
on the stored bytes as the merge maps them, one chunk at a time, each dropped from memory once hashed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loraformat.errors import HashMismatchError
from loraformat.hashing import start_tensor_digest
from loraformat.merging.files import Sources

HASH_CHUNK = 64 << 20  # bytes hashed (and prefetched, merging/engine.py) at a time


def verify_digests(task: Any, sources: Sources, check_abort: Callable[[], None]) -> None:
    """Hash ``task``'s stored base tensor and compare with every digest recorded for it (HashMismatchError names
    the adapter). The pages are dropped as they are hashed: the merge faults them in again when it reads."""
    base = task.base
    digest = start_tensor_digest(task.name, base.dtype, task.src_shape)
    for pos in range(0, base.nbytes, HASH_CHUNK):
        check_abort()
        n = min(HASH_CHUNK, base.nbytes - pos)
        view = sources.view(base.path, base.start + pos, n)
        try:
            digest.update(view)
        finally:
            view.release()
        sources.drop(base.path, base.start + pos, n)
    actual = digest.hexdigest()
    for expected, label in task.digests:
        if expected != actual:
            raise HashMismatchError(
                f"base tensor {task.name!r} differs from the digest recorded by adapter {label}: the base "
                "changed after the adapter was stamped, or it is another base (--no-verify skips this check)",
                path=base.path,
            )
