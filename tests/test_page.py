"""The gateway's browser page: served over plain HTTP on the WebSocket port, and its book code.

- A GET that does not ask for ``Upgrade: websocket`` at ``/`` gets the page
  (``zmx/node/page.html``), a HEAD its headers alone, any other path 404, any other method 405;
  WebSocket clients keep using the same port, before and after.
- The page keeps a channel's book in a script of its own (``<script id="zmx-book">``, no DOM).
  That script, taken from the page as served, runs under Node on the messages a real client got
  during a seeded random order flow: every snapshot and update must check out (``prev_seq`` and
  checksum), and the books must end equal to the matcher's. A stream with an update missing, or
  a checksum that does not match, must be caught.

- The same script decides what the page offers for an order of its connection (cancel and amend
  while it is live, ``amended`` included; a cancel alone while its submit's outcome is unknown)
  and builds its ``amend_order``; what it builds is sent to a real gateway here.

The page's DOM code (tables, the order form, the buttons) needs a browser and is not run here.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import re
import shutil
import signal
import socket
import subprocess
import zlib
from pathlib import Path
from typing import Any

import pytest
import zmq
from nodes import Cluster, write_topology
from test_gateway_memory import Gateway as OneConnectionGateway
from test_gateway_memory import Transport
from ws import Clients, matcher_book

import zmx.node
from zmx.depth import checksum
from zmx.node.client import Client
from zmx.node.gateway import Connection
from zmx.node.runtime import load_topology
from zmx.topology import GatewayNode, Topology

PAGE_FILE = Path(zmx.node.__file__).parent / "page.html"
SYMBOLS = {"m1": ["BTC-USDT"], "m2": ["ETH-USDT"]}
NODE = shutil.which("node")

# Feeds JSON lines (channel messages, as received) to the page's ChannelBook; prints what each
# snapshot and update gave, and the books at the end.
REPLAY = """
const { ChannelBook, crc32 } = require(process.argv[1]);
const lines = require("fs").readFileSync(0, "utf8").split("\\n").filter(Boolean);
const books = {}, results = {};
for (const line of lines) {
  const m = JSON.parse(line);
  let result;
  if (m.type === "crc32") { console.log(JSON.stringify(m.texts.map(crc32))); process.exit(0); }
  if (m.type === "depth_snapshot") result = (books[m.channel] ??= new ChannelBook(m.channel)).snapshot(m.data);
  else if (m.type === "depth_update") result = books[m.channel].update(m.data);
  else continue;
  results[result] = (results[result] || 0) + 1;
}
const out = {};
for (const [name, b] of Object.entries(books)) {
  out[name] = { seq: b.seq, bids: b.levels("bids"), asks: b.levels("asks") };
}
console.log(JSON.stringify({ results, books: out }));
"""


# Runs the page's order code on [order, typed price, typed quantity] cases: [live, amend request,
# outcome unknown (only a cancel offered)].
ORDER_CODE = """
const { orderIsLive, outcomeUnknown, amendRequest } = require(process.argv[1]);
const cases = JSON.parse(require("fs").readFileSync(0, "utf8"));
console.log(JSON.stringify(cases.map(([order, price, quantity]) => [orderIsLive(order),
                                                                   amendRequest(order, price, quantity),
                                                                   outcomeUnknown(order)])));
"""


def start(cluster: Cluster) -> tuple[Topology, GatewayNode]:
    cluster.topology = write_topology(cluster.directory, matchers=SYMBOLS, gateways=1)
    for name in ("m1", "m2", "r1", "g1"):
        cluster.start(name)
    topology = load_topology(cluster.topology)
    gateway = topology.nodes["g1"]
    assert isinstance(gateway, GatewayNode)
    return topology, gateway


def get(gateway: GatewayNode, path: str) -> tuple[int, dict[str, str], bytes]:
    host, port = gateway.url.removeprefix("ws://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def ask(gateway: GatewayNode, *parts: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``parts`` (one write each) and read the answer until the gateway closes."""
    host, port = gateway.url.removeprefix("ws://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        for part in parts:
            sock.sendall(part)
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), answer[:200]
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


