"""``zmx up``: run every node of a topology on this machine as child processes, and supervise them.

Lifetimes, in order:

1. **Check** -- every TCP port the topology binds on this machine is tried (bound and
   listened on with ``SO_REUSEADDR``, as ZeroMQ and asyncio do), and every ipc path or
   abstract name is checked (``runtime.ipc_problem``). A port in use, or a path that a
   process serves, refuses the start before any process exists. Addresses of other hosts
   (``EADDRNOTAVAIL``) are skipped.
2. **Start** -- one child per node, ``python -m zmx.cli node NAME -t FILE`` with this
   interpreter and the current directory (so relative ``data_dir``s land where the user runs
   ``zmx up``): matchers first, then routers, relays and gateways; the nodes of one role start
   together. A node is up when it prints its ``READY`` line (``zmx.node.runtime``), which it
   does after its sockets are bound. A node whose start is long (a matcher reading and
   replaying a long journal, restoring a big book) says it is still going with a ``STARTING``
   line every second (asked for with ``ZMX_STARTING_LINES=1``), and each one gives it
   ``ready_timeout`` more (``--ready-timeout``). A child that exits first, or is neither
   ready nor heard from within ``ready_timeout``, fails the start: it is reported with its exit
   status and the tail of its stderr, every other child is stopped, and ``zmx up`` exits 1 with
   nothing left running.
3. **Supervise** -- a child that dies is reported with its name and exit status. Without
   ``--restart`` the cluster is stopped and ``zmx up`` exits 1; with it the node is started
   again after a backoff (0.5 s, doubled at each death up to 10 s, back to 0.5 s once the node
   had run for 30 s). Each node gets the topology's text as ``zmx up`` read and checked it,
   on its standard input (``--topology-on-stdin``; ``FILE`` names it in messages), so a
   restarted node runs the cluster's topology whatever became of the file meanwhile (a
   review's edited file gave a restarted matcher another port than its gateway knew, and a
   broken one was retried forever). Edits take effect at the next ``zmx up``.
4. **Stop** -- SIGINT or SIGTERM stops every child (SIGTERM, then SIGKILL for those still
   running after ``stop_timeout``), prints a summary and exits 0.

Each child's stderr is passed through line by line, prefixed with its node name, and the
last lines are kept for the failure reports. Each child runs in its own process group, so a
Ctrl-C in the terminal reaches only the supervisor, which stops the nodes itself (gateways
first, matchers last). On Linux each child also asks the kernel for SIGTERM when the
supervisor dies (``prctl(PR_SET_PDEATHSIG)``), so even a ``kill -9`` of ``zmx up`` leaves no
node behind. The signal is tied to the thread that forked the child, which is why every child
is started from the main thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.table import Table

import zmx
from zmx.node.runtime import (
    READY_TIMEOUT,
    STARTING_ENV,
    STARTING_PREFIX,
    Stopper,
    die_with_parent,
    ipc_problem,
    parse_ready,
)
from zmx.topology import GatewayNode, MatcherNode, Node, RelayNode, RouterNode, Topology

START_ORDER = ("matcher", "router", "relay", "gateway")
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
BACKOFF_RESET_AFTER = 30.0  # a node that ran this long starts again from BACKOFF_FIRST
STDERR_TAIL = 20  # lines of a child's stderr kept for a failure report

EXIT_OK = 0
EXIT_FAILED = 1


# -- ports -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BoundPort:
    """A TCP address a node binds: ``node 'm1' pub tcp://127.0.0.1:5560``."""

    node: str
    key: str
    endpoint: str
    host: str
    port: int

    def describe(self) -> str:
        return f"node {self.node!r} {self.key} {self.endpoint}"


def bound_ports(nodes: list[Node]) -> list[BoundPort]:
    """The TCP addresses ``nodes`` bind (ipc and inproc endpoints have no port)."""
    found = []
    for node in nodes:
        for key, endpoint in node.endpoints:
            if isinstance(node, GatewayNode) and key == "listen":
                host, _, port = endpoint.rpartition(":")
                found.append(BoundPort(node.name, key, endpoint, host, int(port)))
                continue
            if endpoint.startswith("tcp://"):  # the topology checked its form: tcp://host:port
                host, _, port = endpoint[len("tcp://"):].rpartition(":")
                found.append(BoundPort(node.name, key, endpoint, host, int(port)))
    return found


