"""loraformat.ops.aten_cpu against torch itself: the one-thread float32 mean and linspace, bit for bit, under
each CPU capability torch can be told to use (ATEN_CPU_CAPABILITY, in a subprocess), and torch's own choice of
capability."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loraformat.merging.devices import torch_cpu_capability
from loraformat.ops import aten_cpu

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
SIZES = [*range(1, 300), 511, 512, 513, 1023, 1024, 1025, 4095, 4096, 4097, 16383, 16385, 65536, 65537]
SIZES += [100_003, 262_144, 300_001]
#: past 2**24 vector rows of 32 elements: a cascade step of 2**5 instead of 2**4
LONG = (1 << 25) + (1 << 21) + 13
KINDS = ("uniform", "wide", "adversarial")


def vector(n: int, kind: str, seed: int) -> np.ndarray:
    """Values whose float32 sum depends on its order: positive (block scales), spread over 16 decades, or
    mixing huge and tiny values of both signs, cancellations, zeros of both signs and subnormals."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return rng.random(n, dtype=np.float32)
    if kind == "wide":
        return (rng.standard_normal(n) * 10.0 ** rng.integers(-8, 8, n)).astype(np.float32)
    pool = np.array([1e8, -1e8, 1.0, -1.0, 3e-3, 0.0, -0.0, 1e-40, -1e-40, 16777216.0, 0.5], np.float32)
    return (pool[rng.integers(0, pool.size, n)] * (1 + rng.random(n, dtype=np.float32))).astype(np.float32)


def cases() -> list[tuple[int, str, int]]:
    return [(n, kind, i) for i, (n, kind) in enumerate((n, k) for n in SIZES for k in KINDS)]


TORCH_SIDE = """
import json, sys
import numpy as np
import torch
from tests.test_ops_aten_cpu import LONG, cases, vector
torch.set_num_threads(1)
means = [torch.from_numpy(vector(n, kind, seed)).mean().item() for n, kind, seed in cases()]
means.append(torch.from_numpy(vector(LONG, "uniform", 0)).mean().item())
spaces = {n: torch.linspace(0.1, 1.0, n, dtype=torch.float32).tolist() for n in range(1, 130)}
spaces[1000] = torch.linspace(-3.0, 7.5, 1000, dtype=torch.float32).tolist()
json.dump({"capability": torch.backends.cpu.get_cpu_capability(), "means": means, "linspace": spaces},
          open(sys.argv[1], "w"))
"""


def _machine_has(capability: str) -> bool:
    """Whether this CPU runs ``capability``'s kernels (torch would crash on instructions it lacks)."""
    if torch_cpu_capability() is None:
        return False
    order = aten_cpu.CAPABILITIES
    return order.index(capability) <= order.index(torch.backends.cpu.get_cpu_capability().lower())


@pytest.mark.parametrize("capability", aten_cpu.CAPABILITIES)
def test_mean_and_linspace_are_torchs_under_each_capability(capability: str, tmp_path: Path) -> None:
    if not _machine_has(capability):
        pytest.skip(f"this machine cannot run torch's {capability} kernels")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "torch.json"
    subprocess.run([sys.executable, "-c", TORCH_SIDE, str(out)], env=env, cwd=ROOT, check=True)
    theirs = json.loads(out.read_text())
    assert theirs["capability"].lower() == capability
    ours = [float(aten_cpu.mean_f32(vector(n, kind, seed), capability)) for n, kind, seed in cases()]
    ours.append(float(aten_cpu.mean_f32(vector(LONG, "uniform", 0), capability)))
    mismatches = [(c, a, b) for c, a, b in zip(cases(), ours, theirs["means"], strict=False) if a != b]
    assert not mismatches and ours[-1] == theirs["means"][-1], mismatches[:5]
    for n, expected in theirs["linspace"].items():
        start, end = (-3.0, 7.5) if n == "1000" else (0.1, 1.0)
        got = aten_cpu.linspace_f32(start, end, int(n), capability)
        assert np.array_equal(got, np.array(expected, np.float32)), n


def test_the_emulation_is_not_a_plain_sum() -> None:
    """The premise of the tests above: the cascade's order matters (a sequential, pairwise or float64 sum would
    differ), and FMA or not moves linspace's values."""
    x = vector(100_003, "wide", 5)
    ours = aten_cpu.sum_f32(x, "avx2")
    assert ours != np.add.accumulate(x)[-1] and ours != np.float32(x.astype(np.float64).sum())
    assert not np.array_equal(
        aten_cpu.linspace_f32(0.1, 1.0, 65, "default"), aten_cpu.linspace_f32(0.1, 1.0, 65, "avx2")
    )


def test_capability_rules() -> None:
    """DispatchStub.cpp's order: the variable first (an unknown value, which torch ignores with a warning, is a
    case we do not guess), then AVX512 (VL, BW, DQ and FMA), AVX2 (with FMA), else DEFAULT."""
    avx512 = {"avx512vl", "avx512bw", "avx512dq", "avx512f", "avx2", "fma"}
    assert aten_cpu.capability_of(None, avx512) == "avx512"
    assert aten_cpu.capability_of(None, avx512 - {"avx512dq"}) == "avx2"
    assert aten_cpu.capability_of(None, {"avx2"}) == "default"
    assert aten_cpu.capability_of(None, {"sse4_2"}) == "default"
    assert aten_cpu.capability_of("default", avx512) == "default"
    assert aten_cpu.capability_of("avx2", avx512) == "avx2"
    assert aten_cpu.capability_of("AVX2", avx512) is None
    assert aten_cpu.capability_of("", avx512) is None
    with pytest.raises(ValueError, match="capability"):
        aten_cpu.lanes("neon")
    with pytest.raises(ValueError, match="outside"):
        aten_cpu.linspace_f32(1e-30, 1.0, 100, "avx2")
