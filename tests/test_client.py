"""The Python client's own errors: what a caller gets for a mistake, without a cluster
(a DEALER connects lazily, so none of these needs a router)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from zmx import codec
from zmx.cli import builtin_topology_path
from zmx.commands import CancelOrder, SubmitOrder
from zmx.events import BookChanged, FeedHeartbeat, OrderAccepted, OrderFilled
from zmx.exceptions import InvalidNumber, InvalidOrder, ZmxError
from zmx.model import OrderType, Side, SymbolSpec, TimeInForce
from zmx.node.client import BAD_REPLY, Client, ClientClosed, _poll_ms, encode_header, parse_reply
from zmx.node.runtime import load_topology

FREE = "tcp://127.0.0.1:9"  # nothing is asked of it: no request in these tests is ever sent


@pytest.fixture
def client() -> Iterator[Client]:
    with Client.from_topology(load_topology(builtin_topology_path())) as c:
        yield c


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"side": "BUY"}, "side 'BUY' is not one of 'buy', 'sell'"),
    ({"type": "stop"}, "type 'stop' is not one of 'limit', 'market'"),
    ({"time_in_force": "day"}, "time_in_force 'day' is not one of 'gtc', 'ioc', 'fok', 'post_only'"),
    ({"symbol": "DOGE-USDT"}, "unknown symbol 'DOGE-USDT': the topology of this client has BTC-USDT"),
])
def test_an_order_field_the_cluster_does_not_take_is_an_invalid_order(client: Client, kwargs: dict[str, str],
                                                                      error: str) -> None:
    order = {"order_id": "o1", "account": "alice", "symbol": "BTC-USDT", "side": "buy", "price": "30000",
             "quantity": "0.5", **kwargs}
    with pytest.raises(InvalidOrder) as caught:
        client.submit_command(**order)
    assert str(caught.value).startswith(error)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, ZmxError)


def test_a_client_without_a_topology_asks_for_the_symbols_grid() -> None:
    with Client([FREE]) as c:
        with pytest.raises(InvalidOrder, match=r"no tick and lot size for 'BTC-USDT'.*spec=SymbolSpec"):
            c.submit_command("o1", "alice", "BTC-USDT", "buy", "30000", "0.5")
        spec = SymbolSpec("BTC-USDT", tick_size="0.01", lot_size="0.001")
        assert c.submit_command("o1", "alice", "BTC-USDT", "buy", "30000", "0.5", spec=spec).price == 3_000_000
        with pytest.raises(InvalidNumber):
            c.submit_command("o1", "alice", "BTC-USDT", "buy", "30000.001", "0.5", spec=spec)


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan")])
def test_a_request_needs_a_timeout_above_zero(client: Client, timeout: float) -> None:
    """Refused before anything is sent (with 0, the order was placed and the call raised
    RequestTimeout all the same)."""
    with pytest.raises(ValueError, match="timeout must be above 0 seconds"):
        client.request(CancelOrder("o1", "alice", "BTC-USDT"), timeout)
    with pytest.raises(ValueError, match="timeout must be above 0 seconds"):
        client.submit("o1", "alice", "BTC-USDT", "buy", "30000", "0.5", timeout=timeout)
    assert client.recv(0) is None  # a poll of what is already here is still fine


@pytest.mark.parametrize("bad", ["", "x" * 65, "ordré", "a\tb", 5, None, b"o1"])
@pytest.mark.parametrize("field", ["order_id", "account"])
def test_an_id_that_is_not_one_is_refused_before_anything_is_sent(client: Client, field: str, bad: object) -> None:
    """A review's 2 MB order_id made the router cut the client's connection, and the replies of
    the orders pipelined on it were lost; a bad id of another kind took a round trip for a
    bad_request."""
    ids = {"order_id": "o1", "account": "alice", field: bad}
    with pytest.raises(InvalidOrder, match=f"{field} must be 1 to 64 printable ASCII characters"):
        client.submit(ids["order_id"], ids["account"], "BTC-USDT", "buy", "30000", "0.5")  # type: ignore[arg-type]
    with pytest.raises(InvalidOrder, match=f"{field} must be 1 to 64"):
        client.cancel(ids["order_id"], ids["account"], "BTC-USDT")  # type: ignore[arg-type]
    with pytest.raises(InvalidOrder, match=f"{field} must be 1 to 64"):
        client.amend(ids["order_id"], ids["account"], "BTC-USDT", price="30000")  # type: ignore[arg-type]


@pytest.mark.parametrize("symbol", ["DOGE-USDT", "BTC-USDTÉ", None, 7])
def test_a_cancel_or_amend_of_a_symbol_the_client_does_not_know_is_an_invalid_order(client: Client,
                                                                                     symbol: object) -> None:
    """As a submit's: it raised UnicodeEncodeError, AttributeError, or went out for a refusal."""
    with pytest.raises(InvalidOrder, match="unknown symbol"):
        client.cancel("o1", "alice", symbol)  # type: ignore[arg-type]
    with pytest.raises(InvalidOrder, match="unknown symbol"):
        client.amend("o1", "alice", symbol, quantity="1")  # type: ignore[arg-type]


