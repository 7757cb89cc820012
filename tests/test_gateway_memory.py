"""A WebSocket connection that ends leaves nothing behind for the garbage collector.

The gateway runs its collector's full pass rarely (``zmx.node.runtime.GC_THRESHOLDS``), so
whatever a connection leaves in a reference cycle stays in memory for a long while. websockets'
``ServerProtocol`` is such a cycle (its parser generator's frame holds it): before this was
handled, a reconnect storm of 100,000 connections raised the gateway's memory per connection
from 2.1 to 3.8 KB. These tests drive ``zmx.node.gateway.Connection`` with a transport of their
own, the collector off, and check with weak references that the machines are freed at once.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import os
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol

from zmx.node.gateway import Connection
from zmx.topology import GatewayLimits


class Transport:
    """What a ``Connection`` uses of uvloop's TCP transport; keeps what is written."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written += data

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    abort = close


class Gateway:
    """The part of ``zmx.node.gateway.Gateway`` that a connection calls while it opens and ends."""

    def __init__(self) -> None:
        self.limits = GatewayLimits()
        self.spare_ws: ServerProtocol | None = None
        self.handshaking: dict[Connection, float] = {}
        self.dropped: list[Connection] = []

    def http_date(self) -> str:
        return "Sat, 28 Nov 2026 02:00:00 GMT"

    def opened(self, conn: Connection) -> None:
        del self.handshaking[conn]
        conn.session = object()  # type: ignore[assignment]  # open: what it holds does not matter here

    def drop(self, conn: Connection) -> None:
        self.dropped.append(conn)


@pytest.fixture(autouse=True)
def no_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def opened(gateway: Gateway, split: bool) -> tuple[Connection, Transport, weakref.ref[Any] | None]:
    """A connection through its handshake, and a weak reference to its handshake's machine:
    none when the request comes in one read (``zmx.handshake`` answers it), websockets' when
    it comes in two."""
    conn, transport = Connection(gateway), Transport()  # type: ignore[arg-type]
    conn.connection_made(transport)  # type: ignore[arg-type]
    key = base64.b64encode(os.urandom(16)).decode()
    request = (f"GET / HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    machine = None
    if split:
        conn.data_received(request[:20])
        assert conn.ws is not None and not transport.written
        machine = weakref.ref(conn.ws)
        request = request[20:]
    conn.data_received(request)
    assert transport.written.startswith(b"HTTP/1.1 101 ")
    assert not conn.closing  # a request in two reads once left its connection "closing", cut 2 s later
    return conn, transport, machine


def machines() -> list[ServerProtocol]:
    return [o for o in gc.get_objects() if type(o) is ServerProtocol]


def test_a_handshake_in_one_read_makes_no_machine() -> None:
    gateway = Gateway()
    conns = [opened(gateway, split=False) for _ in range(3)]
    assert all(machine is None and conn.ws is None for conn, _, machine in conns)
    assert gateway.spare_ws is None and machines() == []


def test_the_handshake_machines_of_new_connections_are_freed_at_once() -> None:
    gateway = Gateway()
    first, _, first_machine = opened(gateway, split=True)
    assert first_machine is not None and gateway.spare_ws is first_machine()  # idle: the gateway's spare
    second, _, second_machine = opened(gateway, split=True)
    assert second_machine is not None and gateway.spare_ws is second_machine()
    assert first_machine() is None  # the spare it replaced is gone, no collection needed
    assert first.ws is None and second.ws is None


@pytest.mark.parametrize("split", [False, True], ids=["one-read", "two-reads"])
def test_a_client_that_leaves_without_a_close_frame_leaves_no_machine_behind(split: bool) -> None:
    gateway = Gateway()
    conn, transport, _ = opened(gateway, split)
    spare = gateway.spare_ws
    assert conn.eof_received() is None  # asyncio then closes the transport
    conn.connection_lost(None)
    assert gateway.dropped == [conn] and conn.ws is None
    assert gateway.spare_ws is spare  # no machine was borrowed or made for the leaving
    assert machines() == ([spare] if split else [])
    assert transport.written.count(b"\x88") == 0  # no close frame to a client that is gone


def test_a_connection_that_ends_mid_frame_frees_its_machine() -> None:
    async def run() -> None:  # the closing connection sets a timer: it needs a running loop
        gateway = Gateway()
        conn, transport, _ = opened(gateway, split=False)
        frame = Frame(Opcode.TEXT, json.dumps({"action": "ping", "id": 1}).encode()).serialize(
            mask=True, extensions=[])  # masked, as a client's
        conn.data_received(frame[:9])  # the first bytes of a frame: the rest never comes
        held = weakref.ref(conn.ws)
        assert held() is not None and held() is not gateway.spare_ws
        assert conn.eof_received() is None
        assert conn.closing  # the machine failed the connection (1006) and keeps its error
        conn.connection_lost(None)
        assert held() is None  # ... and is gone with it, no collection needed
        assert conn.ws is None and gateway.dropped == [conn]
        assert transport.written.count(b"\x88") == 0  # no close frame to a client that is gone

    asyncio.run(run())
