"""What every node process shares: reading its topology, logging, readiness and stopping.

A node process is started as ``zmx node NAME -t TOPOLOGY``. It binds its sockets, then
prints exactly one line ``READY {"node": ..., "role": ..., ...}`` (JSON) on standard output,
which is how ``zmx up`` and the tests know it is serving: the line is written by the node
after its sockets are bound, never guessed with a sleep. A start that takes long (a matcher
replaying a long journal) says how far it is (``StartProgress``): in its log, and, for a
parent that asks with ``ZMX_STARTING_LINES=1`` (``zmx up``), in ``STARTING {...}`` lines
before READY; ``zmx up`` waits for READY as long as they keep coming. It stops cleanly on
SIGINT or SIGTERM: every loop polls its sockets with a short timeout and checks
``Stopper.stopped`` (a long start, at each ``StartProgress.due``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import gc
import importlib
import json
import logging
import os
import select
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from os import PathLike
from typing import Any

import zmq

from zmx.exceptions import TopologyError
from zmx.topology import Topology, parse_topology

READY_PREFIX = "READY "
STARTING_PREFIX = "STARTING "
READY_TIMEOUT = 20.0  # seconds zmx up gives a node to print READY, from its start or its last STARTING line
STARTING_EVERY_S = 1.0  # how often a long start says so on stdout (zmx up's --ready-timeout counts from the last)
STARTING_ENV = "ZMX_STARTING_LINES"  # "1": print them (zmx up sets it; without it stdout has READY alone)
STARTING_LOG_EVERY_S = 10.0  # and in the log
POLL_MS = 100  # how long a node loop may block before it looks at its Stopper again
# Every connection a node or client makes (``watch_peer``) carries ZeroMQ's own pings: one that
# gets no traffic back for PING_TIMEOUT_MS after a ping is dropped and made again, so a peer
# that hangs, or whose host is cut off with no TCP reset to say so, is noticed within about 4 s
# (without them a relay kept a connection to a matcher that had restarted during a cut, and
# its gateways' books stayed frozen until their clients left). A connect that gets no answer
# in CONNECT_TIMEOUT_MS is given up and tried again, so a link that comes back is used within
# about a second (without it, a connect made while the link was down waited out the kernel's
# SYN retries, 1, 3, 7, ... 63 s apart: routers and matchers found each other 38.6 s after a
# 100 s cut healed).
PING_IVL_MS, PING_TIMEOUT_MS = 1000, 3000
CONNECT_TIMEOUT_MS = 1000
# The garbage collector's thresholds in the matcher and gateway processes, which make no
# reference cycles on their hot paths (tests/test_engine_stress.py checks the order path), so
# a collection finds nothing and only stalls the loop. With CPython's (700, 10, 10):
# - a gateway worker holding 1,000 connections under 160,000 deliveries/s ran a full collection
#   every 4-5 s, each 35-77 ms (perf/bench_soak.py, 2 workers), and every message in flight
#   waited; with these, 1.5 minutes of the same soak made no full collection, and three young
#   ones over 20 ms;
# - a matcher at 16,000 orders/s paused 41 times over 1 ms in about 25 s (up to 8 ms, 100 ms
#   in all); with these, 2 times (3 ms in all).
GC_THRESHOLDS = (10_000, 20, 100)

# role -> module whose run(topology, name, stopper) serves a node of that role
ROLE_MODULES = {
    "matcher": "zmx.node.matcher",
    "router": "zmx.node.router",
    "relay": "zmx.node.relay",
    "gateway": "zmx.node.gateway",
}


# glibc's malloc maps each block of at least M_MMAP_THRESHOLD bytes on its own and unmaps it
# when it is freed; by default the threshold starts at 128 KiB and rises to the size of the
# largest such block freed so far (up to 32 MiB), and blocks under it come from the heap,
# which keeps what is freed. A matcher frees a big set table at every snapshot (its
# generation of order ids) and allocates its id filters in tiers of 512 KiB and more: with the
# rising threshold, once its filters took their second tier its RSS no longer went down with
# its snapshot cycle (perf/bench_soak.py at 3,120 orders/s: lows of 62.0-64.2 MB after that
# step, 56.2-57.5 MB with the threshold fixed).
MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


def cannot_bind(what: str, address: str, error_number: int | None, reason: str | None) -> str:
    """What a node says when it cannot bind ``address`` (``what``: "the pub socket", ...), with
    a hint for the usual mistake on several machines: an address that is another host's."""
    reason = (reason or f"error {error_number}").removesuffix(f" (addr={address!r})")  # pyzmq adds the address
    text = f"cannot bind {what} to {address}: {reason}"
    if error_number == errno.EADDRNOTAVAIL:
        text += (" (no interface of this host has that address: start the node on the host the topology "
                 "gives it, or change the address)")
    elif error_number == errno.ENODEV:  # ZeroMQ's answer to a bind host it cannot resolve
        text += (" (the host is neither a name that resolves here nor an interface, such as eth0: check it, "
                 "or give an address)")
    return text