def test_a_spec_of_another_symbol_is_refused(client: Client) -> None:
    """A review's ETH-USDT order with BTC-USDT's spec became ten times the quantity asked. A
    spec of its own still lets an order name a symbol the client's topology does not have."""
    btc = client.symbols["BTC-USDT"]
    with pytest.raises(InvalidOrder, match="spec is the one of 'BTC-USDT', not of 'ETH-USDT'"):
        client.submit_command("o1", "alice", "ETH-USDT", "buy", "1", "0.00001", spec=btc)
    zzz = SymbolSpec("ZZZ-USDT", tick_size="0.01", lot_size="0.001")
    assert client.submit_command("o1", "alice", "ZZZ-USDT", "buy", "1", "0.5", spec=zzz).quantity == 500


def test_a_command_over_what_a_router_takes_is_refused_before_it_is_sent(client: Client) -> None:
    huge = SubmitOrder("o" * (codec.MAX_MESSAGE_BYTES + 1), "alice", "BTC-USDT", Side.BUY, OrderType.LIMIT,
                       TimeInForce.GTC, 100, 1)
    with pytest.raises(InvalidOrder, match="bytes is over the 1,048,576 a router takes"):
        client.send(huge)
    with pytest.raises(InvalidOrder, match="a symbol is ASCII text"):
        client.send(CancelOrder("o1", "alice", "BTC-USDTÉ"))


def test_a_timeout_of_any_length_is_one_wait() -> None:
    """``timeout=float("inf")`` raised OverflowError after the order had gone out."""
    assert [_poll_ms(s) for s in (float("inf"), 3e6, 1.5, 0.0004)] == [2**31 - 1, 2**31 - 1, 1500, 1]


def test_a_client_used_in_a_forked_child_says_so(client: Client) -> None:
    """The child's copy of the socket never answers: it spun at 100% CPU past every timeout."""
    pid = os.fork()
    if pid == 0:  # the child: only the check, then out, whatever happens (SIGALRM: a client that spins)
        status = 1
        try:
            signal.alarm(5)
            client.send(CancelOrder("o1", "alice", "BTC-USDT"), timeout=0.1)
        except ZmxError as e:
            status = 0 if "a process forked from it makes a client of its own" in str(e) else 2
        finally:
            os._exit(status)
    assert os.waitpid(pid, 0)[1] == 0
    assert client.recv(0) is None  # still the parent's


def test_a_single_endpoint_given_as_a_string_is_refused_with_the_cure() -> None:
    with pytest.raises(ZmxError, match=r"Client\(\['tcp://127.0.0.1:9'\]\)"):
        Client(FREE)  # type: ignore[arg-type]


def test_a_closed_client_says_so(client: Client) -> None:
    client.close()
    with pytest.raises(ClientClosed, match="this client is closed"):
        client.cancel("o1", "alice", "BTC-USDT")
    with pytest.raises(ClientClosed):
        client.recv(0.01)


@pytest.mark.parametrize("endpoint", ["bogus", "tcp://127.0.0.1", "http://127.0.0.1:5550", "tcp://127.0.0.1:85276"])
def test_a_front_endpoint_that_is_not_one_is_refused_when_the_client_is_made(endpoint: str) -> None:
    # (ZeroMQ takes port 85276 modulo 65536: 19740, another node's port)
    with pytest.raises(ZmxError, match=f"cannot connect to the router front '{endpoint}'"):
        Client([endpoint])


