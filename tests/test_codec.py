"""The msgpack wire format: exact round trips, and DecodeError for anything malformed."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zmx import codec
from zmx.codec import (
    MAX_ID_LENGTH,
    MAX_MESSAGE_BYTES,
    VERSION,
    decode,
    decode_batch,
    decode_counted_publication,
    decode_publication,
    encode,
    encode_account_publication,
    encode_batch,
    encode_publication,
    is_valid_id,
    join_account_publication,
    join_batch,
    join_publication,
    pack_records,
)
from zmx.commands import COMMAND_TYPES, AmendOrder, CancelOrder, SubmitOrder
from zmx.events import (
    EVENT_TYPES,
    PUBLIC_EVENT_TYPES,
    AmendRejected,
    BookChanged,
    CancelRejected,
    FeedHeartbeat,
    OrderAccepted,
    OrderAmended,
    OrderCanceled,
    OrderFilled,
    OrderRejected,
    TradeOccurred,
)
from zmx.exceptions import DecodeError
from zmx.model import OrderType, Side, TimeInForce
from zmx.topics import account_topic, topic

MAX_INT = 2**63 - 1
ALL_TYPES = COMMAND_TYPES + EVENT_TYPES
PRIVATE_EVENT_TYPES = tuple(t for t in EVENT_TYPES if t not in PUBLIC_EVENT_TYPES)

# -- strategies for valid records, built from the classes' annotations -----------------------

ids = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=MAX_ID_LENGTH)
symbol_parts = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=15)
symbols = st.builds("{}-{}".format, symbol_parts, symbol_parts)
naturals = st.integers(0, MAX_INT)
levels = st.lists(st.tuples(naturals, naturals), max_size=6).map(tuple)

FIELD_STRATEGIES = {
    "str": ids,
    "int": naturals,
    "int | None": st.none() | naturals,
    "bool": st.booleans(),
    "Side": st.sampled_from(Side),
    "OrderType": st.sampled_from(OrderType),
    "TimeInForce": st.sampled_from(TimeInForce),
    "tuple[Level, ...]": levels,
}


def annotations(cls: type) -> dict[str, str]:
    """A record's field annotations as written (NamedTuple wraps them in ForwardRef)."""
    return {name: getattr(a, "__forward_arg__", a) for name, a in cls.__annotations__.items()}


def records_of(cls: type, **fixed: st.SearchStrategy) -> st.SearchStrategy:
    fields = {name: FIELD_STRATEGIES[annotation] for name, annotation in annotations(cls).items()}
    fields.update(fixed)
    return st.builds(cls, **fields)


messages = st.one_of([records_of(cls) for cls in ALL_TYPES])


any_public_event = st.one_of([records_of(cls) for cls in PUBLIC_EVENT_TYPES])
any_private_event = st.one_of([records_of(cls) for cls in PRIVATE_EVENT_TYPES])


def public_events(symbol: str) -> st.SearchStrategy:
    return any_public_event.map(lambda event: event._replace(symbol=symbol))


def private_events(account: str) -> st.SearchStrategy:
    return any_private_event.map(lambda event: event._replace(account=account))


def assert_identical(got: object, want: object) -> None:
    """Equal, and equal all the way down in types: enum members, tuples, bools, None."""
    assert got == want
    assert type(got) is type(want)
    for g, w in zip(got, want, strict=True):  # type: ignore[call-overload]
        assert type(g) is type(w)
        if isinstance(w, Enum):
            assert g is w
        if isinstance(w, tuple):
            assert [type(level) for level in g] == [tuple] * len(w)
            assert [tuple(map(type, level)) for level in g] == [(int, int)] * len(w)


def assert_valid_message(message: object) -> None:
    """What a decoder may return: a record of a known type that round-trips exactly."""
    assert type(message) in ALL_TYPES
    assert_identical(decode(encode(message)), message)


def body(*items: object) -> bytes:
    """A version byte and any msgpack value: for hand-made malformed messages."""
    return bytes((VERSION,)) + msgpack.packb(items[0] if len(items) == 1 else list(items))