IPC_CHECK_TIMEOUT_S = 1.0  # a bound for the check's connect (a unix one answers at once: a full backlog, EAGAIN)
IPC_IN_USE = "another process serves this ipc path"


def ipc_problem(endpoint: str) -> tuple[int, str] | None:
    """``(errno, why)`` if ``endpoint`` is an ``ipc://`` path not to bind: one that a living
    process serves (``EADDRINUSE``), or one this process may not check (``EACCES``). ZeroMQ
    removes the file before it binds, so a second node (of a second ``zmx up``, say) would take
    the path from the first without a word and split the cluster's traffic between the two.
    (An abstract ``ipc://@name`` in use is refused by the kernel, and checked here by binding
    it; a file left by a process that died accepts no connection and is taken over, as it
    should be.)"""
    if not endpoint.startswith("ipc://"):
        return None
    path = endpoint[len("ipc://"):]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        if path.startswith("@"):  # abstract: the name is in use if it cannot be bound
            try:
                probe.bind("\0" + path[1:])
            except OSError as e:
                return (errno.EADDRINUSE, IPC_IN_USE) if e.errno == errno.EADDRINUSE else None
            return None
        probe.settimeout(IPC_CHECK_TIMEOUT_S)
        try:
            probe.connect(path)
        except PermissionError:
            return errno.EACCES, "cannot check whether another process serves this ipc path: permission denied"
        except (TimeoutError, BlockingIOError):
            return errno.EADDRINUSE, IPC_IN_USE  # a listener that accepts nobody (its backlog full)
        except OSError:
            return None  # nothing there, a file left behind (refused), or a path ZeroMQ refuses too
    return errno.EADDRINUSE, IPC_IN_USE


def bind(sock: zmq.Socket[Any], endpoint: str) -> None:
    """``sock.bind(endpoint)``, refused (``ZMQError``) for an ipc path not to take
    (``ipc_problem``); IPv6 on for an IPv6 address (``connect``)."""
    problem = ipc_problem(endpoint)
    if problem is not None:
        error, why = problem
        raise zmq.ZMQError(error, f"{os.strerror(error)} ({why})")
    _allow_ipv6(sock, endpoint)
    sock.bind(endpoint)


def connect(sock: zmq.Socket[Any], endpoint: str) -> None:
    """``sock.connect(endpoint)``, with ZeroMQ's IPv6 option on for an IPv6 address
    (``tcp://[::1]:5560``): without it ZeroMQ takes IPv4 only, and such an endpoint failed
    ("No such device"). Only then: with the option on, a host name such as ``localhost``
    resolves to its IPv6 address, which a peer bound to 127.0.0.1 does not answer."""
    _allow_ipv6(sock, endpoint)
    sock.connect(endpoint)