def test_other_methods_get_405_and_the_gateway_goes_on_serving(cluster: Cluster, clients: Clients) -> None:
    _, gateway = start(cluster)
    client = clients("before", url=gateway.url)
    client.subscribe("BTC-USDT")
    upgrade = (f"Host: zmx\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {'A' * 22}==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    for name, parts in {
        "a POST with a body": (b"POST / HTTP/1.1\r\nHost: zmx\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 2\r\n\r\n{}",),
        "a POST with a body, over several writes": (b"POST /or", b"ders HTTP/1.1\r\nHost: zmx\r\n",
                                                    b"Content-Length: 2\r\n\r\n", b"{}"),
        "a DELETE, its request line split": (b"DEL", b"ETE /x HTTP/1.1\r\nHost: zmx\r\n\r\n"),
        "an OPTIONS": (b"OPTIONS * HTTP/1.1\r\nHost: zmx\r\n\r\n",),
        "a PUT that asks for the WebSocket protocol": (b"PUT / HTTP/1.1\r\n" + upgrade,),
    }.items():
        status, headers, body = ask(gateway, *parts)
        assert status == 405, name
        assert headers["allow"] == "GET, HEAD" and headers["connection"] == "close", (name, headers)
        assert b"GET and HEAD" in body and int(headers["content-length"]) == len(body), (name, body)

    # The gateway goes on serving its clients and new ones.
    after = clients("after", url=gateway.url)
    after.subscribe("ETH-USDT")
    client.send({"action": "ping", "id": 1})
    client.expect({"type": "pong", "id": 1})
    assert get(gateway, "/")[0] == 200


@pytest.mark.parametrize("cut", [1, 4, 8, 17, 22], ids=lambda cut: f"after-{cut}-bytes")  # the line is 23
def test_a_request_of_another_method_gets_405_whichever_read_its_request_line_ends_in(cut: int) -> None:
    # A POST with a body whose request line came in two reads got 400 (websockets' parser
    # refuses the body) instead of 405: only the first read was looked at. Reads are exact
    # here: the request goes to the gateway's Connection in two pieces, cut after `cut` bytes.
    request = b"POST /orders HTTP/1.1\r\nHost: zmx\r\nContent-Length: 2\r\n\r\n{}"
    conn, transport = Connection(OneConnectionGateway()), Transport()  # type: ignore[arg-type]

    async def run() -> None:  # the answered connection sets a timer to cut it: it needs a running loop
        conn.connection_made(transport)  # type: ignore[arg-type]
        conn.data_received(request[:cut])
        assert not transport.written  # nothing to answer yet
        conn.data_received(request[cut:])

    asyncio.run(run())
    status = bytes(transport.written).split(b"\r\n", 1)[0]
    assert status == b"HTTP/1.1 405 Method Not Allowed", (cut, bytes(transport.written[:200]))
    assert b"\r\nAllow: GET, HEAD\r\n" in transport.written and conn.closing


