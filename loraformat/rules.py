"""Rules several commands share, written once: device resolution (and later: output-not-input, problem
summaries).
"""

from __future__ import annotations

import os
import sys

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
