"""Helpers for tests that start real node processes.

``NodeProcess`` starts ``python -m zmx.cli node NAME -t FILE``, waits for the node's
``READY`` line (never a sleep), and is always stopped by the ``cluster`` fixture in
``conftest.py``, even when the test fails. ``write_topology`` writes a topology on free
ports under a test's temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import zmq

from zmx.node.runtime import parse_ready

REPO = Path(__file__).resolve().parent.parent


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
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


@contextlib.contextmanager
def dropped(sock: zmq.Socket, what: str, timeout_ms: int = 10_000) -> Iterator[None]:
    """What the block does makes ``sock``'s connection drop: its socket monitor, watching from
    before the block, must say so within ``timeout_ms`` of the block's end."""
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        yield
        assert monitor.poll(timeout_ms), f"not dropped: {what}"
        assert int.from_bytes(monitor.recv_multipart()[0][:2], "little") == zmq.EVENT_DISCONNECTED
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)


def write_topology(directory: Path, *, matchers: dict[str, list[str]] | None = None, routers: int = 1,
                   relay: bool = False, gateways: int = 0, fsync: str = "batch", snapshot_every: int = 100_000,
                   extra_matcher: str = "", extra_router: str = "", extra_gateway: str = "",
                   standby_relay: bool = False) -> Path:
    """A topology on free ports in ``directory/topology.yaml``; data dirs under ``directory/var``.
    ``standby_relay``: a second relay, x2, that each gateway has as the standby of x1."""
    matchers = matchers or {"m1": ["BTC-USDT", "SOL-USDT"], "m2": ["ETH-USDT"]}
    ports = iter(free_ports(2 * routers + 2 * len(matchers) + 2 + gateways))
    lines = ["cluster: test", "symbols:"]
    for m, symbols in matchers.items():
        for symbol in symbols:
            lines.append(f'  {symbol}: {{matcher: {m}, tick_size: "0.01", lot_size: "0.001"}}')
    lines.append("nodes:")
    for i in range(1, routers + 1):
        lines.append(f'  r{i}: {{role: router, front: "tcp://127.0.0.1:{next(ports)}", '
                     f'back: "tcp://127.0.0.1:{next(ports)}"{extra_router}}}')
    for m in matchers:
        lines.append(f'  {m}: {{role: matcher, pub: "tcp://127.0.0.1:{next(ports)}", '
                     f'snapshot: "tcp://127.0.0.1:{next(ports)}", data_dir: "var/{m}", fsync: {fsync}, '
                     f'snapshot_every: {snapshot_every}{extra_matcher}}}')
    relay_ports = next(ports), next(ports)
    if relay or standby_relay:
        lines.append(f'  x1: {{role: relay, pub: "tcp://127.0.0.1:{relay_ports[0]}"}}')
    if standby_relay:
        lines.append(f'  x2: {{role: relay, pub: "tcp://127.0.0.1:{relay_ports[1]}"}}')
        extra_gateway = f", upstream: [x1], standby: [x2]{extra_gateway}"
    for i in range(1, gateways + 1):
        lines.append(f'  g{i}: {{role: gateway, listen: "127.0.0.1:{next(ports)}"{extra_gateway}}}')
    path = directory / "topology.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    """Wait until every one of ``pids`` has exited (a pidfd becomes readable then); the ones
    still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as waiting:
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            waiting.register(fd, selectors.EVENT_READ, pid)
        try:
            while waiting.get_map() and (remaining := deadline - time.monotonic()) > 0:
                for key, _ in waiting.select(remaining):
                    waiting.unregister(key.fd)
                    os.close(key.fd)
        finally:
            left = [key.data for key in waiting.get_map().values()]
            for fd in list(waiting.get_map()):
                waiting.unregister(fd)
                os.close(fd)
    return left


class NodeProcess:
    """One node process; its stderr goes to ``<cwd>/<name>.log``."""

    def __init__(self, topology: Path, name: str, cwd: Path) -> None:
        self.name = name
        self.log_path = cwd / f"{name}.log"
        self.ready: dict[str, Any] | None = None
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "zmx.cli", "node", name, "-t", str(topology)],
                cwd=cwd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env,
            )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        """Block until the node prints its READY line; fail with its log if it does not."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        buffer = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    break
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(f"node {self.name} exited ({self.proc.wait()}) before it was ready:\n"
                                         f"{self.log()}")
                buffer += chunk
                for line in buffer.decode(errors="replace").splitlines():
                    details = parse_ready(line)
                    if details is not None:
                        self.ready = details
                        return details
        raise AssertionError(f"node {self.name} not ready after {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def kill(self) -> None:
        """kill -9: no chance to clean up."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Cluster:
    """Starts nodes of one topology and stops every one of them at the end of the test."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.topology: Path | None = None
        self.procs: list[NodeProcess] = []

    def start(self, name: str, *, wait: bool = True, timeout: float = 20.0) -> NodeProcess:
        assert self.topology is not None, "write a topology first"
        node = NodeProcess(self.topology, name, self.directory)
        self.procs.append(node)
        if wait:
            node.wait_ready(timeout)
        return node

    def stop_all(self) -> None:
        for node in reversed(self.procs):
            try:
                node.stop()
            except Exception:  # noqa: BLE001 - keep stopping the others
                node.kill()
