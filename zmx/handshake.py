"""The common case of the WebSocket opening handshake (RFC 6455, 4.2), answered without a
state machine.

Pure: bytes in, bytes out; no sockets, no clock (the caller passes the ``Date``).

A gateway accepts every connection of a reconnect storm through its handshake, and
``websockets``' ``ServerProtocol`` costs about 175 us of CPU for one (a new machine, its
generator-based HTTP parser, ``Headers``, the response): about a third of what a new,
subscribed connection costs the gateway. Nearly every client sends the same kind of request:
one read holding ``GET <path> HTTP/1.1``, a few well-formed headers, ``Upgrade: websocket``,
``Connection: Upgrade``, a key and version 13. ``upgrade_response`` answers exactly that kind,
with the bytes ``ServerProtocol`` would send for it (no extension and no subprotocol is
negotiated, as the gateway's machines negotiate none), and returns ``None`` for anything
else. The gateway then hands the read to ``ServerProtocol`` as before, so everything unusual
keeps websockets' handling: a request split over reads, a plain HTTP request (the page), a
malformed or refused handshake and its error response, a subprotocol offer.
``tests/test_handshake.py`` checks the answers against ``ServerProtocol``'s.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

__all__ = ["MAX_REQUEST_BYTES", "PAGE_METHODS", "cannot_be_http", "refused_method", "upgrade_response"]

MAX_REQUEST_BYTES = 4096  # a longer request goes to websockets (its limits: 8 KiB a line, 128 headers)
MAX_HEADERS = 64
MAX_REQUEST_LINE_BYTES = 8192  # websockets' limit for one line
PAGE_METHODS = ("GET", "HEAD")  # the methods of plain HTTP requests the gateway answers

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, 1.3
# The same token and field-value grammar as websockets' HTTP parser (RFC 9110, 5.6.2 and 5.5).
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_VALUE = re.compile(rb"[\x09\x20-\x7e\x80-\xff]*")
_OWS = b" \t"
_TARGET = re.compile(rb"[\x21-\x7e]+")  # a request target: visible ASCII (websockets takes any ASCII)
# Headers that may come at most once, or the request is declined: websockets refuses a
# handshake with two keys, two versions or two origins.
_SINGLE = (b"sec-websocket-key", b"sec-websocket-version", b"origin")
# Headers that send the request to websockets: a body, or a subprotocol offer (whose syntax
# websockets checks even though the gateway selects none).
_DECLINE = frozenset((b"content-length", b"transfer-encoding", b"sec-websocket-protocol"))


def _tokens(values: list[bytes]) -> list[bytes] | None:
    """The comma-separated tokens of a list header's values, or None if one is not a token."""
    found = []
    for value in values:
        for item in value.split(b","):
            item = item.strip(_OWS)
            if not _TOKEN.fullmatch(item):
                return None
            found.append(item.lower())
    return found


def upgrade_response(data: bytes, date: str) -> tuple[bytes, int] | None:
    """The ``101 Switching Protocols`` answer to a plain, complete WebSocket upgrade request
    at the start of ``data``, and where the request ends in ``data`` (what follows it is
    the client's first frames); ``None`` when ``data`` is not such a request.

    ``date`` is the response's ``Date`` value (``email.utils.formatdate(usegmt=True)``).
    """
    end = data.find(b"\r\n\r\n", 0, MAX_REQUEST_BYTES)
    if end < 0:
        return None
    lines = data[:end].split(b"\r\n")
    if len(lines) > MAX_HEADERS + 1:
        return None
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or parts[2] != b"HTTP/1.1" or not _TARGET.fullmatch(parts[1]):
        return None
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        value = value.strip(_OWS)
        if not colon or not _TOKEN.fullmatch(name) or not _VALUE.fullmatch(value):
            return None
        headers.setdefault(name.lower(), []).append(value)
    if not _DECLINE.isdisjoint(headers) or any(len(headers.get(name, ())) > 1 for name in _SINGLE):
        return None
    upgrade = _tokens(headers.get(b"upgrade", []))
    if upgrade != [b"websocket"]:
        return None
    connection = _tokens(headers.get(b"connection", []))
    if connection is None or b"upgrade" not in connection:
        return None
    if headers.get(b"sec-websocket-version") != [b"13"]:
        return None
    key = headers.get(b"sec-websocket-key")
    if key is None:
        return None
    try:
        if len(base64.b64decode(key[0], validate=True)) != 16:
            return None
    except binascii.Error:
        return None
    accept = base64.b64encode(hashlib.sha1(key[0] + _GUID).digest())
    response = (b"HTTP/1.1 101 Switching Protocols\r\nDate: " + date.encode() + b"\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    return response, end + 4


_METHOD_SO_FAR = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]*")
_TARGET_SO_FAR = re.compile(rb"[\x21-\x7e]*")
_VERSION_SO_FAR = re.compile(rb"(H(T(T(P(/([0-9](\.([0-9](\r)?)?)?)?)?)?)?)?)?")  # what HTTP/1.1 CR LF is, so far


def cannot_be_http(start: bytes) -> bool:
    """Whether ``start``, the first bytes of a connection and no whole line yet, cannot begin an
    HTTP request line (``METHOD SP TARGET SP HTTP/``): a NUL, a byte outside ASCII in the method
    or the target, a line that starts with a space. The gateway answers those at once, instead
    of waiting for a line that will never come (websockets reads lines only)."""
    method = _METHOD_SO_FAR.match(start).end()  # type: ignore[union-attr]  # (matches the empty string)
    if method == len(start):
        return False  # a method so far
    if method == 0 or start[method] != 0x20:
        return True
    target = _TARGET_SO_FAR.match(start, method + 1).end()  # type: ignore[union-attr]
    if target == len(start):
        return False
    if target == method + 1 or start[target] != 0x20:
        return True
    return not _VERSION_SO_FAR.fullmatch(start, target + 1)


def refused_method(data: bytes) -> str | None:
    """The method of the HTTP request line at the start of ``data`` when it is neither GET nor
    HEAD; None for those, and when ``data`` does not start with a whole request line.

    The gateway answers such a request (405) before websockets sees it: websockets' parser
    refuses a request with a body, as a POST usually has, and closes without a word.
    """
    end = data.find(b"\r\n", 0, MAX_REQUEST_LINE_BYTES)
    parts = data[:end].split(b" ") if end > 0 else []
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/") or not _TOKEN.fullmatch(parts[0]):
        return None
    method = parts[0].decode("ascii")
    return None if method in PAGE_METHODS else method
