"""Rules several commands share, written once so that they cannot drift apart: an output may not be an input,
how a list of problems becomes one message, which device a command runs on.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from loraformat.errors import UsageError

_GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg", "/dev/kfd")


def _gpu_may_exist() -> bool:
    """False only when no GPU device node exists, so that CPU-only machines never import torch (seconds) just
    to learn that CUDA is absent."""
    return any(os.path.exists(p) for p in _GPU_NODES)


def resolve_device(device: str, *, staged: bool = False) -> str:
    """'auto' -> 'cuda:N' when CUDA is usable, else 'cpu'; 'cuda' / 'cuda:N' checked; anything else refused.

    ``staged`` also accepts 'cpu-staged': the merge's CUDA orchestration run on CPU (merging/devices.py).
    """
    d = device.strip().lower()
    if d == "cpu" or (staged and d == "cpu-staged"):
        return d
    if d == "auto":
        if "torch" not in sys.modules and not _gpu_may_exist():
            return "cpu"
        import torch

        return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    if d == "cuda" or d.startswith("cuda:"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if d != "cuda":
            try:
                n = int(d.split(":", 1)[1])
            except ValueError:
                raise UsageError(f"--device {device}: expected cuda:N") from None
            if not 0 <= n < torch.cuda.device_count():
                raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
            return d
        return f"cuda:{torch.cuda.current_device()}"
    choices = "auto, cpu, cpu-staged, cuda or cuda:N" if staged else "auto, cpu, cuda or cuda:N"
    raise UsageError(f"--device must be {choices}, not {device!r}")


def check_not_an_input(
    out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]], *, what: str = "output"
) -> None:
    """Inputs are never written: refuse an output that is an input, contains one (--overwrite would delete it)
    or lies inside an input directory. Resolved paths are compared, so symlinks and ``..`` do not slip by."""
    out_r = Path(out).resolve()
    for given in inputs:
        inp = Path(given).resolve()
        if out_r == inp or inp.is_relative_to(out_r) or (inp.is_dir() and out_r.is_relative_to(inp)):
            raise UsageError(
                f"{what} would overwrite, contain or sit inside the input {given}; inputs are never modified",
                path=out,
            )


def and_more(count: int) -> str:
    """' (and N more)' after the first of ``count`` problems; '' when there is only one."""
    return f" (and {count - 1} more)" if count > 1 else ""


def first_problem(problems: Sequence[tuple[Any, str, str]]) -> str:
    """'WHERE: MESSAGE (and N more)' for a non-empty list of (code, where, message) problems."""
    _, where, message = problems[0]
    return f"{where}: {message}{and_more(len(problems))}"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(value: str | int) -> int:
    """Bytes in a size like ``5GB`` (10**9), ``500MiB`` (2**20), ``1.5GB`` or ``1000000``; ValueError else."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(value)
    if m is None:
        raise ValueError(f"not a size: {value!r}")
    number, unit, binary = m.groups()
    power = " kmgt".index(unit.lower() or " ")
    return int(float(number) * (1024 if binary else 1000) ** power)
