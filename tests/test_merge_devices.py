"""loraformat.merging.devices: telling torch's CPU capability without importing torch, as torch itself tells it."""

from __future__ import annotations

import pytest

from loraformat.merging import devices

torch = pytest.importorskip("torch")


def test_torch_cpu_capability_is_torchs_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU's flags give torch's own answer; ATEN_CPU_CAPABILITY overrides them, and a value torch ignores
    (with a warning) gives None, not a guess."""
    if devices._cpu_flags() is None:
        pytest.skip("no /proc/cpuinfo")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    devices.torch_cpu_capability.cache_clear()
    try:
        assert devices.torch_cpu_capability() == torch.backends.cpu.get_cpu_capability().lower()
        for value, expected in (("default", "default"), ("avx2", "avx2"), ("bogus", None), ("AVX2", None)):
            monkeypatch.setenv("ATEN_CPU_CAPABILITY", value)
            devices.torch_cpu_capability.cache_clear()
            assert devices.torch_cpu_capability() == expected, value
    finally:
        devices.torch_cpu_capability.cache_clear()
