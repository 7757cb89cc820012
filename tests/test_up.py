"""``zmx up`` as a user runs it: a real supervisor process and its node processes.

Every test runs ``zmx up`` in its own temporary directory, so the nodes' relative data_dirs
land there and the processes of a test are the ``zmx.cli node`` processes whose working
directory is that directory (``/proc``): that is how a test finds them, checks that none is
left, and kills any that would be, even when it fails.
"""

from __future__ import annotations

import errno
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import IO
from pathlib import Path

import pytest
import zmq
from nodes import wait_gone, write_topology
from websockets.sync.client import connect

from zmx import codec
from zmx.cli import builtin_topology_path
from zmx.commands import CancelOrder
from zmx.events import OrderAccepted
from zmx.node.gateway import _cannot_listen
from zmx.node.client import Client
from zmx.node.journal import Journal
from zmx.node.runtime import IPC_IN_USE, READY_PREFIX, cannot_bind, ipc_problem, load_topology
from zmx.node.runtime import connect as runtime_connect
from zmx.node.supervisor import (
    BACKOFF_FIRST,
    BoundPort,
    bound_ports,
    describe_status,
    port_problem,
    restart_delay,
)
from zmx.topology import parse_topology

UP_TIMEOUT = 30.0  # seconds for a whole cluster to come up, or for `zmx up` to give up
EXIT_TIMEOUT = 20.0


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def node_processes(cwd: Path) -> dict[str, int]:
    """node name -> pid of every living ``zmx.cli node`` process working in ``cwd``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"zmx.cli" not in argv or b"node" not in argv or Path(os.readlink(f"/proc/{pid}/cwd")) != cwd:
                continue
        except OSError:
            continue
        if alive(pid):
            found[argv[argv.index(b"node") + 1].decode()] = pid
    return found


class Up:
    """A ``zmx up`` process with its stdout read line by line and its stderr in a file."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.cwd = cwd
        self.err_path = cwd / "up.stderr"
        self.out = ""
        env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "zmx.cli", "up", *args], cwd=cwd, env=env,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        self.selector = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)
        self.eof = False

    @property
    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def _read(self, timeout: float) -> None:
        assert self.proc.stdout is not None
        if self.eof or not self.selector.select(timeout):
            return
        chunk = os.read(self.proc.stdout.fileno(), 65536)
        if chunk:
            self.out += chunk.decode(errors="replace")
        else:
            self.eof = True

    def wait_for(self, text: str, timeout: float = UP_TIMEOUT, count: int = 1) -> str:
        """Read stdout until ``text`` appears (``count`` times); fail with both outputs if it
        exits or times out first."""
        deadline = time.monotonic() + timeout
        while self.out.count(text) < count:
            remaining = deadline - time.monotonic()
            if self.eof or remaining <= 0:
                raise AssertionError(f"{text!r} not printed by zmx up (exit {self.proc.poll()}):\n"
                                     f"--- stdout\n{self.out}\n--- stderr\n{self.err}")
            self._read(min(remaining, 0.5))
        return self.out

    def finish(self, timeout: float = EXIT_TIMEOUT) -> int:
        """Read to the end and return the exit status."""
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self._read(deadline - time.monotonic())
        return self.proc.wait(max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.selector.close()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Callable[..., Up]]:
    """Start ``zmx up ARGS`` in tmp_path; at the end it and every node it left are killed."""
    started: list[Up] = []

    def start(*args: str) -> Up:
        process = Up(list(args), tmp_path)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.close()
        left = node_processes(tmp_path)
        for pid in left.values():
            os.kill(pid, signal.SIGKILL)
        wait_gone(list(left.values()))
        assert not left, f"node processes left behind: {left}"


def test_up_starts_every_node_and_stops_them_on_sigint(tmp_path: Path, up: Callable[..., Up]) -> None:
    path = write_topology(tmp_path, relay=True)
    sup = up(path.name)
    out = sup.wait_for("is up")
    children = node_processes(tmp_path)
    assert set(children) == {"r1", "m1", "m2", "x1"}
    for name, pid in children.items():
        assert _stat(pid)[1] == sup.proc.pid, name  # its own children
        assert name in out and str(pid) in out  # the table: node, pid
    topology = load_topology(path)
    assert topology.nodes["x1"].pub in out  # type: ignore[union-attr]
    assert f"clients connect to {topology.nodes['r1'].front}" in out  # type: ignore[union-attr]
    assert "cluster 'test' is up: 4 node(s) ready" in out

    sup.proc.send_signal(signal.SIGINT)
    assert sup.finish() == 0, sup.err
    assert "stopped 4 node(s)" in sup.out
    # a cluster stopping as a whole is no problem: no node warns that another went (a matcher
    # used to count its router's exit in about one stop in three)
    assert "WARNING" not in sup.out + sup.err, sup.out + sup.err
    assert not wait_gone(list(children.values()))
    assert not node_processes(tmp_path)