def decode_error(data: object, **kwargs: object) -> str:
    with pytest.raises(DecodeError) as info:
        decode(data, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


FILLED = OrderFilled("BTC-USDT", 7, 1764218885123456789, "abc123", "alice", Side.BUY, 981,
                     3000000, 50, 20, 30, True)
BOOK = BookChanged("BTC-USDT", 7, 1764218885123456789, ((3000000, 10), (2999999, 0)), ((3000100, 4),))
TRADE = TradeOccurred("BTC-USDT", 7, 1764218885123456789, 981, 3000000, 50, Side.SELL)
SUBMIT = SubmitOrder("abc123", "alice", "BTC-USDT", Side.BUY, OrderType.LIMIT, TimeInForce.GTC, 3000000, 50)


def wire(message: object) -> list:
    """A record as the list that goes on the wire: [code, *fields]."""
    return [codec.TYPE_CODES[type(message)], *message]  # type: ignore[misc]


# -- the table ---------------------------------------------------------------------------------


def test_type_codes_are_the_documented_ones() -> None:
    # The codes are part of the wire format: this list changes only by adding lines.
    assert codec.TYPE_CODES == {
        SubmitOrder: 1, CancelOrder: 2, AmendOrder: 3,
        OrderAccepted: 16, OrderRejected: 17, OrderFilled: 18, OrderCanceled: 19, OrderAmended: 20,
        CancelRejected: 21, AmendRejected: 22, TradeOccurred: 32, BookChanged: 33,
        FeedHeartbeat: 34,
    }
    for cls, code in codec.TYPE_CODES.items():
        assert f"{code:<4}  {cls.__name__}" in codec.__doc__


KIND_OF_ANNOTATION = {
    "str": codec.ID, "int": codec.INT, "int | None": codec.OPT_INT, "bool": codec.BOOL,
    "Side": codec.SIDE, "OrderType": codec.ORDER_TYPE, "TimeInForce": codec.TIME_IN_FORCE,
    "tuple[Level, ...]": codec.LEVELS,
}


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda cls: cls.__name__)
def test_schema_follows_the_record(cls: type) -> None:
    spec = codec._SPECS[codec.TYPE_CODES[cls]]
    assert spec.kinds == tuple(KIND_OF_ANNOTATION[a] for a in annotations(cls).values())


# -- round trips -------------------------------------------------------------------------------


@settings(max_examples=600, deadline=None)
@given(messages)
def test_round_trip(message: object) -> None:
    data = encode(message)  # type: ignore[arg-type]
    assert data[0] == VERSION
    assert_identical(decode(data), message)
    assert_identical(decode(bytearray(data)), message)
    assert_identical(decode(memoryview(data)), message)


@pytest.mark.parametrize("side", list(Side))
@pytest.mark.parametrize("order_type", list(OrderType))
@pytest.mark.parametrize("time_in_force", list(TimeInForce))
def test_every_enum_value(side: Side, order_type: OrderType, time_in_force: TimeInForce) -> None:
    price = None if order_type is OrderType.MARKET else 5
    for message in (
        SubmitOrder("o", "a", "BTC-USDT", side, order_type, time_in_force, price, 1),
        OrderAccepted("BTC-USDT", 1, 2, "o", "a", side, order_type, time_in_force, price, 1),
        TradeOccurred("BTC-USDT", 1, 2, 3, 4, 5, side),
    ):
        assert_identical(decode(encode(message)), message)


@pytest.mark.parametrize("message", [
    SubmitOrder("o", "a", "BTC-USDT", Side.SELL, OrderType.MARKET, TimeInForce.IOC, None, 1),
    AmendOrder("o", "a", "BTC-USDT", None, None),
    AmendOrder("o", "a", "BTC-USDT", 5, None),
    AmendOrder("o", "a", "BTC-USDT", None, 5),
    OrderAccepted("BTC-USDT", 0, 0, "o", "a", Side.BUY, OrderType.MARKET, TimeInForce.FOK, None, 1),
    OrderCanceled("BTC-USDT", 0, 0, "o", "a", Side.BUY, None, 0, 1, "no_liquidity"),
], ids=lambda m: type(m).__name__)
def test_none_where_allowed(message: object) -> None:
    assert_identical(decode(encode(message)), message)  # type: ignore[arg-type]


def test_extremes() -> None:
    for message in (
        BookChanged("B", 0, 0, (), ()),
        BookChanged("B", MAX_INT, MAX_INT, ((MAX_INT, MAX_INT),), ((0, 0),)),
        CancelOrder("x" * MAX_ID_LENGTH, "~", " !"),
        OrderFilled("S", 0, 0, "o", "a", Side.SELL, 0, 0, 0, 0, 0, False),
    ):
        assert_identical(decode(encode(message)), message)


@settings(max_examples=150, deadline=None)
@given(st.lists(messages, max_size=8))
def test_batch_round_trip(batch: list) -> None:
    decoded = decode_batch(encode_batch(batch))
    assert type(decoded) is tuple
    assert len(decoded) == len(batch)
    for got, want in zip(decoded, batch, strict=True):
        assert_identical(got, want)
    # any iterable will do
    assert decode_batch(encode_batch(iter(batch))) == tuple(batch)


