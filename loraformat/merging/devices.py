"""Where a merge computes, behind one small interface: the host (kernel reads the mapped input directly), a
staged CPU device, and CUDA.

A *staged* device runs the GPU orchestration: a reader thread preads each block into a staging buffer, the
merge copies it in, computes, copies the result out into a host buffer and records an event; the writer waits
for that event before it writes the bytes and releases the buffers. :class:`CudaDevice` does this with pinned
buffers, two streams and CUDA events. :class:`StagedCpuDevice` does the very same steps with torch on CPU, so
CI runs the whole orchestration (threads, staging, ordering, buffer reuse) on every fixture without a GPU: only
the CUDA calls themselves stay untested there. Selecting a device and a kernel for a plan is here too, and
telling torch's CPU capability without importing torch.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator
from functools import cache
from typing import Any, Protocol

from loraformat.errors import UsageError
from loraformat.merging.files import Buffer
from loraformat.merging.plan import Plan
from loraformat.ops.kernel import Kernel

KERNELS = ("auto", "torch", "numpy")


class Event(Protocol):
    def synchronize(self) -> None: ...


class Device(ABC):
    """How blocks reach the kernel and results come back."""

    name: str
    staged: bool = True  # a reader thread stages blocks; False: the kernel reads the mapped input in place
    pinned: bool = False  # host buffers must be page-locked

    def __init__(self, kernel: Kernel[Any]) -> None:
        self.kernel = kernel

    def begin(self) -> None:
        """Per-run setup on the merge thread."""
        return None

    def adopt(self, factors: list[Any]) -> None:
        """Terms about to be used by the blocks' streams (CUDA: tell the allocator, so that their memory is not
        reused while a side stream still reads them)."""
        return None

    def end(self) -> int:
        """Wait for everything queued; returns the peak device memory in bytes (0 on the host)."""
        return 0

    def stream(self) -> contextlib.AbstractContextManager[Any]:
        """The ordering context one block's copies and compute are queued on."""
        return contextlib.nullcontext()

    @abstractmethod
    def copy_in(self, host: Any, nbytes: int) -> Any:
        """The block's stored bytes (a host buffer) as a 1-D uint8 array the kernel can read."""

    @abstractmethod
    def output(self, host: Buffer, nbytes: int) -> Any:
        """Where the kernel writes the block's stored result (1-D uint8)."""

    @abstractmethod
    def copy_out(self, result: Any, host: Buffer, nbytes: int) -> Event | None:
        """Bring the result into ``host`` (queued); the returned event completes when ``host`` holds it."""


class HostDevice(Device):
    """CPU, no staging: the kernel reads rows straight from the read-only mapping and writes the output
    buffer in place."""

    name = "cpu"
    staged = False

    def copy_in(self, host: Any, nbytes: int) -> Any:
        return self.kernel.from_host(host, nbytes)

    def output(self, host: Buffer, nbytes: int) -> Any:
        return self.kernel.from_host(host.mem, nbytes)

    def copy_out(self, result: Any, host: Buffer, nbytes: int) -> Event | None:
        return None  # written in place


class _Done:
    """The event of a synchronous copy: complete once recorded."""

    def synchronize(self) -> None:
        return None


class StagedCpuDevice(Device):
    """The CUDA orchestration on CPU torch: blocks are copied in to (and out of) separate "device" tensors, so
    a buffer released too early, a missed event wait or a block written out of order shows up as wrong bytes."""

    name = "cpu-staged"

    def copy_in(self, host: Any, nbytes: int) -> Any:
        import torch

        src = host.tensor()[:nbytes] if isinstance(host, Buffer) else torch.from_numpy(host)[:nbytes]
        return src.clone()

    def output(self, host: Buffer, nbytes: int) -> Any:
        import torch

        return torch.empty(nbytes, dtype=torch.uint8)

    def copy_out(self, result: Any, host: Buffer, nbytes: int) -> Event | None:
        host.tensor()[:nbytes].copy_(result)
        return _Done()


