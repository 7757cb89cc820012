"""``zmx.handshake.upgrade_response`` against websockets' ``ServerProtocol``.

The gateway answers a plain upgrade request itself and gives everything else to
``ServerProtocol``; so whenever ``upgrade_response`` answers, ``ServerProtocol`` (set up as the
gateway sets it up) must accept the same request with the same bytes, and the request must end
where ``upgrade_response`` says. When it declines, websockets' answer stands, whatever it is.
"""

from __future__ import annotations

import base64
import random

import pytest
from websockets.client import ClientProtocol
from websockets.http11 import Request
from websockets.server import ServerProtocol
from websockets.uri import parse_uri
from websockets.utils import accept_key

from zmx.handshake import MAX_REQUEST_BYTES, cannot_be_http, refused_method, upgrade_response

DATE = "Sat, 28 Nov 2026 02:00:00 GMT"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455, 1.3: its accept value is s3pPLMBiTxaQ9kYGzzhZRbK+xOo=


def websockets_answer(data: bytes) -> bytes | None:
    """What ``ServerProtocol`` sends for ``data``, its ``Date`` replaced by ``DATE``; None when
    it finds no complete request in it."""
    ws = ServerProtocol(max_size=65536)
    ws.receive_data(data)
    requests = [e for e in ws.events_received() if isinstance(e, Request)]
    if not requests:
        return None
    ws.send_response(ws.accept(requests[0]))
    sent = b"".join(ws.data_to_send())
    head, date, rest = sent.partition(b"\r\nDate: ")
    return head + date + DATE.encode() + rest[rest.index(b"\r\n"):] if date else sent


def same_as_websockets(data: bytes, answer: tuple[bytes, int]) -> bool:
    """``answer`` is websockets' for ``data``, and the request ends where it says."""
    response, end = answer
    return websockets_answer(data) == websockets_answer(data[:end]) == response and \
        websockets_answer(data[:end - 1]) is None


def request(*headers: str, line: str = "GET / HTTP/1.1") -> bytes:
    return ("\r\n".join((line, *headers)) + "\r\n\r\n").encode("latin-1")


PLAIN = ("Host: 127.0.0.1:8765", "Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {KEY}",
         "Sec-WebSocket-Version: 13")


def python_websockets_request() -> bytes:
    client = ClientProtocol(parse_uri("ws://127.0.0.1:8765/"))
    client.send_request(client.connect())
    return b"".join(client.data_to_send())