@settings(max_examples=150, deadline=None)
@given(st.data(), symbols)
def test_publication_round_trip(data: st.DataObject, symbol: str) -> None:
    events = data.draw(st.lists(public_events(symbol), max_size=6))
    frame = encode_publication(symbol, events)
    assert frame.startswith(topic(symbol))
    name, decoded = decode_publication(frame)
    assert name == symbol
    assert type(decoded) is tuple
    assert len(decoded) == len(events)
    for got, want in zip(decoded, events, strict=True):
        assert_identical(got, want)
    assert decode_publication(memoryview(frame)) == (name, decoded)
    assert decode_publication(bytearray(frame)) == (name, decoded)


@settings(max_examples=150, deadline=None)
@given(st.data(), ids)
def test_account_publication_round_trip(data: st.DataObject, account: str) -> None:
    events = data.draw(st.lists(private_events(account), max_size=6))
    frame = encode_account_publication(account, events)
    assert frame.startswith(account_topic(account))
    name, decoded = decode_publication(frame)
    assert name == "@" + account
    for got, want in zip(decoded, events, strict=True):
        assert_identical(got, want)


@settings(max_examples=100, deadline=None)
@given(st.data(), ids, st.integers(0, 2**63 - 1), st.integers(1, 2**63 - 1), st.integers(1, 2**63 - 1),
       st.sampled_from([0, 1, 6, 15, 16, 17]))
def test_a_counted_account_publication_round_trip(data: st.DataObject, account: str, epoch: int, start: int, n: int,
                                                  size: int) -> None:
    events = data.draw(st.lists(private_events(account), min_size=size, max_size=size))
    frame = encode_account_publication(account, events, (epoch, start, n))
    assert frame == join_account_publication(account, pack_records(events), (epoch, start, n))
    assert frame == account_topic(account) + b"\x01" + msgpack.packb(
        [epoch, start, n, [[codec.TYPE_CODES[type(e)], *e] for e in events]])
    name, decoded, counted = decode_counted_publication(frame)
    assert (name, counted) == ("@" + account, (epoch, start, n))
    assert len(decoded) == size
    for got, want in zip(decoded, events, strict=True):
        assert_identical(got, want)
    assert decode_publication(frame) == (name, decoded)  # (the count left out)
    assert decode_counted_publication(encode_account_publication(account, events))[2] is None


@pytest.mark.parametrize("counted, expected", [
    ((-1, 1, 1), "got integer -1, integer 1, integer 1"),
    ((1, 0, 1), "got integer 1, integer 0, integer 1"),
    ((1, 1, 0), "got integer 1, integer 1, integer 0"),
    ((1, 1, "2"), "got integer 1, integer 1, string '2'"),
    ((2**63, 1, 1), "got integer 9223372036854775808, integer 1, integer 1"),
])
def test_a_counted_account_publication_with_a_bad_count_is_refused(counted: tuple, expected: str) -> None:
    frame = b"@alice\x00\x01" + msgpack.packb([*counted, [[codec.TYPE_CODES[type(FILLED)], *FILLED]]])
    with pytest.raises(DecodeError, match=re.escape("a counted account frame starts with an epoch, a count and a "
                                                    "number, the last two from 1, " + expected)):
        decode_counted_publication(frame)


def test_only_an_account_publication_is_counted() -> None:
    frame = b"BTC-USDT\x00\x01" + msgpack.packb([1, 2, 3, [[codec.TYPE_CODES[type(TRADE)], *TRADE]]])
    with pytest.raises(DecodeError, match="a batch is an array of messages|message 0"):
        decode_counted_publication(frame)


@settings(max_examples=100, deadline=None)
@given(st.data(), symbols, ids)
def test_events_packed_once_join_into_the_same_frames(data: st.DataObject, symbol: str, account: str) -> None:
    public = data.draw(st.lists(public_events(symbol), max_size=20))
    private = data.draw(st.lists(private_events(account), max_size=20))
    assert join_publication(symbol, pack_records(public)) == encode_publication(symbol, public)
    assert join_account_publication(account, pack_records(private)) == encode_account_publication(account, private)
    assert join_batch(pack_records(public + private)) == encode_batch(public + private)


def test_joined_batches_past_the_short_array_headers() -> None:
    for n in (15, 16, 65535, 65536):
        batch = [TRADE] * n
        assert join_batch(pack_records(batch)) == encode_batch(batch)
    with pytest.raises(TypeError, match="not a zmx command or event"):
        pack_records([TRADE, "nope"])  # type: ignore[list-item]


def test_publication_is_topic_plus_batch() -> None:
    frame = encode_publication("BTC-USDT", [TRADE, BOOK])
    assert frame == b"BTC-USDT\x00" + encode_batch([TRADE, BOOK])
    assert encode_account_publication("alice", [FILLED]) == b"@alice\x00" + encode_batch([FILLED])