def port_problem(address: BoundPort) -> str | None:
    """Why ``address`` cannot be bound on this machine, or None (free, or another host's).

    Tried as its node binds it: ZeroMQ one address, an IPv6 one only in brackets (a name, such
    as localhost, its IPv4 address: ``runtime.connect``); a gateway every address of its host,
    as asyncio does."""
    host = address.host.strip("[]")
    if host in ("*", ""):
        host = "0.0.0.0"
    try:
        infos = socket.getaddrinfo(host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return None  # a name this machine cannot resolve: not one of its addresses
    if address.endpoint.startswith("tcp://"):
        family = socket.AF_INET6 if address.host.startswith("[") else socket.AF_INET
        infos = [info for info in infos if info[0] == family][:1]
    for family, kind, proto, _, sockaddr in infos:
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:
            continue  # a family this machine has not (no IPv6): the node itself says it cannot bind
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
                probe.listen(1)
            except OSError as e:
                if e.errno == errno.EADDRNOTAVAIL:
                    continue  # another host's address
                if e.errno == errno.EADDRINUSE:
                    return f"{address.describe()}: port {address.port} is already in use"
                return f"{address.describe()}: cannot bind port {address.port}: {e.strerror or e}"
    return None


# -- children ----------------------------------------------------------------------------------


def restart_delay(backoff: float, ran_for: float | None) -> tuple[float, float]:
    """(seconds to wait before restarting a node that died, the backoff after that restart).

    ``backoff`` is the node's current backoff; ``ran_for`` how long the process that died had
    run, None if it never was ready. After ``BACKOFF_RESET_AFTER`` seconds of good running the
    backoff starts again from ``BACKOFF_FIRST``.
    """
    if ran_for is not None and ran_for >= BACKOFF_RESET_AFTER:
        backoff = BACKOFF_FIRST
    return backoff, min(backoff * 2, BACKOFF_MAX)


def describe_status(returncode: int) -> str:
    """``exit status 1`` or ``killed by signal SIGKILL (9)``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "signal"
        return f"killed by signal {name} ({-returncode})"
    return f"exit status {returncode}"


class _Console(Console):
    """rich's console, but a closed stream does not end the program: rich's own answer to a
    broken pipe is ``SystemExit(1)``, which would stop every node. The error goes to ``_Output``."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "the reader of this stream is gone")


class _Output:
    """Serialises the lines that reader threads and the main thread write. Output that cannot be
    written (a pager quit, ``| head`` done) is dropped: the cluster goes on. (Before, the first
    line after ``| head`` had closed the pipe stopped every node, with no word why.)"""

    def __init__(self, out: Console, err: Console) -> None:
        self.out = out
        self.err = err
        self.lock = threading.Lock()
        self.gone: set[bool] = set()  # err (True) and/or out (False), once a write to it failed

    def print(self, *items: Any, err: bool = False) -> None:
        with self.lock:
            if err in self.gone:
                return
            try:
                (self.err if err else self.out).print(*items, soft_wrap=True)
            except (OSError, ValueError):
                self._lost(err)

    def raw(self, text: str, err: bool = True) -> None:
        stream = sys.stderr if err else sys.stdout
        with self.lock:
            if err in self.gone:
                return
            try:
                stream.write(text)
                stream.flush()
            except (OSError, ValueError):
                self._lost(err)

    def _lost(self, err: bool) -> None:
        """Its stream is gone: nothing more is written to it, and its file descriptor now leads
        to /dev/null (the interpreter flushes it at exit, and would complain there). The other
        stream is told once, if it is still there."""
        self.gone.add(err)
        stream = sys.stderr if err else sys.stdout
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
        if not err and True not in self.gone:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write("zmx up: standard output is closed; the cluster goes on, its lines are dropped\n")
                sys.stderr.flush()


@dataclass(eq=False)
class Run:
    """One incarnation of a node's process."""

    node: Node
    popen: subprocess.Popen[str]
    started: float  # time.monotonic()
    heard: float = 0.0  # time.monotonic() of its start or its last STARTING line, while it is not ready
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_TAIL))
    ready: dict[str, Any] | None = None
    ready_at: float | None = None
    stopping: bool = False
    timed_out: bool = False
    returncode: int | None = None
    readers: list[threading.Thread] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass(eq=False)
class Child:
    """A node under supervision, across its restarts."""

    node: Node
    run: Run | None = None
    restarts: int = 0
    backoff: float = BACKOFF_FIRST
    restart_at: float | None = None


def where_to_connect(gateway: GatewayNode) -> str:
    """The line that tells a user where the clients of ``gateway``, and a browser, connect."""
    return f"clients connect to {gateway.url} (gateway {gateway.name}); a browser opens {gateway.page_url}"