def test_up_without_argument_runs_the_builtin_topology_here(tmp_path: Path, up: Callable[..., Up]) -> None:
    topology = load_topology(builtin_topology_path())
    for address in bound_ports(list(topology.nodes.values())):
        problem = port_problem(address)
        if problem is not None:
            pytest.skip(f"the built-in topology needs its fixed ports: {problem}")
    sup = up()
    out = sup.wait_for("is up")
    assert "cluster 'local' is up" in out
    children = node_processes(tmp_path)
    assert {"r1", "m1", "m2", "g1"} <= set(children)
    assert "clients connect to ws://127.0.0.1:8765 (gateway g1); a browser opens http://127.0.0.1:8765/" in out
    assert (tmp_path / "var" / "m1").is_dir()  # relative data_dirs land where zmx up runs

    sup.proc.send_signal(signal.SIGTERM)
    assert sup.finish() == 0, sup.err
    assert not wait_gone(list(children.values()))


def test_up_refuses_a_port_in_use_and_starts_nothing(tmp_path: Path, up: Callable[..., Up]) -> None:
    path = write_topology(tmp_path)
    pub = load_topology(path).nodes["m2"].pub  # type: ignore[union-attr]
    port = int(pub.rsplit(":", 1)[1])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen(1)
        sup = up(path.name)
        code = sup.finish()
    assert code == 1
    assert f"node 'm2' pub {pub}: port {port} is already in use" in sup.err
    assert "nothing was started" in sup.err
    assert "is up" not in sup.out
    assert not node_processes(tmp_path)
    assert not (tmp_path / "var").exists()  # no matcher ever ran