def test_layout_is_version_byte_and_flat_array() -> None:
    data = encode(TRADE)
    assert data == b"\x01" + msgpack.packb([32, "BTC-USDT", 7, 1764218885123456789, 981, 3000000, 50, "sell"])
    assert encode(BOOK) == b"\x01" + msgpack.packb(
        [33, "BTC-USDT", 7, 1764218885123456789, [[3000000, 10], [2999999, 0]], [[3000100, 4]]])
    assert encode_batch([TRADE]) == b"\x01" + msgpack.packb([[32, "BTC-USDT", 7, 1764218885123456789,
                                                               981, 3000000, 50, "sell"]])


def test_encode_refuses_what_is_not_a_message() -> None:
    with pytest.raises(TypeError, match="not a zmx command or event: tuple"):
        encode(("BTC-USDT", 1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a zmx command or event: dict"):
        encode_batch([TRADE, {}])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        encode_publication("BTC\x00USDT", [TRADE])


# -- malformed input: specific cases -------------------------------------------------------------


def test_empty() -> None:
    assert "empty" in decode_error(b"")
    with pytest.raises(DecodeError, match="empty"):
        decode_batch(b"")


@pytest.mark.parametrize("version", [0, 2, 0x91, 255])
def test_unknown_version(version: int) -> None:
    message = decode_error(bytes((version,)) + encode(TRADE)[1:])
    assert f"version {version}" in message
    assert f"supports version {VERSION}" in message


def test_version_only() -> None:
    assert "malformed msgpack" in decode_error(b"\x01")


@pytest.mark.parametrize("garbage", [b"\xc1", b"\x01\xc1", b"\xd4", b"\x93\x01", b"\xa5ab"])
def test_msgpack_garbage(garbage: bytes) -> None:
    assert "malformed msgpack" in decode_error(b"\x01" + garbage)


def test_truncated() -> None:
    data = encode(FILLED)
    for end in range(1, len(data)):
        with pytest.raises(DecodeError):
            decode(data[:end])


def test_trailing_bytes() -> None:
    assert "3 trailing byte(s)" in decode_error(encode(FILLED) + b"\x00\x00\x00")
    assert "trailing" in decode_error(encode(TRADE) + encode(TRADE))


@pytest.mark.parametrize("value, shown", [
    (5, "integer 5"), ("x", "string 'x'"), ({}, "map {}"), (None, "nil"), ([], "an empty array"),
    (1.5, "float 1.5"), (b"", "bin b''"),
])
def test_not_an_array(value: object, shown: str) -> None:
    message = decode_error(body(value))
    assert "a message is an array" in message
    assert shown in message


def test_unknown_type_code() -> None:
    assert "unknown message type code 99" in decode_error(body(99, "BTC-USDT"))
    assert "unknown message type code 0" in decode_error(body([0]))
    assert "unknown message type code -1" in decode_error(body([-1]))
    assert "unknown message type code" in decode_error(body([2**64 - 1]))


@pytest.mark.parametrize("code", [True, False, "32", 32.0, None, [32]])
def test_type_code_must_be_an_integer(code: object) -> None:
    # True == 1 in Python: a bool must not pass for the code of SubmitOrder.
    assert "type code is an integer" in decode_error(body([code, "o", "a", "BTC-USDT"]))


def test_wrong_field_count() -> None:
    assert "CancelOrder has 3 fields, got 2" in decode_error(body(2, "o", "a"))
    assert "CancelOrder has 3 fields, got 4" in decode_error(body(2, "o", "a", "S", "x"))
    assert "TradeOccurred has 7 fields, got 0" in decode_error(body([32]))
    assert "OrderFilled has 12 fields, got 13" in decode_error(body(*wire(FILLED), 1))


def bad_fill(**fields: object) -> bytes:
    return body(wire(FILLED._replace(**fields)))


@pytest.mark.parametrize("fields, expected", [
    ({"seq": -1}, "OrderFilled.seq must be in [0, 2**63 - 1], got -1"),
    ({"ts_ns": 2**63}, "OrderFilled.ts_ns must be in [0, 2**63 - 1], got 9223372036854775808"),
    ({"price": 2**64 - 1}, "OrderFilled.price must be in [0, 2**63 - 1]"),
    ({"quantity": -(2**63)}, "OrderFilled.quantity must be in [0, 2**63 - 1]"),
    ({"seq": True}, "OrderFilled.seq must be an integer, got boolean True"),
    ({"seq": 1.0}, "OrderFilled.seq must be an integer, got float 1.0"),
    ({"seq": "1"}, "OrderFilled.seq must be an integer, got string '1'"),
    ({"price": None}, "OrderFilled.price must be an integer, got nil"),
    ({"maker": 1}, "OrderFilled.maker must be a boolean, got integer 1"),
    ({"maker": None}, "OrderFilled.maker must be a boolean, got nil"),
    ({"side": "bux"}, "OrderFilled.side must be one of 'buy', 'sell', got 'bux'"),
    ({"side": "BUY"}, "OrderFilled.side must be one of 'buy', 'sell'"),
    ({"side": 0}, "OrderFilled.side must be a string, one of 'buy', 'sell'; got integer 0"),
    ({"symbol": 5}, "OrderFilled.symbol must be a string, got integer 5"),
    ({"symbol": ""}, "OrderFilled.symbol must not be empty"),
    ({"order_id": "x" * 65}, "OrderFilled.order_id is 65 characters long, at most 64 allowed"),
    ({"order_id": "x" * 300}, "a string of 300 bytes: no field takes more than 64 characters"),  # past msgpack's bound
    ({"account": "zoë"}, "OrderFilled.account must be printable ASCII, got 'zoë'"),
    ({"account": "a\x00b"}, "OrderFilled.account must be printable ASCII"),
    ({"account": "a\nb"}, "OrderFilled.account must be printable ASCII"),
    ({"symbol": b""}, "OrderFilled.symbol must be a string, got bin b''"),
    ({"account": {}}, "OrderFilled.account must be a string, got map {}"),
])
def test_wrong_field(fields: dict, expected: str) -> None:
    assert expected in decode_error(bad_fill(**fields))


@pytest.mark.parametrize("message, expected", [
    (SubmitOrder("o", "a", "S", Side.BUY, OrderType.LIMIT, TimeInForce.GTC, 1, None),
     "SubmitOrder.quantity must be an integer, got nil"),
    (SubmitOrder("o", "a", "S", Side.BUY, "stop", TimeInForce.GTC, 1, 1),
     "SubmitOrder.type must be one of 'limit', 'market', got 'stop'"),
    (SubmitOrder("o", "a", "S", Side.BUY, OrderType.LIMIT, "day", 1, 1),
     "SubmitOrder.time_in_force must be one of 'gtc', 'ioc', 'fok', 'post_only', got 'day'"),
    (SubmitOrder("o", "a", "S", Side.BUY, OrderType.LIMIT, TimeInForce.GTC, -5, 1),
     "SubmitOrder.price must be in [0, 2**63 - 1], got -5"),
    (SubmitOrder("o", "a", "S", Side.BUY, OrderType.LIMIT, TimeInForce.GTC, False, 1),
     "SubmitOrder.price must be an integer or nil, got boolean False"),
    (AmendOrder("o", "a", "S", 1, "2"), "AmendOrder.quantity must be an integer or nil, got string '2'"),
    (OrderAmended("S", 1, 2, "o", "a", Side.BUY, None, 1, 1), "OrderAmended.price must be an integer, got nil"),
    (TradeOccurred("S", 1, 2, 3, 4, 5, None), "TradeOccurred.taker_side must be a string"),
    (OrderRejected("S", 1, 2, "o", "a", ""), "OrderRejected.reason must not be empty"),
    (OrderCanceled("S", 1, 2, "o", "a", Side.BUY, None, 0, 1, None), "OrderCanceled.reason must be a string"),
], ids=lambda x: x if isinstance(x, str) else type(x).__name__)
def test_wrong_field_of_other_types(message: object, expected: str) -> None:
    assert expected in decode_error(body(wire(message)))


@pytest.mark.parametrize("bids, expected", [
    (5, "BookChanged.bids must be an array of [price, lots] pairs, got integer 5"),
    (None, "BookChanged.bids must be an array of [price, lots] pairs, got nil"),
    ([[1, 2], [3]], "BookChanged.bids level 1 must be a [price, lots] pair, got array (3,)"),
    ([[1, 2, 3]], "BookChanged.bids level 0 must be a [price, lots] pair"),
    ([[]], "BookChanged.bids level 0 must be a [price, lots] pair, got an empty array"),
    ([7], "BookChanged.bids level 0 must be a [price, lots] pair, got integer 7"),
    ([[1, -2]], "BookChanged.bids level 0 lots must be in [0, 2**63 - 1], got -2"),
    ([[1, "2"]], "BookChanged.bids level 0 lots must be an integer, got string '2'"),
    ([[True, 2]], "BookChanged.bids level 0 price must be an integer, got boolean True"),
    ([[1.0, 2]], "BookChanged.bids level 0 price must be an integer, got float 1.0"),
    ([[2**63, 2]], "BookChanged.bids level 0 price must be in [0, 2**63 - 1]"),
    ([[1, None]], "BookChanged.bids level 0 lots must be an integer, got nil"),
])
def test_wrong_levels(bids: object, expected: str) -> None:
    assert expected in decode_error(body(33, "BTC-USDT", 1, 2, bids, []))
    asks_message = decode_error(body(33, "BTC-USDT", 1, 2, [], bids))
    assert expected.replace("bids", "asks") in asks_message


def test_no_map_bin_ext_or_timestamp_anywhere() -> None:
    stamp = msgpack.packb(msgpack.Timestamp(1_700_000_000, 5))
    for value in (msgpack.packb({"a": 1}), msgpack.packb(b"x"), msgpack.packb(msgpack.ExtType(5, b"xy")), stamp):
        # as the whole message and as a field
        assert "malformed msgpack" in decode_error(b"\x01" + value)
        assert "malformed msgpack" in decode_error(b"\x01\x92\x02" + value)


def test_oversized() -> None:
    big = BookChanged("BTC-USDT", 1, 2, tuple((2**40 + i, 1) for i in range(100_000)), ())
    data = encode(big)
    assert len(data) > MAX_MESSAGE_BYTES
    message = decode_error(data)
    assert f"{len(data)} bytes, above the limit of {MAX_MESSAGE_BYTES}" in message
    assert decode(data, max_bytes=len(data)) == big
    small = encode(TRADE)
    assert decode(small, max_bytes=len(small)) == TRADE
    assert "above the limit" in decode_error(small, max_bytes=len(small) - 1)
    with pytest.raises(DecodeError, match="above the limit"):
        decode_batch(encode_batch([TRADE]), max_bytes=5)
    with pytest.raises(DecodeError, match="above the limit"):
        decode_publication(encode_publication("BTC-USDT", [TRADE]), max_bytes=20)


def test_huge_claimed_lengths() -> None:
    # Headers that claim 4 billion elements or bytes in a tiny message.
    for header in (b"\xdd\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff"):
        assert "malformed msgpack" in decode_error(b"\x01" + header + b"\x00")


def test_deeply_nested() -> None:
    assert "nested too deeply" in decode_error(b"\x01" + b"\x91" * 100_000 + b"\x00")
    # Nested within the limits of msgpack, deeper than Python's recursion limit: still a
    # short, clear DecodeError (no RecursionError while describing it).
    for depth in (10, 500, 1000):
        deep = b"\x91" * depth + b"\x00"
        message = decode_error(b"\x01\x96\x21\xa1S\x01\x02" + deep + b"\x90")
        assert "BookChanged.bids" in message
        assert len(message) < 300


def test_long_string_is_refused_before_decoding() -> None:
    message = decode_error(b"\x01" + msgpack.packb([2, "o" * 100_000, "a", "S"]))
    assert message == "a string of 100000 bytes: no field takes more than 64 characters"


def test_decode_needs_bytes() -> None:
    with pytest.raises(TypeError):
        decode("\x01\x90")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        decode(None)  # type: ignore[arg-type]


def test_batch_errors_name_the_message() -> None:
    with pytest.raises(DecodeError, match=r"message 1: CancelOrder has 3 fields, got 1"):
        decode_batch(b"\x01" + msgpack.packb([wire(TRADE), [2, "o"]]))
    with pytest.raises(DecodeError, match="a batch is an array of messages, got integer 5"):
        decode_batch(b"\x01\x05")
    # a single message is not a batch
    with pytest.raises(DecodeError, match="message 0: a message is an array"):
        decode_batch(encode(TRADE))
    with pytest.raises(DecodeError, match="version 3"):
        decode_batch(b"\x03\x90")
    assert decode_batch(b"\x01\x90") == ()


# -- publications ------------------------------------------------------------------------------


def test_publication_for_another_symbol_is_refused() -> None:
    other = TRADE._replace(symbol="ETH-USDT")
    frame = b"BTC-USDT\x00" + encode_batch([TRADE, other])
    expected = "message 1: TradeOccurred of symbol 'ETH-USDT' published under symbol 'BTC-USDT'"
    with pytest.raises(DecodeError, match=expected):
        decode_publication(frame)
    # also what encode_publication would build from a wrong list
    with pytest.raises(DecodeError, match="published under symbol 'BTC-USDT'"):
        decode_publication(encode_publication("BTC-USDT", [BOOK._replace(symbol="BTC-USDTX")]))


def test_private_event_on_a_symbol_topic_is_refused() -> None:
    with pytest.raises(DecodeError, match="message 0: OrderFilled is not a public event"):
        decode_publication(encode_publication("BTC-USDT", [FILLED]))
    with pytest.raises(DecodeError, match="not a public event"):
        decode_publication(encode_publication("BTC-USDT", [SUBMIT]))


def test_account_publication_checks_the_account() -> None:
    with pytest.raises(DecodeError, match="of account 'alice' published under '@bob'"):
        decode_publication(encode_account_publication("bob", [FILLED]))
    with pytest.raises(DecodeError, match="TradeOccurred is not a private event"):
        decode_publication(encode_account_publication("alice", [TRADE]))
    with pytest.raises(DecodeError, match="SubmitOrder is not a private event"):
        decode_publication(encode_account_publication("alice", [SUBMIT]))


@pytest.mark.parametrize("frame, expected", [
    (b"", "no topic"),
    (b"BTC-USDT", "no topic"),
    (b"x" * 200 + b"\x00\x01\x90", "no topic"),
    (b"\x00\x01\x90", "empty topic name"),
    (b"@\x00\x01\x90", "empty account"),
    (b"\xff\xfe\x00\x01\x90", "not valid UTF-8"),
    (b"BTC-USDT\x00", "empty publication body"),
    (b"BTC-USDT\x00\x02\x90", "version 2"),
    (b"BTC-USDT\x00\x01\x90\x90", "trailing"),
    (b"BTC-USDT\x00\x01\x05", "a batch is an array"),
])
def test_malformed_publication(frame: bytes, expected: str) -> None:
    with pytest.raises(DecodeError, match=expected):
        decode_publication(frame)


def test_empty_publication() -> None:
    assert decode_publication(encode_publication("BTC-USDT", [])) == ("BTC-USDT", ())


# -- malformed input: random -------------------------------------------------------------------


def decodes_or_refuses(data: bytes) -> None:
    """Any bytes: DecodeError, or a valid message. Nothing else."""
    try:
        message = decode(data)
    except DecodeError:
        return
    assert_valid_message(message)


def batch_decodes_or_refuses(data: bytes) -> None:
    try:
        batch = decode_batch(data)
    except DecodeError:
        return
    for message in batch:
        assert_valid_message(message)


def publication_decodes_or_refuses(frame: bytes) -> None:
    try:
        name, events = decode_publication(frame)
    except DecodeError:
        return
    for event in events:
        assert_valid_message(event)
        assert event.account == name[1:] if name.startswith("@") else event.symbol == name


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=64) | st.binary(max_size=64).map(lambda b: b"\x01" + b))
def test_random_bytes(data: bytes) -> None:
    decodes_or_refuses(data)
    batch_decodes_or_refuses(data)
    publication_decodes_or_refuses(data)
    publication_decodes_or_refuses(b"BTC-USDT\x00" + data)