ACCEPTED = {
    "plain": request(*PLAIN),
    "websockets client": python_websockets_request(),
    "browser": request("Host: localhost:8765", "Connection: Upgrade", "Pragma: no-cache",
                       "Cache-Control: no-cache", "User-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0",
                       "Upgrade: websocket", "Origin: http://localhost:8765", "Sec-WebSocket-Version: 13",
                       "Accept-Encoding: gzip, deflate, br", "Accept-Language: en-US,en;q=0.9",
                       f"Sec-WebSocket-Key: {KEY}",
                       "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"),
    "firefox connection list": request("Host: localhost", "Connection: keep-alive, Upgrade", "Upgrade: websocket",
                                       f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Version: 13"),
    "lower case, spaces and tabs": request("host:x", "upgrade:\tWebSocket ", "connection:  upgrade",
                                           f"sec-websocket-key: {KEY}", "SEC-WEBSOCKET-VERSION:13"),
    "path and query": request(*PLAIN, line="GET /feed?channels=BTC-USDT HTTP/1.1"),
    "two connection headers": request(*PLAIN[:2], "Connection: keep-alive", *PLAIN[2:]),
    "non-ascii header value": request(*PLAIN, "X-Name: caf\xe9"),
}

DECLINED = {
    "the page": request("Host: x"),
    "head": request(*PLAIN, line="HEAD / HTTP/1.1"),
    "post": request(*PLAIN, line="POST / HTTP/1.1"),
    "http 1.0": request(*PLAIN, line="GET / HTTP/1.0"),
    "space in the path": request(*PLAIN, line="GET /a b HTTP/1.1"),
    "no key": request(*PLAIN[:3], PLAIN[4]),
    "short key": request(*PLAIN[:3], "Sec-WebSocket-Key: AAAA", PLAIN[4]),
    "key not base64": request(*PLAIN[:3], "Sec-WebSocket-Key: " + "!" * 24, PLAIN[4]),
    "two keys": request(*PLAIN, f"Sec-WebSocket-Key: {KEY}"),
    "version 8": request(*PLAIN[:4], "Sec-WebSocket-Version: 8"),
    "no version": request(*PLAIN[:4]),
    "two versions": request(*PLAIN, "Sec-WebSocket-Version: 13"),
    "upgrade h2c": request(PLAIN[0], "Upgrade: h2c", *PLAIN[2:]),
    "two upgrades": request(PLAIN[0], "Upgrade: websocket, h2c", *PLAIN[2:]),
    "no connection upgrade": request(*PLAIN[:2], "Connection: keep-alive", *PLAIN[3:]),
    "empty list item": request(*PLAIN[:2], "Connection: keep-alive,,Upgrade", *PLAIN[3:]),
    "two origins": request(*PLAIN, "Origin: http://a", "Origin: http://b"),
    "subprotocol offer": request(*PLAIN, "Sec-WebSocket-Protocol: chat"),
    "a body": request(*PLAIN, "Content-Length: 5"),
    "chunked": request(*PLAIN, "Transfer-Encoding: chunked"),
    "header without a colon": request(*PLAIN, "X-Broken"),
    "space before the colon": request(*PLAIN, "X-Name : value"),
    "folded header": request(*PLAIN, "X-Name: a", " b"),
    "control character": request(*PLAIN, "X-Name: a\x01b"),
    "bare line feeds": request(*PLAIN).replace(b"\r\n", b"\n", 2),
    "incomplete": request(*PLAIN)[:-2],
    "too long": request(*PLAIN, "X-Pad: " + "a" * MAX_REQUEST_BYTES),
    "too many headers": request(*PLAIN, *(f"X-{i}: {i}" for i in range(70))),
}


@pytest.mark.parametrize("name", ACCEPTED)
def test_a_plain_upgrade_request_gets_websockets_own_answer(name: str) -> None:
    data = ACCEPTED[name] + b"\x81\x85first frame"
    answer = upgrade_response(data, DATE)
    assert answer is not None, name
    assert same_as_websockets(data, answer)
    assert answer[0].startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert data[answer[1]:] == b"\x81\x85first frame"


def test_the_accept_value_is_rfc_6455s() -> None:
    answer = upgrade_response(ACCEPTED["plain"], DATE)
    assert answer is not None
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in answer[0]
    assert accept_key(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("name", DECLINED)
def test_anything_else_is_left_to_websockets(name: str) -> None:
    assert upgrade_response(DECLINED[name], DATE) is None


def test_random_mutations_are_answered_only_as_websockets_answers_them() -> None:
    """Bytes replaced, inserted and removed at random in accepted requests: whatever
    ``upgrade_response`` still answers, websockets answers the same way."""
    rng = random.Random(5)
    alphabet = b" \t\r\n:,;=/-aAzZ09\x00\x7f\x80\xff"
    seeds = list(ACCEPTED.values())
    answered = declined = 0
    for _ in range(6000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 2)):
            at = rng.randrange(len(data))
            what = rng.random()
            if what < 0.4:
                data[at] = rng.choice(alphabet)
            elif what < 0.7:
                data.insert(at, rng.choice(alphabet))
            else:
                del data[at]
        data = bytes(data)
        answer = upgrade_response(data, DATE)
        if answer is None:
            declined += 1
            continue
        answered += 1
        assert same_as_websockets(data, answer), data
    assert answered > 500 and declined > 2000, (answered, declined)  # both sides of the check ran


def test_a_key_is_checked_as_websockets_checks_it() -> None:
    for raw in (bytes(16), bytes(range(16)), b"\xff" * 16):
        key = base64.b64encode(raw).decode()
        data = request(*PLAIN[:3], f"Sec-WebSocket-Key: {key}", PLAIN[4])
        answer = upgrade_response(data, DATE)
        assert answer is not None and same_as_websockets(data, answer)


def test_a_method_other_than_get_or_head_is_found_once_its_request_line_has_come() -> None:
    assert refused_method(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}") == "POST"
    assert refused_method(b"DELETE /x HTTP/1.0\r\n") == "DELETE"
    assert refused_method(request(*PLAIN, line="PUT / HTTP/1.1")) == "PUT"
    for data in (request(*PLAIN), request("Host: x", line="HEAD / HTTP/1.1"),
                 b"POST / HTTP/1.1",  # the line has not all come: websockets reads the rest
                 b"POST /\r\n", b"hello world\r\n", b"P\x00ST / HTTP/1.1\r\n", b"\r\n"):
        assert refused_method(data) is None, data


@pytest.mark.parametrize(("start", "cannot"), [
    (b"", False), (b"G", False), (b"GET", False), (b"GET ", False), (b"GET /chat?x=1", False), (b"GET / ", False),
    (b"GET / HT", False), (b"GET / HTTP/1.1", False), (b"hello there", False),  # a method and a target so far
    (bytes(200), True), (b" GET", True), (b"GET  /", True), (b"GET /\xff", True), (b"GET / XTTP", True),
    (b"GET / HTTP/1.1\x00", True), (b"G\x00", True), (bytes.fromhex("160301020001"), True),
])
def test_bytes_that_cannot_start_a_request_line_are_told_before_a_line_ends(start: bytes, cannot: bool) -> None:
    assert cannot_be_http(start) is cannot