def test_a_request_the_gateway_cannot_read_gets_400_and_one_after_an_answer_is_not_read(
        cluster: Cluster, clients: Clients) -> None:
    _, gateway = start(cluster)
    client = clients("before", url=gateway.url)
    client.subscribe("BTC-USDT")
    for name, data, reason in (
            ("a GET with a body", b"GET / HTTP/1.1\r\nHost: zmx\r\nContent-Length: 5\r\n\r\nabcde",
             b"unsupported request body"),
            ("a header line without a colon", b"GET / HTTP/1.1\r\nHost zmx\r\n\r\n", b"invalid HTTP header line"),
            ("a TLS hello (wss:// or https:// on this plain port)", bytes.fromhex("160301020001") + bytes(60) + b"\r\n",
             b"invalid HTTP request line"),
            # no line end: answered at once, not at the handshake timeout (10 s; ``ask`` gives up at 10 s)
            ("NUL bytes, no line", bytes(200), b"these bytes cannot start an HTTP request line"),
            ("a TLS hello without CR LF", bytes.fromhex("160301020001") + bytes(60),
             b"these bytes cannot start an HTTP request line"),
            ("text, then a NUL", b"GET / HTTP/1.1\x00", b"these bytes cannot start an HTTP request line")):
        status, headers, body = ask(gateway, data)
        assert status == 400 and headers["connection"] == "close", name
        assert body.startswith(b"Bad request: ") and reason in body and int(headers["content-length"]) == len(body), \
            (name, body)
    # Too many headers: websockets' own answer, and only it.
    status, _, body = ask(gateway, b"GET / HTTP/1.1\r\n" + b"X-Many: y\r\n" * 200 + b"\r\n")
    assert status == 431 and b"HTTP/1.1" not in body, body
    # Two requests in one write (pipelined): the first is answered and the connection closed.
    for first, second in (("/", "/x"), ("/x", "/")):
        status, _, body = ask(gateway, f"GET {first} HTTP/1.1\r\nHost: zmx\r\n\r\n"
                                       f"GET {second} HTTP/1.1\r\nHost: zmx\r\n\r\n".encode())
        assert (status, body) == (200, PAGE_FILE.read_bytes()) if first == "/" else status == 404
        assert b"HTTP/1.1" not in body  # no second answer
    # The gateway went on serving, and logged no error for any of it; none of it was a
    # WebSocket, so none counts as one it closed (the pipelined requests counted as a 1002).
    client.send({"action": "ping", "id": 1})
    client.expect({"type": "pong", "id": 1})
    g1 = next(p for p in cluster.procs if p.name == "g1")
    assert g1.stop() == 0
    log = g1.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-2000:]
    counts = re.findall(r"stopped; counts: (.*)", log)
    assert counts and "_closed" not in counts[0], counts


def book_script(page: bytes, directory: Path) -> Path:
    found = re.search(rb'<script id="zmx-book">(.*?)</script>', page, re.S)
    assert found, "the page has no zmx-book script"
    path = directory / "book.js"
    path.write_bytes(found.group(1))
    return path