@st.composite
def mutated(draw: st.DrawFn, encodings: st.SearchStrategy[bytes]) -> bytes:
    data = bytearray(draw(encodings))
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["replace", "insert", "delete", "truncate", "append"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        byte = draw(st.integers(0, 255) | st.sampled_from([0x00, 0x7F, 0x80, 0x90, 0xC0, 0xC2, 0xC3, 0xFF]))
        if action == "replace" and data:
            data[at] = byte
        elif action == "insert":
            data.insert(at, byte)
        elif action == "delete" and data:
            del data[at]
        elif action == "truncate":
            del data[at:]
        else:
            data += draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(messages.map(encode)))
def test_mutated_messages(data: bytes) -> None:
    decodes_or_refuses(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(st.lists(messages, max_size=4).map(encode_batch)))
def test_mutated_batches(data: bytes) -> None:
    batch_decodes_or_refuses(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(st.lists(public_events("BTC-USDT"), max_size=3).map(lambda e: encode_publication("BTC-USDT", e))))
def test_mutated_publications(frame: bytes) -> None:
    publication_decodes_or_refuses(frame)


# -- every field against an independent statement of what is valid -----------------------------

ENUM_VALUES = {"Side": {m.value for m in Side}, "OrderType": {m.value for m in OrderType},
               "TimeInForce": {m.value for m in TimeInForce}}
