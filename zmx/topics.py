"""Topic frames: what a ZeroMQ SUB socket filters on.

A matcher publishes every message as ONE frame that starts with its topic:

- a symbol's public channel (``TradeOccurred``, ``BookChanged``): ``b"BTC-USDT\\x00"``;
- an account's private events (fills, cancels ...): ``b"@" + account + b"\\x00"``.

ZeroMQ subscriptions are byte prefixes. The NUL that ends every topic is what keeps a
subscription to ``BTC-USDT`` from also receiving ``BTC-USDTX``: ``b"BTC-USDT\\x00"`` is not a
prefix of ``b"BTC-USDTX\\x00..."``. The ``@`` keeps account topics and symbol topics apart,
so a symbol name may not start with one.

``split_topic`` is the receiving side: it cuts the name off a frame and hands back the rest
(the codec's body) without decoding it.
"""

from __future__ import annotations

from zmx.exceptions import DecodeError

TERMINATOR = b"\x00"
PRIVATE_PREFIX = "@"
# The NUL must come within the first MAX_TOPIC_BYTES bytes of a frame, so a receiver never
# scans a large body for it; a name is therefore at most MAX_TOPIC_BYTES - 1 bytes long.
MAX_TOPIC_BYTES = 128
_MAX_NAME_BYTES = MAX_TOPIC_BYTES - 1
# The most a subscription message to a PUB side of the cluster (a matcher's, a relay's) can
# hold: a topic after ZMTP 3.1's SUBSCRIBE command name (b"\x09SUBSCRIBE", 10 bytes, what
# libzmq 4.3 sends; ZMTP 3.0's 0/1 byte is shorter). Those sockets refuse longer ones
# (ZMQ_MAXMSGSIZE: the peer is disconnected), which a peer could otherwise use to make the
# socket build a deep subscription trie, with a lot of memory and CPU, and crash it when the
# trie is walked. (At 1 + 128 a subscriber to a topic over 119 bytes was dropped, again and
# again as it connected again.)
SUBSCRIPTION_MAX_BYTES = len(b"\x09SUBSCRIBE") + MAX_TOPIC_BYTES


def topic(symbol: str) -> bytes:
    """``"BTC-USDT"`` -> ``b"BTC-USDT\\x00"``: the topic of a symbol's public channel.

    A symbol is printable ASCII (no NUL, no control characters), not empty, does not start
    with ``@`` and fits the topic limit; anything else raises ``ValueError``.
    """
    if not isinstance(symbol, str):
        raise TypeError(f"a symbol is a str, got {type(symbol).__name__}")
    if not symbol:
        raise ValueError("a symbol name must not be empty")
    if not (symbol.isascii() and symbol.isprintable()):
        raise ValueError(f"symbol {symbol!r} must be printable ASCII (no NUL or control characters)")
    if symbol[0] == PRIVATE_PREFIX:
        raise ValueError(f"symbol {symbol!r} must not start with {PRIVATE_PREFIX!r} (that marks account topics)")
    if len(symbol) > _MAX_NAME_BYTES:
        raise ValueError(f"symbol {symbol[:20]!r}... is {len(symbol)} characters long, at most {_MAX_NAME_BYTES}")
    return symbol.encode("ascii") + TERMINATOR


def account_topic(account: str) -> bytes:
    """``"alice"`` -> ``b"@alice\\x00"``: the topic of an account's private events.

    The account is encoded as UTF-8; an empty account, one that contains NUL, or one whose
    topic would not fit ``MAX_TOPIC_BYTES`` raises ``ValueError``.
    """
    if not isinstance(account, str):
        raise TypeError(f"an account is a str, got {type(account).__name__}")
    if not account:
        raise ValueError("an account name must not be empty")
    if "\x00" in account:
        raise ValueError(f"account {account!r} must not contain NUL")
    try:
        name = account.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"account {account!r} cannot be encoded as UTF-8") from None
    if len(name) + 1 > _MAX_NAME_BYTES:
        raise ValueError(
            f"account {account[:20]!r}... is {len(name)} bytes long in UTF-8, at most {_MAX_NAME_BYTES - 1}")
    return b"@" + name + TERMINATOR


def is_private(name: str) -> bool:
    """True for an account topic's name (``"@alice"``), False for a symbol's (``"BTC-USDT"``)."""
    return name[:1] == PRIVATE_PREFIX


def split_topic(frame: bytes | bytearray | memoryview) -> tuple[str, bytes | bytearray | memoryview]:
    """Cut a published frame into its topic name and the rest.

    ``b"BTC-USDT\\x00<body>"`` -> ``("BTC-USDT", b"<body>")``; an account topic keeps its ``@``:
    ``b"@alice\\x00<body>"`` -> ``("@alice", b"<body>")``. The rest is a slice of the same type
    as ``frame`` (a ``memoryview`` in gives a ``memoryview`` out, without a copy).

    Raises ``DecodeError`` when there is no NUL within the first ``MAX_TOPIC_BYTES`` bytes, the
    name is empty (or a bare ``@``), or it is not valid UTF-8.
    """
    if type(frame) is bytes or type(frame) is bytearray:
        end = frame.find(TERMINATOR, 0, MAX_TOPIC_BYTES)
        head = frame
    else:
        frame = memoryview(frame)
        head = bytes(frame[:MAX_TOPIC_BYTES])
        end = head.find(TERMINATOR)
    if end < 0:
        raise DecodeError(f"no topic: no NUL within the first {MAX_TOPIC_BYTES} bytes of a {len(frame)}-byte frame")
    if end == 0:
        raise DecodeError("empty topic name")
    try:
        name = head[:end].decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError(f"topic name {bytes(head[:end])!r} is not valid UTF-8") from None
    if name == PRIVATE_PREFIX:
        raise DecodeError("empty account in topic '@'")
    return name, frame[end + 1:]