def replay(script: Path, messages: list[dict[str, Any]]) -> Any:
    lines = "".join(json.dumps(m) + "\n" for m in messages)
    done = subprocess.run([NODE, "-e", REPLAY, "--", str(script)], input=lines, capture_output=True, text=True,
                          timeout=60, check=False)  # type: ignore[list-item]
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_browser_gets_the_page_and_websocket_clients_the_same_port(cluster: Cluster, clients: Clients) -> None:
    _, gateway = start(cluster)
    assert gateway.page_url == gateway.url.replace("ws://", "http://") + "/"
    client = clients("before", url=gateway.url)
    client.subscribe("BTC-USDT")

    status, headers, body = get(gateway, "/")
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["connection"] == "close"
    assert body == PAGE_FILE.read_bytes()
    assert get(gateway, "/?channel=x")[2] == body  # a query changes nothing
    # HEAD: the headers of a GET, and nothing after them (read off the socket: http.client
    # would not read a body after a HEAD even if there were one)
    status, headers, rest = ask(gateway, b"HEAD / HTTP/1.1\r\nHost: zmx\r\n\r\n")
    assert status == 200 and headers["content-length"] == str(len(body)), headers
    assert rest == b"", rest[:80]
    status, headers, body = get(gateway, "/favicon.ico")
    assert status == 404 and headers["content-type"].startswith("text/plain")
    assert b"The page is at /" in body

    # An upgrade to another protocol than WebSocket is a plain request (the page).
    status, _, body = ask(gateway, b"GET / HTTP/1.1\r\nHost: zmx\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
    assert status == 200 and body == PAGE_FILE.read_bytes()

    # The WebSocket clients, old and new, are served as before.
    after = clients("after", url=gateway.url)
    after.subscribe("ETH-USDT")
    client.send({"action": "ping", "id": 1})
    client.expect({"type": "pong", "id": 1})


@pytest.mark.skipif(NODE is None, reason="needs Node.js (node) to run the page's script")
def test_the_pages_book_code_keeps_the_matchers_book_and_catches_gaps_and_bad_checksums(
        cluster: Cluster, clients: Clients, context: zmq.Context, tmp_path: Path) -> None:
    topology, gateway = start(cluster)
    script = book_script(get(gateway, "/")[2], tmp_path)
    # the checksum's CRC32, as DESIGN.md defines it
    texts = ["", "30000:1.5:30001:2:29999.5:0.25", "a" * 1000]
    assert replay(script, [{"type": "crc32", "texts": texts}]) == [zlib.crc32(t.encode()) for t in texts]

    watcher = clients("watcher", url=gateway.url)
    watcher.subscribe(*topology.symbols)
    router = Client.from_topology(topology, context=context)
    try:
        rng = random.Random(20261127)
        mids = {"BTC-USDT": 3_000_000, "ETH-USDT": 200_000}  # in ticks of 0.01
        for n in range(600):
            symbol = rng.choice(list(mids))
            side = rng.choice(("buy", "sell"))
            ticks = mids[symbol] + rng.randint(-40, 5) * (1 if side == "buy" else -1)
            quantity = f"0.{rng.randint(1, 60):03d}"
            reply = router.submit(f"o{n}", f"acct{n % 7}", symbol, side, f"{ticks // 100}.{ticks % 100:02d}",
                                  quantity, timeout=15.0)
            assert reply.ok or reply.status == "unavailable", reply
    finally:
        router.close()

    books = {symbol: matcher_book(topology, symbol, context) for symbol in topology.symbols}
    for symbol, (seq, _, _) in books.items():
        watcher.wait_seq(symbol, seq, timeout=30.0)
    channel = [m for m in watcher.received if m.get("type") in ("depth_snapshot", "depth_update")]
    updates = sum(m["type"] == "depth_update" for m in channel)
    assert updates > 300, f"only {updates} depth updates: the flow hardly moved the books"

    result = replay(script, channel)
    assert result["results"] == {"ok": len(channel)}
    for symbol, (seq, bids, asks) in books.items():
        assert len(bids) > 25 and len(asks) > 25, (symbol, len(bids), len(asks))  # deeper than the checksum
        assert result["books"][symbol] == {"seq": seq, "bids": bids, "asks": asks}

    # An update missing from the stream: the channel's next one does not follow on.
    at = next(i for i, m in enumerate(channel) if m["type"] == "depth_update" and i > len(channel) // 2)
    after = next(m for m in channel[at + 1:] if m["channel"] == channel[at]["channel"])
    assert replay(script, channel[:at] + [after])["results"] == {"ok": at, "gap": 1}
    # An update whose checksum is not the book's after it.
    bad = json.loads(json.dumps(channel[at]))
    bad["data"]["checksum"] = (bad["data"]["checksum"] + 1) % 2**32
    assert replay(script, channel[:at] + [bad])["results"] == {"ok": at, "checksum": 1}


def node_eval(script: Path, function: str, args: list[Any]) -> Any:
    """``function(...args)`` of the page's script, run under Node."""
    code = (f"const {{ {function} }} = require(process.argv[1]);\n"
            f"console.log(JSON.stringify({function}(...JSON.parse(require('fs').readFileSync(0, 'utf8')))));")
    done = subprocess.run([NODE, "-e", code, "--", str(script)], input=json.dumps(args), capture_output=True,
                          text=True, timeout=60, check=False)  # type: ignore[list-item]
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(NODE is None, reason="needs Node.js (node) to run the page's script")
def test_the_pages_book_orders_prices_that_a_double_cannot_tell_apart(tmp_path: Path) -> None:
    # Prices of 20 digits (a symbol whose tick is small against its price): as doubles they
    # are all the same number, so a book sorted by Number() fails its checksums.
    script = book_script(PAGE_FILE.read_bytes(), tmp_path)
    base = "1234567890123456789"
    bids = [[f"{base}.3", "1"], [f"{base}.21", "2"], [f"{base}.2", "3"]]
    asks = [[f"{base}.4", "1"], [f"{base}.5", "2"]]
    after_bids = [bids[0], [f"{base}.29", "4"], bids[1]]  # one level added, the last one removed
    messages = [
        {"channel": "X", "type": "depth_snapshot", "data": {"seq": 5, "bids": bids, "asks": asks,
                                                            "checksum": checksum(bids, asks)}},
        {"channel": "X", "type": "depth_update",
         "data": {"seq": 6, "prev_seq": 5, "bids": [[f"{base}.2", "0"], [f"{base}.29", "4"]], "asks": [],
                  "checksum": checksum(after_bids, asks)}},
    ]
    result = replay(script, messages)
    assert result["results"] == {"ok": 2}, result
    assert result["books"]["X"] == {"seq": 6, "bids": after_bids, "asks": asks}
    # the spread the page shows: ask - bid, exactly
    for ask, bid, spread in ((f"{base}.4", f"{base}.3", "0.1"), (f"{base}.4", f"{base}.29", "0.11"),
                             ("30001", "30000.5", "0.5"), ("100", "99.99", "0.01"), ("0.3", "0.1", "0.2"),
                             ("7", "5", "2"), ("5", "5.25", "-0.25")):
        assert node_eval(script, "priceDifference", [ask, bid]) == spread, (ask, bid)


def order_code(script: Path, cases: list[tuple[dict[str, Any], str | None, str | None]]) -> list[Any]:
    done = subprocess.run([NODE, "-e", ORDER_CODE, "--", str(script)], input=json.dumps(cases), capture_output=True,
                          text=True, timeout=60, check=False)  # type: ignore[list-item]
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


@pytest.mark.skipif(NODE is None, reason="needs Node.js (node) to run the page's script")
def test_the_pages_order_code_amends_through_a_gateway_and_keeps_an_amended_order_live(
        cluster: Cluster, clients: Clients, tmp_path: Path) -> None:
    _, gateway = start(cluster)
    script = book_script(get(gateway, "/")[2], tmp_path)
    client = clients("page", url=gateway.url)
    client.send({"action": "submit_order", "order_id": "p1", "symbol": "BTC-USDT", "side": "buy",
                 "price": "29000", "quantity": "0.5"})
    order = client.expect({"type": "order_update", "data": {"order_id": "p1", "status": "accepted"}})["data"]

    # A new price typed in, the quantity left empty: only the price changes.
    [(live, request, _)] = order_code(script, [(order, " 29000.5 ", "")])
    assert live and request == {"action": "amend_order", "symbol": "BTC-USDT", "order_id": "p1", "price": "29000.5"}
    client.send(request)
    amended = client.expect({"type": "order_update", "data": {"order_id": "p1", "status": "amended"}})["data"]
    assert (amended["price"], amended["quantity"]) == ("29000.5", "0.5")
    order = {**order, **amended}  # as the page keeps it

    # Amended is still live (cancel and amend stay); the same texts, or none, change nothing.
    cases = [(order, amended["price"], "0.8"), (order, amended["price"], amended["quantity"]), (order, "", None)]
    (live, request, _), unchanged, empty = order_code(script, cases)
    assert live and request == {"action": "amend_order", "symbol": "BTC-USDT", "order_id": "p1", "quantity": "0.8"}
    assert unchanged == [True, None, False] and empty == [True, None, False]
    client.send(request)
    client.expect({"type": "order_update", "data": {"order_id": "p1", "status": "amended", "quantity": "0.8"}})

    client.send({"action": "cancel_order", "symbol": "BTC-USDT", "order_id": "p1"})
    canceled = client.expect({"type": "order_update", "data": {"order_id": "p1", "status": "canceled"}})["data"]
    ended = [{**order, **canceled}, {**order, "status": "filled"}, {**order, "status": "rejected"},
             {**order, "earlier": True}]
    assert [live or unknown for live, _, unknown in order_code(script, [(o, "1", "1") for o in ended])] == [False] * 4


@pytest.mark.skipif(NODE is None, reason="needs Node.js (node) to run the page's script")
def test_the_page_keeps_a_cancel_on_an_order_that_got_no_answer_until_the_cancel_settles_it(
        cluster: Cluster, clients: Clients, tmp_path: Path) -> None:
    """The only router hangs (SIGSTOP) with an order in it: after 5 s the client gets
    ``rejected`` ``unavailable`` with ``outcome_unknown``, and the page offers a cancel (not an
    amend). When the router goes on, the order may reach the book unseen, or not (the hung
    router's connections may have timed out meanwhile): both happened here. The cancel its
    button sends settles it either way: ``canceled``, or ``unknown_order``; then no button."""
    _, gateway = start(cluster)
    script = book_script(get(gateway, "/")[2], tmp_path)
    client = clients("page", url=gateway.url)
    client.send({"action": "submit_order", "order_id": "warm", "symbol": "BTC-USDT", "side": "buy",
                 "price": "28000", "quantity": "0.5"})
    client.expect({"type": "order_update", "data": {"order_id": "warm", "status": "accepted"}})
    router = next(p for p in cluster.procs if p.name == "r1").proc
    router.send_signal(signal.SIGSTOP)
    try:
        client.send({"action": "submit_order", "order_id": "p2", "symbol": "BTC-USDT", "side": "buy",
                     "price": "28000", "quantity": "0.5"})
        told = client.expect({"type": "order_update", "data": {"order_id": "p2"}}, timeout=15.0)["data"]
    finally:
        router.send_signal(signal.SIGCONT)
    assert (told["status"], told["reason"], told.get("outcome_unknown")) == ("rejected", "unavailable", True), told
    [(live, _, unknown)] = order_code(script, [(told, "1", "1")])
    assert (live, unknown) == (False, True)

    client.send({"action": "cancel_order", "order_id": "p2", "symbol": "BTC-USDT"})  # what its button sends
    # p2's own answer may come first, late and without an id: accepted (it reached the book)
    # or rejected (it never will); then the cancel's
    order = told
    answer = client.expect(lambda m: m.get("order_id", m.get("data", {}).get("order_id")) == "p2", timeout=15.0)
    while answer["type"] == "order_update" and answer["data"]["status"] in ("accepted", "rejected"):
        assert "id" not in answer and "outcome_unknown" not in answer["data"], answer
        order = node_eval(script, "afterUpdate", [order, answer["data"]])
        answer = client.expect(lambda m: m.get("order_id", m.get("data", {}).get("order_id")) == "p2", timeout=15.0)
    if answer["type"] == "error":  # it never reached the book
        assert answer["code"] == "unknown_order", answer
        settled = node_eval(script, "afterError", [order, answer])
        assert (settled["status"], settled["outcome_unknown"]) == ("rejected", False), settled
    else:  # it was there after all
        assert (answer["data"]["status"], answer["data"]["reason"], answer["data"]["filled"]) == (
            "canceled", "user", "0"), answer
        settled = node_eval(script, "afterUpdate", [order, answer["data"]])
    [(live, _, unknown)] = order_code(script, [(settled, "1", "1")])
    assert (live, unknown) == (False, False)
    unknown_order = {"type": "error", "code": "unknown_order", "order_id": "p2"}
    assert node_eval(script, "afterError", [told, unknown_order]) == {**told, "outcome_unknown": False}
    assert node_eval(script, "afterError", [told, {"code": "rate_limited"}]) == told  # other errors: as it was
    # a late answer settles it too: live after all, or never on the book
    late = {key: told[key] for key in ("order_id", "symbol", "side", "type", "time_in_force", "price", "quantity")}
    accepted = node_eval(script, "afterUpdate", [told, {**late, "status": "accepted", "filled": "0", "remaining": "1"}])
    refused = node_eval(script, "afterUpdate", [told, {**late, "status": "rejected", "reason": "unavailable"}])
    assert [(live, unknown) for live, _, unknown in order_code(script, [(accepted, "1", "1"), (refused, "1", "1")])] \
        == [(True, False), (False, False)]