ENUM_TYPES = {"Side": Side, "OrderType": OrderType, "TimeInForce": TimeInForce}


def valid_on_wire(annotation: str, value: object) -> bool:
    """The contract of the wire format, written out independently of codec.py."""
    if annotation == "str":
        return type(value) is str and 1 <= len(value) <= MAX_ID_LENGTH and all(" " <= c <= "~" for c in value)
    if annotation == "int":
        return type(value) is int and 0 <= value < 2**63
    if annotation == "int | None":
        return value is None or valid_on_wire("int", value)
    if annotation == "bool":
        return type(value) is bool
    if annotation in ENUM_VALUES:
        return type(value) is str and value in ENUM_VALUES[annotation]
    assert annotation == "tuple[Level, ...]"
    return type(value) is tuple and all(
        type(level) is tuple and len(level) == 2 and all(valid_on_wire("int", n) for n in level) for level in value)


def check_against_contract(cls: type, fields: list) -> None:
    """Decode [code, *fields]: a record exactly when every field is valid, else a DecodeError
    that names the first wrong field."""
    data = bytes((VERSION,)) + msgpack.packb([codec.TYPE_CODES[cls], *fields])
    kinds = annotations(cls)
    if len(fields) != len(kinds):
        with pytest.raises(DecodeError, match=f"{cls.__name__} has {len(kinds)} fields, got {len(fields)}"):
            decode(data)
        return
    wrong = [name for (name, annotation), value in zip(kinds.items(), fields, strict=True)
             if not valid_on_wire(annotation, value)]
    if wrong:
        with pytest.raises(DecodeError, match=rf"^{cls.__name__}\.{wrong[0]} "):
            decode(data)
        return
    message = decode(data)
    assert type(message) is cls
    for annotation, value, got in zip(kinds.values(), fields, message, strict=True):
        if annotation in ENUM_TYPES:
            assert got is ENUM_TYPES[annotation](value)
        else:
            assert got == value and type(got) is type(value)