@pytest.mark.parametrize("endpoint", [b"tcp://127.0.0.1:5550", None])
def test_a_front_endpoint_that_is_no_str_is_refused_as_one_that_is_not_an_endpoint(endpoint: object) -> None:
    with pytest.raises(ZmxError, match="a router front endpoint is a str"):
        Client([endpoint])  # type: ignore[list-item]


# -- a router's reply, as the client and the gateway read it ---------------------------------------------

ACCEPTED = OrderAccepted("BTC-USDT", 4, 9, "o1", "alice", Side.BUY, OrderType.LIMIT, TimeInForce.GTC, 100, 5)


def ok_reply(*messages: object, symbol: str = "BTC-USDT") -> list[bytes]:
    return [encode_header(7, symbol), b"ok", codec.encode_batch(messages)]  # type: ignore[arg-type]


def test_an_ok_reply_holding_the_events_of_its_symbol_is_read() -> None:
    reply = parse_reply(ok_reply(ACCEPTED, BookChanged("BTC-USDT", 4, 9, ((100, 5),), ())))
    assert reply is not None and (reply.request_id, reply.status) == (7, "ok")
    assert reply.events == (ACCEPTED, BookChanged("BTC-USDT", 4, 9, ((100, 5),), ()))


def test_an_ok_reply_over_1_mib_is_read() -> None:
    """A market order that sweeps thousands of resting orders gets a reply of megabytes (a fill
    for each): read whole, up to the 16 MiB the routers take from a matcher. The first client
    took the codec's 1 MiB limit for it, and told an executed order's client it was refused."""
    fills = [OrderFilled("BTC-USDT", 4, 9, f"maker{n}", "bob", Side.SELL, n + 1, 100, 1, 1, 0, True)
             for n in range(40_000)]
    frames = ok_reply(ACCEPTED, *fills, BookChanged("BTC-USDT", 4, 9, (), ((100, 0),)))
    assert len(frames[2]) > 1 << 20
    reply = parse_reply(frames)
    assert reply is not None and reply.status == "ok" and len(reply.events) == 40_002, reply and reply.message


@pytest.mark.parametrize(("frames", "problem"), [
    (ok_reply(), "ok reply with no event"),
    (ok_reply(SubmitOrder("o1", "alice", "BTC-USDT", Side.BUY, OrderType.LIMIT, TimeInForce.GTC, 100, 5)),
     "ok reply holding a SubmitOrder, which no command makes"),
    (ok_reply(ACCEPTED, FeedHeartbeat("BTC-USDT", 4, 9)), "ok reply holding a FeedHeartbeat"),
    (ok_reply(ACCEPTED, symbol="ETH-USDT"), "ok reply with an event of 'BTC-USDT' to a request of 'ETH-USDT'"),
    ([encode_header(7, "BTC-USDT"), b"ok", b"\x01\xc1"], "ok reply with an undecodable payload"),
])
def test_an_ok_reply_that_no_command_makes_is_a_bad_reply(frames: list[bytes], problem: str) -> None:
    """A matcher's reply is what its command made; anything else is not passed on as the
    order's outcome (the gateway tells its client the outcome is unknown)."""
    reply = parse_reply(frames)
    assert reply is not None and (reply.request_id, reply.status, reply.events) == (7, BAD_REPLY, ())
    assert problem in reply.message, reply.message


def test_a_refusal_keeps_1000_bytes_of_its_text_and_an_empty_status_is_a_bad_reply() -> None:
    """A peer may send megabytes of text with a refusal: a line of it is kept (a gateway passed
    5 MB of it on to its client in one order_update)."""
    reply = parse_reply([encode_header(7, "BTC-USDT"), b"unavailable", b"x" * 5_000_000])
    assert reply is not None and (reply.status, reply.message) == ("unavailable", "x" * 1000)
    reply = parse_reply([encode_header(7, "BTC-USDT"), b"", b"why"])
    assert reply is not None and (reply.status, reply.message) == (BAD_REPLY, "an empty status")