class Supervisor:
    """Starts, watches and stops the nodes of one topology; ``run()`` is ``zmx up``."""

    def __init__(self, topology: Topology, topology_path: Path, *, topology_text: str | None = None,
                 restart: bool = False,
                 console: Console | None = None, err_console: Console | None = None,
                 ready_timeout: float = READY_TIMEOUT, stop_timeout: float = STOP_TIMEOUT) -> None:
        self.topology = topology
        self.topology_path = topology_path
        # The text the nodes run (see "Supervise"), given on their stdin; None: they read the file.
        self.topology_text = topology_text
        self.restart = restart
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.output = _Output(console or _Console(highlight=False, markup=False),
                              err_console or _Console(stderr=True, highlight=False, markup=False))
        self.events: queue.Queue[tuple[str, Run, Any]] = queue.Queue()
        self.children: dict[str, Child] = {}
        self.stopper = Stopper()
        self.width = max(len(name) for name in topology.nodes)
        self._preexec = die_with_parent()

    # -- the plan ------------------------------------------------------------------------

    def plan(self) -> list[Node]:
        """The nodes to start, in start order."""
        return [node for role in START_ORDER for node in self.topology.nodes_by_role(role)]

    def port_problems(self, nodes: list[Node]) -> list[str]:
        """Why the addresses ``nodes`` bind are not free: TCP ports in use, and ipc paths that a
        living process serves (which ZeroMQ would take from it without a word)."""
        problems = [p for p in map(port_problem, bound_ports(nodes)) if p is not None]
        for node in nodes:
            for key, endpoint in node.endpoints:
                problem = ipc_problem(endpoint)
                if problem is not None:
                    problems.append(f"node {node.name!r} {key} {endpoint}: {problem[1]}")
        return problems

    # -- zmx up --------------------------------------------------------------------------

    def run(self) -> int:
        """Check, start, supervise until SIGINT/SIGTERM or a death, stop. The exit status."""
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        self.stopper.install()
        try:
            return self._run()
        finally:
            self.stop_all()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _run(self) -> int:
        nodes = self.plan()
        problems = self.port_problems(nodes)
        if problems:
            for problem in problems:
                self.output.print(f"Error: {problem}", err=True)
            self.output.print(f"Error: cluster {self.topology.cluster!r} not started: nothing was started "
                              f"(free {'them' if len(problems) > 1 else 'it'} or change {self.topology_path})",
                              err=True)
            return EXIT_FAILED
        if not nodes:
            self.output.print("Error: nothing to start in this topology", err=True)
            return EXIT_FAILED
        started = time.monotonic()
        for role in START_ORDER:
            group = [n for n in nodes if n.role == role]
            if not group:
                continue
            for node in group:
                self.children[node.name] = child = Child(node)
                child.run = self._spawn(node)
            if not self._await_ready(group):
                return EXIT_FAILED if not self.stopper.stopped else EXIT_OK
        self.output.print(self.status_table())
        self._print_where_to_connect()
        self.output.print(f"cluster {self.topology.cluster!r} is up: {len(nodes)} node(s) ready in "
                          f"{time.monotonic() - started:.1f} s"
                          f"{' (restarting nodes that die)' if self.restart else ''}; Ctrl-C stops it")
        return self._supervise()

    # -- starting ------------------------------------------------------------------------

    def _command(self, node: Node) -> list[str]:
        command = [sys.executable, "-m", "zmx.cli", "node", node.name, "-t", str(self.topology_path)]
        return command if self.topology_text is None else [*command, "--topology-on-stdin"]

    def _spawn(self, node: Node) -> Run:
        """Start ``node``'s process (from the main thread: see PR_SET_PDEATHSIG above)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{STARTING_ENV: "1"})  # its STARTING lines, please
        # The children run the zmx this supervisor runs, wherever the user starts it from.
        source_root = str(Path(zmx.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [source_root, env.get("PYTHONPATH")]))
        popen = subprocess.Popen(
            self._command(node), stdin=subprocess.DEVNULL if self.topology_text is None else subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, errors="replace", bufsize=1, env=env, process_group=0,
            preexec_fn=self._preexec,  # noqa: PLW1509 - only prctl and getppid run between fork and exec
        )
        if popen.stdin is not None:
            # A node reads it all first thing; one that died before is reported by its exit.
            with contextlib.suppress(OSError):
                popen.stdin.write(self.topology_text)  # type: ignore[arg-type]
            with contextlib.suppress(OSError):
                popen.stdin.close()
        now = time.monotonic()
        run = Run(node=node, popen=popen, started=now, heard=now)
        err = threading.Thread(target=self._read_stderr, args=(run,), name=f"{node.name}-stderr", daemon=True)
        out = threading.Thread(target=self._read_stdout, args=(run, err), name=f"{node.name}-stdout", daemon=True)
        run.readers = [err, out]
        err.start()
        out.start()
        return run

    def _read_stderr(self, run: Run) -> None:
        assert run.popen.stderr is not None
        prefix = f"{run.node.name:<{self.width}} | "
        for line in _lines(run.popen.stderr):
            run.stderr_tail.append(line)
            self.output.raw(prefix + line + "\n", err=True)

    def _read_stdout(self, run: Run, stderr_reader: threading.Thread) -> None:
        """Finds the READY line, passes other lines through, reports the exit."""
        assert run.popen.stdout is not None
        prefix = f"{run.node.name:<{self.width}} | "
        for line in _lines(run.popen.stdout):
            details = parse_ready(line) if run.ready is None else None
            if details is not None:
                self.events.put(("ready", run, details))
            elif run.ready is None and parse_ready(line, STARTING_PREFIX) is not None:
                self.events.put(("starting", run, None))  # (what it does goes to its log every 10 s)
            else:
                self.output.raw(prefix + line + "\n", err=False)
        returncode = run.popen.wait()
        stderr_reader.join(timeout=2)  # the tail of stderr is complete before the exit is reported
        self.events.put(("exited", run, returncode))

    def _await_ready(self, group: list[Node]) -> bool:
        """Wait for every node of ``group`` to be READY; False (reported) if one fails or on a signal."""
        waiting = {node.name for node in group}
        while waiting:
            if self.stopper.stopped:
                self.output.print("interrupted while starting; stopping the nodes started so far", err=True)
                return False
            runs = [run for name in sorted(waiting) if (run := self.children[name].run) is not None]
            remaining = min(run.heard for run in runs) + self.ready_timeout - time.monotonic()
            if remaining <= 0:
                for run in runs:
                    if time.monotonic() - run.heard >= self.ready_timeout:
                        self._report_failure(run, self._not_ready())
                return False
            try:
                kind, run, value = self.events.get(timeout=min(0.2, remaining))
            except queue.Empty:
                continue
            if run is not self.children[run.node.name].run:
                continue
            if kind == "starting":
                run.heard = time.monotonic()
            elif kind == "ready":
                run.ready, run.ready_at = value, time.monotonic()
                waiting.discard(run.node.name)
            else:
                run.returncode = value
                # (a node of an earlier role, ready, that died while this one started: not a
                # failure to start, but the start fails all the same, --restart or not)
                what = "died while the cluster was starting" if run.ready is not None else "failed before it was ready"
                self._report_failure(run, f"{what}: {describe_status(value)}")
                return False
        return True

    def _not_ready(self) -> str:
        return (f"was not ready, and did not say it was still starting, for {self.ready_timeout:g} s "
                "(zmx up --ready-timeout gives nodes longer)")

    def _report_failure(self, run: Run, what: str) -> None:
        node = run.node
        lines = [f"Error: node {node.name} ({node.role}, pid {run.pid}) {what}"]
        if run.stderr_tail:
            lines.append("last lines of its stderr:")
            lines += [f"  {line}" for line in run.stderr_tail]
        else:
            lines.append("it wrote nothing on stderr")
        self.output.raw("\n".join(lines) + "\n", err=True)

    # -- running -------------------------------------------------------------------------

    def status_table(self) -> Table:
        table = Table(title=f"cluster {self.topology.cluster}: {len(self.children)} node(s) running",
                      title_justify="left")
        table.add_column("node", no_wrap=True)
        table.add_column("role", no_wrap=True)
        table.add_column("pid", justify="right", no_wrap=True)
        table.add_column("endpoints", no_wrap=True)
        for child in self.children.values():
            node = child.node
            endpoints = [node.url] if isinstance(node, GatewayNode) else [f"{k} {e}" for k, e in node.endpoints]
            pid = str(child.run.pid) if child.run is not None else "-"
            table.add_row(node.name, node.role, pid, "\n".join(endpoints))
        return table

    def _print_where_to_connect(self) -> None:
        gateways = [c.node for c in self.children.values() if isinstance(c.node, GatewayNode)]
        if gateways:
            for gateway in gateways:
                assert isinstance(gateway, GatewayNode)
                self.output.print(where_to_connect(gateway))
            return
        for router in self.topology.nodes_by_role("router"):
            assert isinstance(router, RouterNode)
            self.output.print(f"clients connect to {router.front} (front of router {router.name}; "
                              "this topology has no gateway)")
        publishers = [c.node for c in self.children.values() if isinstance(c.node, (MatcherNode, RelayNode))]
        if publishers:
            feeds = ", ".join(f"{n.pub} ({n.name})" for n in publishers)  # type: ignore[union-attr]
            self.output.print(f"market data: {feeds}; watch one with: zmx probe NODE -t {self.topology_path}")

    def _supervise(self) -> int:
        while not self.stopper.stopped:
            now = time.monotonic()
            self._restart_due(now)
            self._check_restart_readiness(now)
            try:
                kind, run, value = self.events.get(timeout=0.2)
            except queue.Empty:
                continue
            child = self.children[run.node.name]
            if run is not child.run:
                continue
            if kind == "starting":
                run.heard = time.monotonic()
                continue
            if kind == "ready":
                run.ready, run.ready_at = value, time.monotonic()
                self.output.print(f"node {run.node.name} restarted (pid {run.pid}) and is ready")
                continue
            run.returncode = value
            if run.stopping:
                continue
            if self.stopper.stopped:
                break
            was_ready = run.ready is not None
            self.output.print(f"node {run.node.name} ({run.node.role}, pid {run.pid}) "
                              f"{'died' if was_ready else 'failed to start'}: {describe_status(value)}", err=True)
            if not self.restart:
                self.output.print(f"stopping cluster {self.topology.cluster!r} (use --restart to restart "
                                  "nodes that die)", err=True)
                return EXIT_FAILED
            self._schedule_restart(child, run)
        return EXIT_OK

    def _schedule_restart(self, child: Child, run: Run) -> None:
        now = time.monotonic()
        delay, child.backoff = restart_delay(child.backoff, now - run.started if run.ready_at is not None else None)
        child.restart_at = now + delay
        child.run = None
        self.output.print(f"restarting node {child.node.name} in {delay:g} s (restart {child.restarts + 1})",
                          err=True)

    def _restart_due(self, now: float) -> None:
        for child in self.children.values():
            if child.restart_at is not None and now >= child.restart_at:
                child.restart_at = None
                child.restarts += 1
                child.run = self._spawn(child.node)
                self.output.print(f"node {child.node.name} restarted: pid {child.run.pid} "
                                  f"(restart {child.restarts})", err=True)

    def _check_restart_readiness(self, now: float) -> None:
        for child in self.children.values():
            run = child.run
            if (run is not None and run.ready is None and not run.stopping and not run.timed_out
                    and now - run.heard > self.ready_timeout and run.popen.poll() is None):
                run.timed_out = True
                self._report_failure(run, f"{self._not_ready()}; killing it")
                run.popen.kill()  # its exit arrives as an event and is handled as a death

    # -- stopping ------------------------------------------------------------------------

    def _running(self) -> Iterator[Run]:
        for child in reversed(list(self.children.values())):
            if child.run is not None:
                yield child.run

    def stop_all(self) -> None:
        """SIGTERM every child (gateways first, matchers last), SIGKILL the ones still running
        after ``stop_timeout``, reap them all; print a summary if anything was running."""
        runs = list(self._running())
        for child in self.children.values():
            child.restart_at = None
        if not runs:
            return
        started = time.monotonic()
        for run in runs:
            run.stopping = True
            if run.popen.poll() is None:
                try:
                    run.popen.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = started + self.stop_timeout
        killed = []
        for run in runs:
            try:
                run.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed.append(run.node.name)
                run.popen.kill()
                run.popen.wait()
        for run in runs:
            for reader in run.readers:
                reader.join(timeout=2)
        statuses = ", ".join(f"{run.node.name} {describe_status(run.popen.returncode)}" for run in reversed(runs))
        summary = f"stopped {len(runs)} node(s) in {time.monotonic() - started:.1f} s: {statuses}"
        if killed:
            summary += f" (SIGKILL after {self.stop_timeout:g} s: {', '.join(killed)})"
        self.output.print(summary)
        for child in self.children.values():
            child.run = None


def _lines(stream: IO[str]) -> Iterator[str]:
    try:
        for line in stream:
            yield line.rstrip("\n")
    except (OSError, ValueError):
        return
    finally:
        try:
            stream.close()
        except OSError:
            pass