# Field values at the edges of each kind, and of no kind at all.
EDGES = [
    0, 1, -1, MAX_INT, MAX_INT + 1, 2**64 - 1, -(2**63), True, False, None, 0.0, 1.0, b"", {},
    "", "x", "1", "x" * MAX_ID_LENGTH, "x" * (MAX_ID_LENGTH + 1), "é", "\x00", "a\tb", "\x7f", " ", "~",
    "buy", "sell", "limit", "market", "gtc", "ioc", "fok", "post_only", "BUY", "day", "true",
    (), (1,), (1, 2), ((1, 2),), ((0, 0), (MAX_INT, MAX_INT)), ((1, 2, 3),), ((1,),), ((),), (((1, 2),),),
    ((-1, 1),), ((1, -1),), ((MAX_INT + 1, 1),), ((1, MAX_INT + 1),), ((True, 1),), ((1, False),),
    ((1.0, 1),), ((None, 1),), ((1, None),), (("1", 1),), ((1, 2), 3), ((1, 2), (3, 4), (5,)),
]
PLAIN_FIELDS = {
    "str": "x", "int": 1, "int | None": 1, "bool": True, "Side": "buy", "OrderType": "limit",
    "TimeInForce": "gtc", "tuple[Level, ...]": ((1, 2),),
}


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda cls: cls.__name__)
def test_every_field_at_every_edge(cls: type) -> None:
    fields = [PLAIN_FIELDS[annotation] for annotation in annotations(cls).values()]
    check_against_contract(cls, fields)
    for at in range(len(fields)):
        for value in EDGES:
            check_against_contract(cls, [*fields[:at], value, *fields[at + 1:]])
    check_against_contract(cls, fields[:-1])
    check_against_contract(cls, [*fields, 1])