def _allow_ipv6(sock: zmq.Socket[Any], endpoint: str) -> None:
    # ZeroMQ reads the option at each connect: set for this endpoint alone (a relay's XSUB, a
    # gateway's SUB connect several, and a host name after an IPv6 one resolved to IPv6 too)
    sock.setsockopt(zmq.IPV6, 1 if endpoint.startswith("tcp://[") else 0)


def keep_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at ``MMAP_THRESHOLD`` (which also stops it from rising), so
    that big blocks go back to the system when they are freed. ``False`` where the C library
    is not glibc (nothing changes there)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # another C library: its mallopt numbers differ
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def settle_collector() -> None:
    """Before a node starts serving: the collector's thresholds (``GC_THRESHOLDS``), and every
    object alive now (modules, the topology, recovered books), which lives as long as the
    process, kept out of its passes."""
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()


# A topology is a page or two of YAML; past this it is not one (a device such as /dev/zero,
# or the wrong file), and it is refused before it is read whole
MAX_TOPOLOGY_BYTES = 1 << 20
FIFO_WAIT_S = 10.0  # for a writer to a topology given as a FIFO


def load_topology(path: str | PathLike[str]) -> Topology:
    """Read and validate the topology file at ``path``; messages name it as given."""
    return parse_topology(read_topology_text(path), str(path))


def read_topology_text(path: str | PathLike[str]) -> str:
    """The text of the topology file at ``path`` (``TopologyError`` if it cannot be a topology's)."""
    source = str(path)
    try:
        # Opened without waiting (a FIFO that nobody writes would block the open for ever); a
        # FIFO is then given FIFO_WAIT_S for a writer to come (/dev/stdin, <(...), a script's).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
            if stat.S_ISFIFO(mode):
                waiting = select.poll()
                waiting.register(fd, select.POLLIN)
                if not waiting.poll(FIFO_WAIT_S * 1000):
                    raise TopologyError(f"{source}: a FIFO that nobody wrote to in {FIFO_WAIT_S:g} s")
            os.set_blocking(fd, True)
            f = open(fd, encoding="utf-8")
        except BaseException:
            os.close(fd)
            raise
        with f:
            text = f.read(MAX_TOPOLOGY_BYTES + 1)
        if len(text) > MAX_TOPOLOGY_BYTES:
            raise TopologyError(f"{source}: more than {MAX_TOPOLOGY_BYTES:,} characters: not a topology "
                                "(a topology is a page or two of YAML)")
    except OSError as e:
        raise TopologyError(f"{source}: cannot read the topology: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise TopologyError(f"{source}: the topology is not UTF-8 text ({e.reason})") from None
    return text


class Stopper:
    """Set by SIGINT/SIGTERM (or by code); node loops check it between polls."""

    def __init__(self) -> None:
        self.stopped = False
        self.signal: int | None = None

    def stop(self, signum: int | None = None, _frame: Any = None) -> None:
        self.stopped = True
        self.signal = signum

    def install(self) -> Stopper:
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGTERM, self.stop)
        return self


