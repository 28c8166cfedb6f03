"""A real two-node Ray cluster on 127.0.0.1 for the tests: a head and a second node, each its own `ray start
--block` process group on free ports, stopped by signalling exactly those groups (never `ray stop`, which would
stop every Ray process on a machine shared with other jobs)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: ports a `ray start` would otherwise take from fixed defaults (8265, 10001, 52365, ...)
_PORT_FLAGS = (
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
)
_HEAD_PORT_FLAGS = ("--dashboard-port",)


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ray_cli() -> list[str]:
    return [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())"]


class RayCluster:
    """Head (``head_cpus``) plus one more node (``node_cpus``); ``address`` is the head's GCS address."""

    def __init__(self, head_cpus: int = 2, node_cpus: int = 1) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="lfray-", dir="/tmp"))  # unix socket paths must stay short
        self.procs: list[subprocess.Popen[bytes]] = []
        # token auth off, explicitly: a ~/.ray/auth_token left by some local ray.init() would otherwise turn it on
        # for some processes of the cluster and not others
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
        self.env.pop("RAY_ADDRESS", None)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        port = free_ports(1)[0]
        self.address = f"127.0.0.1:{port}"
        try:
            head = ["--head", f"--port={port}", f"--temp-dir={self.root}", "--include-dashboard=false"]
            self._start("head", head_cpus, head, head=True)
            self._wait_port(port)
            self._start("node", node_cpus, [f"--address={self.address}"], head=False)
            self._wait_nodes(2)
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, cpus: int, extra: list[str], *, head: bool) -> None:
        flags = _PORT_FLAGS + (_HEAD_PORT_FLAGS if head else ())
        ports = [f"{flag}={p}" for flag, p in zip(flags, free_ports(len(flags)), strict=True)]
        args = [
            *_ray_cli(),
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={cpus}",
            "--num-gpus=0",
            "--object-store-memory=80000000",
            "--disable-usage-stats",
            *ports,
            *extra,
        ]
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self.procs.append(
            subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        )

    def _wait_port(self, port: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return
            self._check_alive()
            time.sleep(0.1)
        raise RuntimeError(f"the Ray head never listened; see {self.root}/head.log")

    def _wait_nodes(self, count: int, timeout: float = 60) -> None:
        probe = (
            f"import ray; ray.init(address={self.address!r}, log_to_driver=False, logging_level='ERROR'); "
        )
        probe += "print(sum(n['Alive'] for n in ray.nodes()))"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            got = subprocess.run(
                [sys.executable, "-c", probe], capture_output=True, text=True, env=self.env, timeout=60
            )
            if got.returncode == 0 and got.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the Ray cluster never had {count} nodes; see {self.root}")

    def _check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"a `ray start` exited with {p.returncode}; see {self.root}")

    def pids(self) -> set[int]:
        """Every live process of this cluster: the `ray start` processes and all their descendants."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    ppid = int(stat.rsplit(")", 1)[1].split()[1])
                    children.setdefault(ppid, []).append(int(entry))
        found, todo = set(), [p.pid for p in self.procs]
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.add(pid)
                todo.extend(children.get(pid, []))
        return found

    def task_processes(self, title: str) -> list[int]:
        """Worker processes of this cluster now running a task whose name starts with ``title`` (Ray renames a
        worker's process to ``ray::<task name>`` while it runs one)."""
        out = []
        for pid in self.pids():
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if cmdline.startswith(f"ray::{title}".encode()):
                    out.append(pid)
        return out

    def stop(self) -> None:
        """SIGTERM to each `ray start --block` group (it stops its own node), then SIGKILL what is left."""
        pids = self.pids()
        for p in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        for pid in pids:  # workers that left their group (checked: still a Ray process, not a reused id)
            with contextlib.suppress(OSError):
                if b"ray" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def ray_cluster() -> Iterator[RayCluster]:
    """The cluster, with this process's environment set to connect to it as a driver."""
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    cluster = RayCluster()
    try:
        yield cluster
    finally:
        cluster.stop()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


def slow_writes() -> None:
    """A Ray worker_process_setup_hook for the tests: every merged block written slowly, in small blocks, so a
    test surely finds a task mid-write (the same wrapper as tests/test_cli_merge.py's SLOW_CLI)."""
    import loraformat.merging.engine as engine
    import loraformat.merging.files as files

    engine.BLOCK_BYTES = 2048
    write = files.pwrite_all

    def slow(fd: int, mem: memoryview, offset: int) -> None:
        time.sleep(0.03)
        write(fd, mem, offset)

    files.pwrite_all = slow
