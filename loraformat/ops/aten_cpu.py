"""torch's CPU arithmetic where it is more than one IEEE operation per element, in numpy: the float32 sum behind
``Tensor.mean()`` and ``torch.linspace``. bitsandbytes' double quantization goes through both (its offset is
the mean of the block scales, its 8-bit code is built with linspace), so a torch-free QLoRA round trip
(loraformat/ops/nf4_numpy.py) must reproduce them bit for bit.

Both depend on the kernels torch dispatches to, named by its CPU capability (``default``, ``avx2``, ``avx512``:
``torch.backends.cpu.get_cpu_capability()``): the sum is a cascade over vectors of 8 float lanes (:func:`lanes`),
and the AVX2 kernels (which also serve AVX512: neither has an AVX512 build) contract linspace's
``start + step * i`` into one fused multiply-add where DEFAULT rounds twice. :func:`capability_of` is torch's
choice of capability (loraformat/merging/devices.py reads its inputs on the host). Read from
aten/src/ATen/native/cpu/SumKernel.cpp, RangeFactoriesKernel.cpp and DispatchStub.cpp; checked against torch
2.13 under every capability by tests/test_ops_aten_cpu.py. Pure functions, no I/O.
"""

from __future__ import annotations

import numpy as np

CAPABILITIES = ("default", "avx2", "avx512")
_LEVELS = 4  # multi_row_sum's cascade levels
_ILP = 4  # row_sum's independent accumulators


def capability_of(env: str | None, flags: set[str]) -> str | None:
    """torch's choice from ``ATEN_CPU_CAPABILITY`` and the CPU's flags (x86-64): an unknown variable value (which
    torch warns about and ignores) gives None rather than a guess."""
    if env is not None:
        return env if env in CAPABILITIES else None
    if {"avx512vl", "avx512bw", "avx512dq", "fma"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "default"


def lanes(capability: str) -> int:
    """The float lanes of torch's sum kernel: ``Vectorized<float>::size()`` of the kernel that runs, which is 8
    under every capability. SumKernel.cpp registers with REGISTER_DISPATCH, which leaves the AVX512 slot empty,
    and torch then runs the AVX2 kernel (256-bit vectors); DEFAULT's vectors are 256 bits too."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown torch CPU capability {capability!r}")
    return 8


def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else (x - 1).bit_length()


def _running(acc: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """acc + rows[0] + rows[1] + ... strictly left to right (float32, lane by lane)."""
    if rows.shape[0] == 0:
        return acc
    return np.add.accumulate(np.concatenate([acc[None], rows]), axis=0)[-1]


def _multi_row_sum(rows: np.ndarray) -> np.ndarray:
    """multi_row_sum: ``rows`` (size, 4, lanes) summed over its first axis in a cascade of 4 levels, each level
    taking ``2 ** level_power`` of the one below, so that only sums of similar size meet."""
    size = rows.shape[0]
    power = max(4, _ceil_log2(size) // _LEVELS)
    step, mask = 1 << power, (1 << power) - 1
    zero = np.zeros(rows.shape[1:], np.float32)
    acc = [zero.copy() for _ in range(_LEVELS)]
    groups = size // step
    if groups:
        chunk = rows[: groups * step].reshape(groups, step, *rows.shape[1:])
        starts = np.zeros((groups, 1, *rows.shape[1:]), np.float32)
        sums = np.add.accumulate(np.concatenate([starts, chunk], axis=1), axis=1)[:, -1]
    for g in range(groups):
        acc[0] = sums[g]
        i = (g + 1) * step
        for j in range(1, _LEVELS):
            acc[j] = acc[j] + acc[j - 1]
            acc[j - 1] = zero
            if i & (mask << (j * power)):
                break
    acc[0] = _running(acc[0], rows[groups * step :])
    for j in range(1, _LEVELS):
        acc[0] = acc[0] + acc[j]
    return acc[0]


def _row_sum(vectors: np.ndarray) -> np.ndarray:
    """row_sum: ``vectors`` (n, lanes) as (n // 4, 4) rows of 4 independent accumulators, the leftover vectors
    added to the first, then the other three added to it in order."""
    ilp = vectors.shape[0] // _ILP
    partial = _multi_row_sum(vectors[: ilp * _ILP].reshape(ilp, _ILP, vectors.shape[1]))
    first = _running(partial[0], vectors[ilp * _ILP :])
    for k in range(1, _ILP):
        first = first + partial[k]
    return first


def sum_f32(x: np.ndarray, capability: str) -> np.float32:
    """``x.sum()`` of a contiguous 1-D float32 tensor on one torch thread (cascade_sum -> vectorized_inner_sum):
    whole vectors through :func:`_row_sum`, then the scalar tail and the vector's lanes added in order."""
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    width = lanes(capability)
    if x.size < width:  # no whole vector: the same cascade on scalars
        return np.float32(0) + _row_sum(x.reshape(-1, 1))[0]
    whole = x.size // width
    vec = _row_sum(x[: whole * width].reshape(whole, width))
    total = np.float32(0)
    for value in x[whole * width :]:
        total = total + value
    for value in vec:
        total = total + value
    return np.float32(0) + total  # the output tensor starts at 0 and accumulates the row's sum


def mean_f32(x: np.ndarray, capability: str) -> np.float32:
    """``x.mean()`` of a contiguous 1-D float32 tensor on one torch thread: on CPU, the sum divided by the count
    (both in float32)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.float32(sum_f32(x, capability) / np.float32(np.asarray(x).size))


def linspace_f32(start: float, end: float, steps: int, capability: str) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)``: the first half ``start + step * i``, the
    second ``end - step * (steps - 1 - i)``, each with one rounding (a fused multiply-add) under AVX2/AVX512 and
    two under DEFAULT (the product is float32, then the sum)."""
    lanes(capability)  # validates it
    first, last = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([first], np.float32)
    step = (last - first) / np.float32(steps - 1)
    i = np.arange(steps)
    low = i < steps // 2
    k = np.where(low, i, steps - 1 - i)
    base = np.where(low, first, last)
    sign = np.where(low, np.float32(1), np.float32(-1))
    if capability == "default":
        return (base + sign * (step * k.astype(np.float32))).astype(np.float32)
    # fused: step * k (24 + 29 bits at most) is exact in float64; where the sum is too (checked: Knuth's
    # two-sum error is zero), rounding it once to float32 is the fused result
    a, b = base.astype(np.float64), sign * np.float64(step) * k
    s = a + b
    b_part = s - a
    if np.any((a - (s - b_part)) + (b - b_part)) or steps >= 1 << 29:
        raise ValueError(f"linspace({start}, {end}, {steps}) is outside the range emulated exactly")
    return s.astype(np.float32)