def watch_peer(sock: zmq.Socket[Any]) -> None:
    """Pings and a connect timeout (``PING_IVL_MS``, ``CONNECT_TIMEOUT_MS``) for the connections
    ``sock`` will make: set them before ``connect``."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, PING_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, PING_TIMEOUT_MS)
    sock.setsockopt(zmq.CONNECT_TIMEOUT, CONNECT_TIMEOUT_MS)


def setup_logging(node: str, level: int = logging.INFO) -> None:
    """Log lines name the node; messages about a symbol name the symbol (``BTC-USDT: ...``)."""
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {node} %(name)s: %(message)s",
    )


def log_as_worker(worker: int) -> None:
    """In one of a node's worker processes: each of its log lines starts with ``worker N:``."""
    prefix = f"worker {worker}: "

    def name_it(record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(prefix):  # a record goes through each handler
            record.msg = prefix + str(record.msg)
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(name_it)


def announce_ready(node: str, role: str, **details: Any) -> None:
    """Tell whoever started this process that it is serving (one line on stdout)."""
    sys.stdout.write(READY_PREFIX + json.dumps({"node": node, "role": role, **details}) + "\n")
    sys.stdout.flush()


def parse_ready(line: str, prefix: str = READY_PREFIX) -> dict[str, Any] | None:
    """The details of a ``READY`` line (or of a line with another ``prefix``: ``STARTING``),
    or None for any other line."""
    if not line.startswith(prefix):
        return None
    try:
        details = json.loads(line[len(prefix):])
    except ValueError:
        return None
    return details if isinstance(details, dict) else None


class StartStopped(BaseException):  # noqa: N818 - not an error: a stop (as KeyboardInterrupt), past `except Exception`
    """SIGINT or SIGTERM came while a node was starting (``StartProgress.due``)."""


class StartProgress:
    """How a node says that its start is long but going on: a ``STARTING`` line on stdout at
    most every ``STARTING_EVERY_S``, and the same in the log every ``STARTING_LOG_EVERY_S``.

    A loop calls ``due()`` every few thousand steps (one clock read) and ``say()`` when it is
    due::

        for start in range(0, len(commands), 0x4000):
            if progress.due():
                progress.say(f"replaying the journal: {start:,} of {len(commands):,} commands")
            ...  # the chunk commands[start:start + 0x4000]
    """

    def __init__(self, node: str, stopper: Stopper | None = None) -> None:
        self.node = node
        self.stopper = stopper
        # Only for a parent that asks (STARTING_ENV): one that reads the first line for READY
        # (zmx node ... | head -1, say) would get this instead, and the node a closed pipe.
        self._lines = os.environ.get(STARTING_ENV) == "1"
        now = time.monotonic()
        self._say_at = now + STARTING_EVERY_S
        self._log_at = now + STARTING_LOG_EVERY_S

    def due(self) -> bool:
        """Whether ``say`` is due; ``StartStopped`` once SIGINT or SIGTERM came (``stopper``):
        a long start gives up at once rather than run to its end."""
        if self.stopper is not None and self.stopper.stopped:
            raise StartStopped()
        return time.monotonic() >= self._say_at

    def say(self, what: str) -> None:
        now = time.monotonic()
        self._say_at = now + STARTING_EVERY_S
        if self._lines:
            try:
                sys.stdout.write(STARTING_PREFIX + json.dumps({"node": self.node, "what": what}) + "\n")
                sys.stdout.flush()
            except (OSError, ValueError, AttributeError):  # nobody reads them (stdout closed, or None)
                self._lines = False
        if now >= self._log_at:
            self._log_at = now + STARTING_LOG_EVERY_S
            logging.getLogger("zmx.node").info("still starting: %s", what)


def run_node(topology: Topology, name: str) -> int:
    """Serve node ``name`` of ``topology`` in this process until SIGINT/SIGTERM; exit status."""
    node = topology.node(name)
    setup_logging(name)
    module = importlib.import_module(ROLE_MODULES[node.role])
    stopper = Stopper().install()
    module.run(topology, name, stopper)
    return 0


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """The C library's ``prctl``, looked up once (``find_library`` runs ``ldconfig``: 2-4 ms, which
    a matcher's loop paid at each snapshot's fork); None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(signal_number: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A function for a child process to run first thing after its fork: Linux then sends it
    ``signal_number`` when the process that forked it dies (``prctl(PR_SET_PDEATHSIG)``), so that a
    ``kill -9`` of a parent leaves no child behind. Made in the parent (it notes the parent's
    pid: a child whose parent died before the call took effect exits at once). The signal is
    tied to the thread that forked the child: fork from the main thread. None where there is
    no such call."""
    prctl = _prctl()
    if prctl is None:
        return None
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def in_child() -> None:
        prctl(pr_set_pdeathsig, signal_number, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return in_child
