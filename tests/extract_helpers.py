"""Fine-tuned checkpoints for the extract tests: a real base with known deltas added, saved as a model directory."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def save_model(model_dir: Path, state: dict[str, torch.Tensor], like: Path) -> Path:
    """``state`` as model.safetensors beside a copy of ``like``'s config files: a loadable model directory."""
    from safetensors.torch import save_file

    model_dir.mkdir(parents=True, exist_ok=True)
    for f in like.iterdir():
        if f.suffix == ".json" and f.name != "model.safetensors.index.json" and f.parent != model_dir:
            shutil.copy(f, model_dir / f.name)
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(model_dir / "model.safetensors"), {"format": "pt"}
    )
    return model_dir


def spectrum_delta(shape: tuple[int, ...], *, rate: float, scale: float, seed: int) -> torch.Tensor:
    """A dense delta with singular values scale * rate**i, i < 48: a known, decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    k = min(m, n, 48)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    S = scale * torch.tensor([rate**i for i in range(k)], dtype=torch.float64)
    return (U * S) @ V.T


def make_tuned(
    base: Path,
    out: Path,
    *,
    rate: float = 0.6,
    scale: float = 0.5,
    modules: tuple[str, ...] = LINEAR,
    extra: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> Path:
    """``base`` plus a decaying-spectrum delta on every weight of ``modules``, rounded to the base dtype."""
    state = load_state(base)
    for i, (name, w) in enumerate(sorted(state.items())):
        if name.endswith(".weight") and name.split(".")[-2] in modules:
            d = spectrum_delta(tuple(w.shape), rate=rate, scale=scale, seed=i)
            state[name] = (w.double() + d).to(w.dtype)
    if extra is not None:
        extra(state)
    return save_model(out, state, base)
