"""Topic frames: ZeroMQ prefix matching must never mix symbols or accounts up."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from zmx.exceptions import DecodeError
from zmx.topics import MAX_TOPIC_BYTES, account_topic, is_private, split_topic, topic

symbols = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=40).filter(
    lambda s: not s.startswith("@"))
accounts = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), min_size=1, max_size=30)
bodies = st.binary(max_size=40)


def zmq_delivers(subscription: bytes, frame: bytes) -> bool:
    """What a ZeroMQ SUB socket does with a subscription: a byte-prefix match."""
    return frame.startswith(subscription)


def test_topic_bytes() -> None:
    assert topic("BTC-USDT") == b"BTC-USDT\x00"
    assert account_topic("alice") == b"@alice\x00"
    assert account_topic("zoë") == b"@zo\xc3\xab\x00"


def test_prefix_matching_keeps_symbols_apart() -> None:
    sub = topic("BTC-USDT")
    assert zmq_delivers(sub, topic("BTC-USDT") + b"\x01\x90")
    for other in ("BTC-USDTX", "BTC-USD", "ETH-USDT", "BTC-USDT-PERP", "BTC"):
        assert not zmq_delivers(sub, topic(other) + b"\x01\x90")
        assert not zmq_delivers(topic(other), topic("BTC-USDT") + b"\x01\x90")
    # without the NUL, ZeroMQ would deliver BTC-USDTX to a BTC-USDT subscriber
    assert zmq_delivers(b"BTC-USDT", b"BTC-USDTX\x00")


@settings(max_examples=500, deadline=None)
@given(symbols, symbols, bodies)
def test_a_symbol_subscription_gets_only_its_symbol(subscribed: str, published: str, body: bytes) -> None:
    assert zmq_delivers(topic(subscribed), topic(published) + body) == (subscribed == published)


@settings(max_examples=300, deadline=None)
@given(symbols, st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=5), bodies)
def test_a_longer_symbol_never_reaches_a_prefix_subscriber(subscribed: str, suffix: str, body: bytes) -> None:
    assert not zmq_delivers(topic(subscribed), topic(subscribed + suffix) + body)


@settings(max_examples=500, deadline=None)
@given(accounts, accounts, symbols, bodies)
def test_account_and_symbol_topics_never_match_each_other(a: str, b: str, symbol: str, body: bytes) -> None:
    assert zmq_delivers(account_topic(a), account_topic(b) + body) == (a == b)
    assert not zmq_delivers(account_topic(a), topic(symbol) + body)
    assert not zmq_delivers(topic(symbol), account_topic(a) + body)


@settings(max_examples=500, deadline=None)
@given(symbols, bodies)
def test_split_topic_round_trip(symbol: str, body: bytes) -> None:
    frame = topic(symbol) + body
    assert split_topic(frame) == (symbol, body)
    name, rest = split_topic(memoryview(frame))
    assert name == symbol
    assert isinstance(rest, memoryview)
    assert rest.tobytes() == body
    assert split_topic(bytearray(frame)) == (symbol, bytearray(body))
    assert not is_private(name)


@settings(max_examples=500, deadline=None)
@given(accounts, bodies)
def test_split_account_topic_round_trip(account: str, body: bytes) -> None:
    assume(len(account.encode()) <= MAX_TOPIC_BYTES - 2)
    name, rest = split_topic(account_topic(account) + body)
    assert name == "@" + account
    assert rest == body
    assert is_private(name)


def test_only_the_first_nul_splits() -> None:
    assert split_topic(b"BTC-USDT\x00\x00a\x00") == ("BTC-USDT", b"\x00a\x00")
    assert split_topic(b"BTC-USDT\x00") == ("BTC-USDT", b"")


def test_longest_names() -> None:
    longest = "S" * (MAX_TOPIC_BYTES - 1)
    assert len(topic(longest)) == MAX_TOPIC_BYTES
    assert split_topic(topic(longest) + b"body") == (longest, b"body")
    with pytest.raises(ValueError):
        topic(longest + "S")
    account = "a" * (MAX_TOPIC_BYTES - 2)
    assert len(account_topic(account)) == MAX_TOPIC_BYTES
    assert split_topic(account_topic(account) + b"body") == ("@" + account, b"body")
    with pytest.raises(ValueError):
        account_topic(account + "a")


@pytest.mark.parametrize("frame, expected", [
    (b"", "no NUL within the first 128 bytes"),
    (b"BTC-USDT", "no NUL within the first 128 bytes"),
    (b"S" * MAX_TOPIC_BYTES + b"\x00body", "no NUL within the first 128 bytes"),
    (b"\x00body", "empty topic name"),
    (b"@\x00body", "empty account"),
    (b"\xff\x00body", "not valid UTF-8"),
    (b"BTC\xc3\x00body", "not valid UTF-8"),
])
def test_malformed_frames(frame: bytes, expected: str) -> None:
    for kind in (bytes, bytearray, memoryview):
        with pytest.raises(DecodeError, match=expected):
            split_topic(kind(frame))


@pytest.mark.parametrize("symbol", ["", "BTC\x00USDT", "BTC-USDTé", "BTC\nUSDT", "@BTC", "\x7f"])
def test_bad_symbols(symbol: str) -> None:
    with pytest.raises(ValueError):
        topic(symbol)


@pytest.mark.parametrize("account", ["", "a\x00b", "\ud800"])
def test_bad_accounts(account: str) -> None:
    with pytest.raises(ValueError):
        account_topic(account)


def test_names_must_be_str() -> None:
    with pytest.raises(TypeError):
        topic(b"BTC-USDT")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        account_topic(None)  # type: ignore[arg-type]


def test_is_private() -> None:
    assert is_private("@alice")
    assert not is_private("BTC-USDT")
    assert not is_private("")
