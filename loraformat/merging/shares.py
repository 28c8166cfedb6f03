"""Split a merge across workers by output shard: the assignment and the done-file, pure (no I/O, no torch).

Every worker computes the same assignment from the plan alone (shard sizes come from headers), so any scheduler
(a job array, Kubernetes indexed jobs, Ray) can run ``--shard I/N`` without talking to the others. A worker
records what it wrote in a done-file; ``--assemble`` trusts nothing in it until :func:`parse_done` has checked
every field against the plan the assembler computed itself.
"""

from __future__ import annotations

import heapq
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loraformat.constants import SHARE_DONE_FORMAT
from loraformat.errors import UsageError

DONE_FORMAT = SHARE_DONE_FORMAT
#: upper bounds on what a done-file may hold: it comes from a shared directory and is untrusted
MAX_WORKERS = 65536
MAX_DONE_BYTES = 4 << 20
_SHARE = re.compile(r"\s*(\d{1,6})\s*/\s*(\d{1,6})\s*")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class DoneFileError(ValueError):
    """A done-file that is malformed or does not describe this worker's share of this plan."""


@dataclass(frozen=True)
class ShardRecord:
    name: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class DoneRecord:
    """What worker ``worker`` of ``workers`` wrote for the plan whose fingerprint is ``plan``."""

    plan: str
    worker: int
    workers: int
    shards: tuple[ShardRecord, ...]

    def to_bytes(self) -> bytes:
        doc = {
            "format": DONE_FORMAT,
            "plan": self.plan,
            "worker": self.worker,
            "workers": self.workers,
            "shards": [s.to_json() for s in self.shards],
        }
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def parse_share(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N), workers numbered from 0 like ranks and job-array indices: 0 <= I < N."""
    m = _SHARE.fullmatch(text)
    if m is None:
        raise UsageError(f"--shard {text!r}: expected I/N, e.g. 0/8 (worker I of N, numbered from 0)")
    i, n = int(m.group(1)), int(m.group(2))
    check_workers(n, "--shard")
    if i >= n:
        raise UsageError(f"--shard {text}: I must be in 0..{n - 1} (workers are numbered from 0)")
    return i, n


def check_workers(n: int, what: str = "--assemble") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_WORKERS:
        raise UsageError(f"{what}: the number of workers must be between 1 and {MAX_WORKERS}, not {n!r}")
    return n


def assign(sizes: Sequence[int], workers: int) -> list[list[int]]:
    """Shard indices per worker, balanced by bytes: largest shard first, each to the least-loaded worker (ties:
    the lower shard index, then the lower worker index). Each worker's list is in shard order. A pure
    function of the sizes, so every worker computes the same split."""
    check_workers(workers, "workers")
    heap = [(0, w) for w in range(workers)]
    shares: list[list[int]] = [[] for _ in range(workers)]
    for index in sorted(range(len(sizes)), key=lambda k: (-sizes[k], k)):
        load, w = heapq.heappop(heap)
        shares[w].append(index)
        heapq.heappush(heap, (load + sizes[index], w))
    return [sorted(s) for s in shares]


def parse_done(
    data: bytes, *, plan: str, worker: int, workers: int, expected: Sequence[tuple[str, int]]
) -> DoneRecord:
    """Check a done-file against what the assembler computed: format, plan fingerprint, worker number, and
    exactly the expected shards with their sizes; raises :class:`DoneFileError` saying what is wrong."""
    if len(data) > MAX_DONE_BYTES:
        raise DoneFileError(f"is {len(data)} bytes, more than a done-file ever holds")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise DoneFileError("is not JSON (truncated or overwritten)") from None
    keys = {"format", "plan", "worker", "workers", "shards"}
    if not isinstance(doc, dict) or set(doc) != keys:
        raise DoneFileError(f"must be an object with exactly the keys {sorted(keys)}")
    if doc["format"] != DONE_FORMAT:
        raise DoneFileError(f"format {str(doc['format'])[:40]!r} is not {DONE_FORMAT!r}")
    if doc["plan"] != plan:
        raise DoneFileError("was written for other inputs, options or split (its plan fingerprint differs)")
    if doc["worker"] != worker or doc["workers"] != workers or isinstance(doc["worker"], bool):
        raise DoneFileError(
            f"names worker {str(doc['worker'])[:12]}/{str(doc['workers'])[:12]}, not {worker}/{workers}"
        )
    shards = doc["shards"]
    if not isinstance(shards, list) or len(shards) != len(expected):
        raise DoneFileError(f"must list exactly the {len(expected)} shard(s) assigned to worker {worker}")
    records = []
    for entry, (name, size) in zip(shards, expected, strict=True):
        if not isinstance(entry, dict) or set(entry) != {"name", "size", "sha256"}:
            raise DoneFileError("each shard must be an object with name, size and sha256")
        if entry["name"] != name:
            raise DoneFileError(f"lists {str(entry['name'])[:80]!r} where the plan assigns {name!r}")
        if entry["size"] != size or isinstance(entry["size"], bool):
            raise DoneFileError(f"{name}: size {str(entry['size'])[:20]} differs from the planned {size}")
        if not isinstance(entry["sha256"], str) or not _HEX64.fullmatch(entry["sha256"]):
            raise DoneFileError(f"{name}: sha256 is not 64 lowercase hex digits")
        records.append(ShardRecord(name, size, entry["sha256"]))
    return DoneRecord(plan, worker, workers, tuple(records))