def test_up_refuses_an_ipc_path_that_another_process_serves(tmp_path: Path, up: Callable[..., Up]) -> None:
    """ZeroMQ removes an ipc path's file before it binds: a second cluster on the same paths
    took them from the first without a word. zmx up refuses to start, zmx node to bind, and
    the path stays its server's; a file that a dead process left behind is taken over."""
    path = write_topology(tmp_path)
    pub = load_topology(path).nodes["m2"].pub  # type: ignore[union-attr]
    path.write_text(path.read_text().replace(f'pub: "{pub}"', 'pub: "ipc://m2.pub"'))  # relative to zmx up's cwd
    with zmq.Context() as ctx, ctx.socket(zmq.PUB) as server:  # the other cluster's m2
        server.bind(f"ipc://{tmp_path}/m2.pub")
        inode = (tmp_path / "m2.pub").stat().st_ino
        sup = up(path.name)
        assert sup.finish() == 1
        assert "Error: node 'm2' pub ipc://m2.pub: another process serves this ipc path" in sup.err, sup.err
        assert "nothing was started" in sup.err
        assert not node_processes(tmp_path) and not (tmp_path / "var").exists()
        done = subprocess.run([sys.executable, "-m", "zmx.cli", "node", "m2", "-t", str(path)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode != 0 and READY_PREFIX not in done.stdout
        assert ("cannot bind the pub socket to ipc://m2.pub: Address already in use (another process serves this "
                "ipc path)") in done.stderr, done.stderr
        assert (tmp_path / "m2.pub").stat().st_ino == inode  # still the server's
    (tmp_path / "m2.pub").unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX) as dead:  # a file left behind: nothing accepts there
        dead.bind(str(tmp_path / "m2.pub"))
    sup = up(path.name)
    sup.wait_for("is up")
    sup.proc.send_signal(signal.SIGINT)
    assert sup.finish() == 0, sup.err


def test_ipc_problem_knows_a_served_path_a_full_backlog_and_an_abstract_name(tmp_path: Path) -> None:
    """What ZeroMQ would take without a word (it removes the file before it binds) is found
    in use: a path a process serves, even one that accepts nothing (its backlog full: the
    check's connect would have blocked), and an abstract name (checked by binding it)."""
    path = tmp_path / "s.sock"
    in_use = (errno.EADDRINUSE, IPC_IN_USE)
    assert ipc_problem(f"ipc://{path}") is None
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen(0)
        assert ipc_problem(f"ipc://{path}") == in_use
        waiting = []
        try:
            while True:  # fill its backlog: it accepts nobody
                client = socket.socket(socket.AF_UNIX)
                client.setblocking(False)
                waiting.append(client)
                client.connect(str(path))
        except BlockingIOError:
            pass
        assert ipc_problem(f"ipc://{path}") == in_use
        for client in waiting:
            client.close()
    assert ipc_problem(f"ipc://{path}") is None  # left behind, served by nobody
    name = f"@zmx-test-{os.getpid()}-{time.monotonic_ns()}"
    assert ipc_problem(f"ipc://{name}") is None
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("\0" + name[1:])
        assert ipc_problem(f"ipc://{name}") == in_use


def test_up_refuses_a_ready_timeout_that_is_not_a_number(tmp_path: Path, up: Callable[..., Up]) -> None:
    """(nan passed the range check, and then no node ever timed out.)"""
    sup = up("--ready-timeout", "nan")
    assert sup.finish() == 2
    assert "nan is not a number of seconds" in sup.err


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_the_ipv6_option_follows_each_endpoint_a_socket_connects() -> None:
    """ZeroMQ reads the option at each connect: left on after an IPv6 endpoint, a relay's or a
    gateway's next connect to a host name went to its IPv6 address (localhost as ::1 first,
    Debian's /etc/hosts), where a peer bound to 127.0.0.1 never answered."""
    with zmq.Context() as ctx, ctx.socket(zmq.SUB) as sub:
        sub.linger = 0
        runtime_connect(sub, "tcp://[::1]:19001")
        assert sub.getsockopt(zmq.IPV6) == 1
        runtime_connect(sub, "tcp://localhost:19002")
        assert sub.getsockopt(zmq.IPV6) == 0


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_up_runs_a_cluster_on_ipv6_addresses(tmp_path: Path, up: Callable[..., Up]) -> None:
    """The topology takes IPv6 endpoints (tcp://[::1]:PORT), but ZeroMQ uses IPv6 only with its
    option on, which no socket had: every node failed to bind ("No such device"). Orders, the
    feed through a relay, a gateway's snapshot and the probe, all over IPv6."""
    path = write_topology(tmp_path, relay=True, gateways=1)
    path.write_text(path.read_text().replace("127.0.0.1", "[::1]"))
    topology = load_topology(path)
    sup = up(path.name)
    sup.wait_for("is up")
    with Client([topology.nodes["r1"].front], symbols=topology.symbols) as client:  # type: ignore[union-attr]
        reply = client.submit("o1", "alice", "BTC-USDT", "buy", "100", "1")
    assert reply.status == "ok" and type(reply.events[0]) is OrderAccepted, reply
    port = topology.nodes["g1"].port  # type: ignore[union-attr]
    with connect(f"ws://[::1]:{port}", open_timeout=UP_TIMEOUT) as ws:
        ws.send(json.dumps({"action": "subscribe", "channel": "BTC-USDT"}))
        assert json.loads(ws.recv(UP_TIMEOUT))["type"] == "subscription_ack"
        snapshot = json.loads(ws.recv(UP_TIMEOUT))
    assert snapshot["type"] == "depth_snapshot" and snapshot["data"]["bids"] == [["100", "1"]], snapshot
    done = subprocess.run([sys.executable, "-m", "zmx.cli", "probe", "x1", "-t", str(path), "-d", "1.5", "--json"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["symbols"]["BTC-USDT"]["last_seq"] == 1  # the relay's feed: heartbeats at seq 1
    sup.proc.send_signal(signal.SIGINT)
    assert sup.finish() == 0, sup.err


LONG_JOURNAL = 1_000_000  # commands: about 5 s to read and replay here


def long_journal(tmp_path: Path) -> Path:
    """A topology of one matcher whose journal holds ``LONG_JOURNAL`` commands (cancels of an
    order that is not there: refused again on replay), and no snapshot."""
    path = write_topology(tmp_path, matchers={"m1": ["BTC-USDT"]})
    data = tmp_path / "var" / "m1"
    data.mkdir(parents=True)
    record = codec.encode(CancelOrder("none", "a1", "BTC-USDT"))
    with Journal(data) as journal:
        assert journal.recover() == (None, [])
        for start in range(0, LONG_JOURNAL, 100_000):
            journal.append_batch([(1_000_000 + i, record) for i in range(start, start + 100_000)])
    return path


def test_up_waits_for_a_matcher_replaying_a_long_journal_as_long_as_it_says_so(
        tmp_path: Path, up: Callable[..., Up]) -> None:
    """A matcher's start reads and replays its journal, 100,000 to 200,000 commands a second
    here: one of a few million took longer than zmx up waited for READY, so the start failed,
    and under --restart the node was killed at every try. It now says every second that it
    goes on, and zmx up waits as long as it does: here 5 s under a --ready-timeout of 2 s."""
    path = long_journal(tmp_path)
    sup = up(path.name, "--ready-timeout", "2")
    sup.wait_for("is up")
    took = re.search(rf"m1 +\| .* recovered from no snapshot \+ {LONG_JOURNAL} journaled command\(s\) in (\d+) ms",
                     sup.err)
    assert took is not None, sup.err
    assert int(took[1]) > 2000, "the replay took less than --ready-timeout: nothing shown"
    assert "STARTING" not in sup.out + sup.err  # zmx up takes those lines, they are not shown
    sup.proc.send_signal(signal.SIGINT)
    assert sup.finish() == 0, sup.err


def test_a_matcher_stopped_while_it_replays_stops_at_once_and_starts_again_whole(tmp_path: Path) -> None:
    """SIGTERM in the middle of a long replay: it read and replayed to the end, wrote its
    snapshot, and only then stopped (zmx up had killed it by then, 5 s after its SIGTERM). It
    stops at once, exit 0, and its next start recovers everything. Its first line on stdout is
    READY unless its parent asks for STARTING lines: ``zmx node ... | head -1`` read a STARTING
    line, and the READY after it killed the matcher (a closed pipe)."""
    path = long_journal(tmp_path)
    command = [sys.executable, "-m", "zmx.cli", "node", "m1", "-t", str(path)]
    node = subprocess.Popen(command, cwd=tmp_path, env=dict(os.environ, ZMX_STARTING_LINES="1"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert node.stdout is not None
        first = node.stdout.readline()
        assert first.startswith("STARTING {"), first  # in the middle of its start
        node.send_signal(signal.SIGTERM)
        started = time.monotonic()
        _, err = node.communicate(timeout=EXIT_TIMEOUT)
        assert node.returncode == 0, err
        assert time.monotonic() - started < 2.0, err  # not at the end of the replay
        assert "stopped while starting" in err and "Traceback" not in err, err
    finally:
        if node.poll() is None:
            node.kill()
            node.communicate()
    again = subprocess.Popen(command, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert again.stdout is not None
        first = again.stdout.readline()  # without ZMX_STARTING_LINES: READY is the first line
        assert first.startswith(READY_PREFIX), first
        again.send_signal(signal.SIGTERM)
        _, err = again.communicate(timeout=EXIT_TIMEOUT)
        assert again.returncode == 0, err
        assert f"recovered from no snapshot + {LONG_JOURNAL} journaled command(s)" in err, err
    finally:
        if again.poll() is None:
            again.kill()
            again.communicate()


def test_up_gives_up_on_a_node_that_is_neither_ready_nor_says_it_is_starting(
        tmp_path: Path, up: Callable[..., Up]) -> None:
    """A matcher that hangs in its start, silently (its epoch file is a FIFO that nothing
    writes: opening it blocks), is reported after --ready-timeout, and nothing is left."""
    path = write_topology(tmp_path)
    data = tmp_path / "var" / "m1"
    data.mkdir(parents=True)
    os.mkfifo(data / "epoch")
    sup = up(path.name, "--ready-timeout", "2")
    assert sup.finish() == 1
    assert re.search(r"Error: node m1 \(matcher, pid \d+\) was not ready, and did not say it was still starting, "
                     r"for 2 s \(zmx up --ready-timeout gives nodes longer\)", sup.err), sup.err
    assert "is up" not in sup.out
    assert not node_processes(tmp_path)


def test_zmx_node_on_a_gateway_port_in_use_fails_and_never_says_it_serves(tmp_path: Path) -> None:
    """``zmx node g1`` alone (no supervisor checking ports first): the bind fails, and the log
    never claimed the gateway was serving."""
    path = write_topology(tmp_path, gateways=1)
    gateway = load_topology(path).nodes["g1"]
    with socket.socket() as squatter:
        squatter.bind((gateway.host, gateway.port))  # type: ignore[union-attr]
        squatter.listen(1)
        done = subprocess.run([sys.executable, "-m", "zmx.cli", "node", "g1", "-t", str(path)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0, done.stderr
    assert "address already in use" in done.stderr.lower(), done.stderr
    assert "serving" not in done.stderr and READY_PREFIX not in done.stdout, done.stderr


@pytest.mark.parametrize("name", ["m1", "r1", "x1", "g1"])
def test_zmx_node_on_an_address_of_another_host_says_so_in_one_line(tmp_path: Path, name: str) -> None:
    """An operator starts a node on the wrong machine: its address is no interface of this host.
    Every role says which address it could not bind and why, in one line (no traceback), and
    exits non-zero without claiming to serve. (Binding sends nothing: 10.255.255.1 is only
    asked of this host's own interfaces.)"""
    path = write_topology(tmp_path, relay=True, gateways=1)
    text = path.read_text()
    line = next(line for line in text.splitlines() if line.startswith(f"  {name}:"))
    path.write_text(text.replace(line, line.replace("127.0.0.1", "10.255.255.1")))
    done = subprocess.run([sys.executable, "-m", "zmx.cli", "node", name, "-t", str(path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0, done.stderr
    assert "10.255.255.1" in done.stderr and "no interface of this host has that address" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and READY_PREFIX not in done.stdout, done.stderr
    said = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(said) == 1 and said[0].count("10.255.255.1") == 1, done.stderr  # said once, and nothing else


def test_a_bind_host_that_does_not_resolve_is_said_in_words() -> None:
    """(Without a lookup, which would leave this machine.) A review's gateway on an unknown host
    said "Unknown error -2"; a matcher, "No such device"."""
    gateway = parse_topology('cluster: c\nsymbols: {BTC-USDT: {matcher: m1, tick_size: "1", lot_size: "1"}}\n'
                             'nodes:\n  r1: {role: router, front: "tcp://127.0.0.1:3", back: "tcp://127.0.0.1:4"}\n'
                             '  m1: {role: matcher, pub: "tcp://127.0.0.1:1", snapshot: "tcp://127.0.0.1:2", '
                             'data_dir: d}\n  g1: {role: gateway, listen: "nosuch.invalid:8765"}\n').node("g1")
    said = _cannot_listen(gateway, socket.gaierror(-2, "Name or service not known"))  # type: ignore[arg-type]
    assert said == "cannot bind the listening socket to nosuch.invalid:8765: Name or service not known"
    said = cannot_bind("the pub socket", "tcp://nosuch.invalid:5560", errno.ENODEV,
                       "No such device (addr='tcp://nosuch.invalid:5560')")
    assert said.startswith("cannot bind the pub socket to tcp://nosuch.invalid:5560: No such device (the host is "
                           "neither a name that resolves here nor an interface"), said


def test_a_kill_9_of_a_gateway_with_workers_leaves_no_worker_serving(tmp_path: Path) -> None:
    """The workers a gateway forks die with it, even by ``kill -9``: orphans would keep its
    port, unseen by ``zmx up``, which would then fail to start it again."""
    path = write_topology(tmp_path, gateways=1, extra_gateway=", workers: 2")
    gateway = load_topology(path).nodes["g1"]
    proc = subprocess.Popen([sys.executable, "-m", "zmx.cli", "node", "g1", "-t", str(path)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    workers: list[int] = []
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as ready:
            ready.register(proc.stdout, selectors.EVENT_READ)
            assert ready.select(timeout=30), "no READY from the gateway in 30 s"
        assert proc.stdout.readline().startswith(READY_PREFIX)
        workers = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                   if (_stat(pid) or ("", 0))[1] == proc.pid]
        assert len(workers) == 2, workers
        proc.kill()
        proc.wait(timeout=10)
        assert wait_gone(workers) == [], "a worker outlived its killed gateway"
        with socket.socket() as probe:
            port = (gateway.host, gateway.port)  # type: ignore[union-attr]
            assert probe.connect_ex(port) != 0, "the port is still served"
    finally:
        proc.kill()
        proc.wait(timeout=10)
        for pid in workers:  # orphans, if the test failed
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_node_that_fails_to_start_is_reported_and_nothing_is_left(tmp_path: Path, up: Callable[..., Up]) -> None:
    path = write_topology(tmp_path)
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "m1").write_text("a file where m1's data_dir should be\n")
    sup = up(path.name)
    code = sup.finish()
    assert code == 1
    assert "Error: node m1 (matcher, pid" in sup.err
    assert "failed before it was ready: exit status" in sup.err
    assert "last lines of its stderr" in sup.err
    assert "is up" not in sup.out
    assert not node_processes(tmp_path)


def test_a_node_that_dies_stops_the_cluster(tmp_path: Path, up: Callable[..., Up]) -> None:
    path = write_topology(tmp_path)
    sup = up(path.name)
    sup.wait_for("is up")
    children = node_processes(tmp_path)
    os.kill(children["m1"], signal.SIGKILL)
    assert sup.finish() == 1
    assert f"node m1 (matcher, pid {children['m1']}) died: killed by signal SIGKILL (9)" in sup.err
    assert not wait_gone(list(children.values()))


def test_restart_brings_a_dead_node_back(tmp_path: Path, up: Callable[..., Up]) -> None:
    path = write_topology(tmp_path)
    sup = up(path.name, "--restart")
    sup.wait_for("is up")
    before = node_processes(tmp_path)
    os.kill(before["r1"], signal.SIGKILL)
    sup.wait_for("node r1 restarted (pid")
    after = node_processes(tmp_path)
    assert after["r1"] != before["r1"]
    assert after["m1"] == before["m1"] and after["m2"] == before["m2"]
    assert f"node r1 (router, pid {before['r1']}) died: killed by signal SIGKILL (9)" in sup.err
    assert "restarting node r1 in 0.5 s (restart 1)" in sup.err

    sup.proc.send_signal(signal.SIGINT)
    assert sup.finish() == 0, sup.err
    assert not wait_gone(list(after.values()))


def test_a_restarted_node_runs_the_topology_zmx_up_started_with(tmp_path: Path, up: Callable[..., Up]) -> None:
    """The file is broken, then removed, after the start: r1 restarts all the same, with the
    text zmx up checked (on its stdin). (A review saw a restart read the edited file: a matcher
    on another port than its gateway knew, and a broken file retried forever.)"""
    path = write_topology(tmp_path)
    sup = up(path.name, "--restart")
    sup.wait_for("is up")
    before = node_processes(tmp_path)
    path.write_text(path.read_text() + "nodes: {\n")
    os.kill(before["r1"], signal.SIGKILL)
    sup.wait_for("node r1 restarted (pid")
    path.unlink()
    os.kill(node_processes(tmp_path)["r1"], signal.SIGKILL)
    sup.wait_for("node r1 restarted (pid", count=2)
    after = node_processes(tmp_path)
    assert after["r1"] != before["r1"] and (after["m1"], after["m2"]) == (before["m1"], before["m2"])
    assert "failed to start" not in sup.err, sup.err
    sup.proc.send_signal(signal.SIGINT)
    assert sup.finish() == 0, sup.err


def test_zmx_up_goes_on_when_its_standard_output_is_closed(tmp_path: Path) -> None:
    """zmx up --restart | head: once head has gone, the next line to stdout (here: that r1 was
    restarted) used to stop the whole cluster without a word. It goes on, says so once on
    stderr, and stops as usual on SIGINT."""
    path = write_topology(tmp_path)
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    proc = subprocess.Popen([sys.executable, "-m", "zmx.cli", "up", path.name, "--restart"], cwd=tmp_path, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = b"", b""

    def read_until(stream: IO[bytes], text: bytes | None, seen: bytes) -> bytes:
        """Read until ``text`` is in what was read (None: to the end of the stream)."""
        deadline = time.monotonic() + UP_TIMEOUT
        with selectors.DefaultSelector() as waiting:
            waiting.register(stream, selectors.EVENT_READ)
            while text is None or text not in seen:
                remaining = deadline - time.monotonic()
                assert remaining > 0 and (text is None or proc.poll() is None), (text, seen, proc.poll())
                if waiting.select(remaining):
                    chunk = os.read(stream.fileno(), 65536)
                    if not chunk and text is None:
                        break
                    assert chunk, (text, seen)
                    seen += chunk
        return seen

    try:
        out = read_until(proc.stdout, b"is up", out)
        proc.stdout.close()  # the reader of stdout is gone
        r1 = node_processes(tmp_path)["r1"]
        os.kill(r1, signal.SIGKILL)
        err = read_until(proc.stderr, b"zmx up: standard output is closed; the cluster goes on", err)
        assert proc.poll() is None
        nodes = node_processes(tmp_path)
        assert set(nodes) == {"r1", "m1", "m2"} and nodes["r1"] != r1
        proc.send_signal(signal.SIGINT)
        err = read_until(proc.stderr, None, err)
        assert proc.wait(EXIT_TIMEOUT) == 0, err
        assert err.count(b"standard output is closed") == 1 and b"Traceback" not in err, err
        assert not wait_gone(list(nodes.values()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        left = node_processes(tmp_path)
        for pid in left.values():
            os.kill(pid, signal.SIGKILL)
        wait_gone(list(left.values()))


def test_nodes_die_with_a_killed_supervisor(tmp_path: Path, up: Callable[..., Up]) -> None:
    """kill -9 of zmx up: the kernel sends each node SIGTERM (PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    path = write_topology(tmp_path)
    sup = up(path.name)
    sup.wait_for("is up")
    children = node_processes(tmp_path)
    sup.proc.kill()
    sup.proc.wait()
    assert not wait_gone(list(children.values()))


# -- the supervisor's rules, without processes -------------------------------------------------


def test_restart_backoff_doubles_to_ten_seconds_and_resets_after_30_s_of_running() -> None:
    backoff, delays = BACKOFF_FIRST, []
    for _ in range(7):
        delay, backoff = restart_delay(backoff, ran_for=2.0)  # dies 2 s after each start
        delays.append(delay)
    assert delays == [0.5, 1, 2, 4, 8, 10, 10]
    assert restart_delay(backoff, ran_for=None) == (10, 10)  # never got ready: no reset
    assert restart_delay(backoff, ran_for=30.0) == (0.5, 1)  # ran 30 s: back to the start


def test_port_check_names_a_port_in_use_and_skips_other_hosts() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        problem = port_problem(BoundPort("m1", "pub", f"tcp://127.0.0.1:{port}", "127.0.0.1", port))
        assert problem == f"node 'm1' pub tcp://127.0.0.1:{port}: port {port} is already in use"
        # 192.0.2.1 (TEST-NET-1) is no address of this machine: another host's port, not checked
        assert port_problem(BoundPort("m1", "pub", f"tcp://192.0.2.1:{port}", "192.0.2.1", port)) is None
    assert port_problem(BoundPort("m1", "pub", f"tcp://127.0.0.1:{port}", "127.0.0.1", port)) is None


def test_port_check_tries_the_addresses_a_node_binds_of_a_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where localhost is ::1 first (Debian's /etc/hosts), the check tried ::1 alone, while
    ZeroMQ binds localhost's IPv4 address: a port taken there was not found. A gateway binds
    every address of its host (asyncio), so any of them taken is found."""
    real = socket.getaddrinfo

    def ipv6_first(host: str, *args: object, **kwargs: object) -> list:
        if host == "localhost":
            return real("::1", *args, **kwargs) + real("127.0.0.1", *args, **kwargs)  # type: ignore[arg-type]
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", ipv6_first)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert port_problem(BoundPort("m1", "pub", f"tcp://localhost:{port}", "localhost", port)) == \
            f"node 'm1' pub tcp://localhost:{port}: port {port} is already in use"
        assert port_problem(BoundPort("g1", "listen", f"localhost:{port}", "localhost", port)) == \
            f"node 'g1' listen localhost:{port}: port {port} is already in use"


def test_exit_statuses_read_as_a_user_expects() -> None:
    assert describe_status(0) == "exit status 0"
    assert describe_status(3) == "exit status 3"
    assert describe_status(-9) == "killed by signal SIGKILL (9)"
    assert describe_status(-15) == "killed by signal SIGTERM (15)"