class CudaDevice(Device):
    """Pinned staging buffers, two streams so that host<->device copies overlap compute, an event per block."""

    pinned = True

    def __init__(self, kernel: Kernel[Any], device: str) -> None:
        super().__init__(kernel)
        self.name = device
        self.streams: list[Any] = []
        self.k = 0

    def begin(self) -> None:
        import torch

        dev = torch.device(self.name)
        torch.cuda.set_device(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        self.streams = [torch.cuda.Stream(dev), torch.cuda.Stream(dev)]

    def end(self) -> int:
        import torch

        for s in self.streams:
            s.synchronize()
        return int(torch.cuda.max_memory_allocated(torch.device(self.name)))

    def adopt(self, factors: list[Any]) -> None:
        import torch

        torch.cuda.current_stream(
            torch.device(self.name)
        ).synchronize()  # uploaded before the side streams read
        for f in factors:
            for x in (f.L, f.R, f.magnitude):
                if x is not None:
                    for s in self.streams:
                        x.record_stream(s)

    @contextlib.contextmanager
    def stream(self) -> Iterator[Any]:
        import torch

        s = self.streams[self.k % 2]
        self.k += 1
        with torch.cuda.stream(s):
            yield s

    def copy_in(self, host: Any, nbytes: int) -> Any:
        import torch

        src = host.tensor()[:nbytes] if isinstance(host, Buffer) else torch.from_numpy(host)[:nbytes]
        raw = torch.empty(nbytes, dtype=torch.uint8, device=self.name)
        raw.copy_(src, non_blocking=True)
        return raw

    def output(self, host: Buffer, nbytes: int) -> Any:
        import torch

        return torch.empty(nbytes, dtype=torch.uint8, device=self.name)

    def copy_out(self, result: Any, host: Buffer, nbytes: int) -> Event | None:
        import torch

        host.tensor()[:nbytes].copy_(result, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return event


def _plan_blocker(kernel: Kernel[Any], plan: Plan) -> str | None:
    """Why ``kernel`` cannot merge ``plan`` (None: it can)."""
    for task in plan.tasks:
        if task.action != "compute":
            continue
        # quantized layouts are decoded by their own codecs (ops/codec_quant.py), on the host, with numpy
        dtypes = [] if task.quant is not None else [task.src_dtype, task.out_dtype]
        for t in task.terms:
            infos = plan.adapters[t.adapter].source.infos
            dtypes += [infos[k].dtype for k in (t.term.A, t.term.B) if k is not None]
        why = kernel.unsupported(dtypes, any(t.term.is_dora for t in task.terms))
        if why is not None:
            return f"{why} ({task.name})"
    return None


def open_device(device: str, kernel: str, plan: Plan) -> Device:
    """The device for a resolved ``device`` name and its kernel. ``kernel`` auto: numpy on the host when it
    can merge the plan (torch is then never imported), else torch; staged and CUDA devices run torch."""
    if kernel not in KERNELS:
        raise UsageError(f"backend must be one of {', '.join(KERNELS)}, not {kernel!r}")
    if device == "cpu" and kernel != "torch":
        from loraformat.ops.kernel_numpy import NumpyKernel

        numpy_kernel = NumpyKernel()
        blocker = _plan_blocker(numpy_kernel, plan)
        if blocker is None:
            return HostDevice(numpy_kernel)
        if kernel == "numpy":
            raise UsageError(f"the numpy backend cannot merge this: {blocker}")
    elif kernel == "numpy":
        raise UsageError(f"the numpy backend runs on the host CPU only, not {device}")
    from loraformat.ops.kernel_torch import TorchKernel

    if device == "cpu":
        return HostDevice(TorchKernel("cpu"))
    if device == "cpu-staged":
        return StagedCpuDevice(TorchKernel("cpu"))
    return CudaDevice(TorchKernel(device), device)


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        return None
    return None


@cache
def torch_cpu_capability() -> str | None:
    """The CPU kernels torch runs on this host ("default", "avx2" or "avx512"), told without importing torch:
    ``ATEN_CPU_CAPABILITY``, else the CPU's flags (loraformat/ops/aten_cpu.py ``capability_of``). None off Linux
    on x86-64 (other architectures have other vector widths), where the flags cannot be read, or for a variable
    value torch ignores: the numpy QLoRA round trip cannot be sure to match torch there, and defers to it."""
    from loraformat.ops.aten_cpu import capability_of

    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    flags = _cpu_flags()
    return None if flags is None else capability_of(os.environ.get("ATEN_CPU_CAPABILITY"), flags)