small_ints = st.integers(-2, 2) | st.sampled_from([MAX_INT, MAX_INT + 1])
any_wire_value = st.one_of(
    st.sampled_from(EDGES), st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False), ids, st.text(max_size=3),
    st.lists(st.tuples(naturals, naturals) | st.tuples(small_ints | st.none())
             | st.tuples(small_ints | st.none() | st.booleans(), small_ints)
             | st.tuples(small_ints, small_ints, small_ints) | small_ints, max_size=3).map(tuple),
)


@settings(max_examples=60, deadline=None)
@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda cls: cls.__name__)
@given(data=st.data())
def test_random_fields_against_the_contract(cls: type, data: st.DataObject) -> None:
    # A valid record's fields with one or more swapped for other values.
    message = data.draw(records_of(cls))
    fields = list(msgpack.unpackb(msgpack.packb(tuple(message)), use_list=False))
    for _ in range(data.draw(st.integers(1, 3))):
        fields[data.draw(st.integers(0, len(fields) - 1))] = data.draw(any_wire_value)
    check_against_contract(cls, fields)


def test_is_valid_id() -> None:
    assert is_valid_id("abc-123_X:~")
    assert is_valid_id("x" * MAX_ID_LENGTH)
    for bad in ("", "x" * (MAX_ID_LENGTH + 1), "zoë", "a\x00", "tab\t", 5, None, b"abc"):
        assert not is_valid_id(bad)


def test_the_wire_docs_table_of_bodies_is_the_codecs() -> None:
    """docs/wire.md, "Bodies": what an outside client builds its messages from (a review had to
    find the layout from the matcher's error messages before it was there)."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "wire.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \| (.+) \|$", text, re.MULTILINE)
    documented = {int(code): (name, re.findall(r"`(\w+)`(\??) (\w+)", fields)) for code, name, fields in rows}
    wire = {spec.code: (cls.__name__, [(f, "?" if k.endswith("?") else "", k.rstrip("?"))
                                        for f, k in zip(spec.fields, spec.kinds)])
            for cls, spec in codec._SPEC_OF.items()}
    assert documented == wire
