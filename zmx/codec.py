"""The msgpack wire format of commands and events inside the cluster.

Pure: bytes in, records out (and back); no sockets, files or clocks.

Layout
------

A message is one version byte (``VERSION``) followed by one msgpack array::

    VERSION  [type_code, field1, field2, ...]          # encode / decode

The fields are the record's, in declaration order. Prices, quantities, ``seq``, ``ts_ns`` and
trade ids are integers in ``[0, 2**63 - 1]``; enums (``Side``, ``OrderType``,
``TimeInForce``) travel as their string values (``"buy"``, ``"limit"``, ``"gtc"``); an absent
optional price or quantity is nil; a ``BookChanged`` side is an array of ``[price, lots]``
pairs. Identifiers (``symbol``, ``order_id``, ``account``) and reason codes are 1 to
``MAX_ID_LENGTH`` printable ASCII characters (``is_valid_id``).

Batches put several messages under one version byte::

    VERSION  [[type_code, ...], [type_code, ...], ...]   # encode_batch / decode_batch

and a published frame (what a matcher's PUB socket sends, one frame per command) is a topic
(``zmx.topics``) followed by a batch::

    b"BTC-USDT\\x00" VERSION [[...], ...]   # public events of a symbol: TradeOccurred, BookChanged
    b"@alice\\x00"   VERSION [[...], ...]   # private events of an account: fills, cancels, ...

A matcher's PUB counts each account's frames: ``VERSION [epoch, start, n, [[...], ...]]``,
where ``epoch`` is the matcher's (it grows with every start), ``start`` names the count (a
matcher starts a new one for an account it had let go) and ``n`` is the frame's number in it
(1, 2, ...), so that a subscriber sees a lost one (``decode_counted_publication``).

Type codes
----------

The codes are part of the wire format: never renumber one, never reuse a retired one.

====  ===============  ====  ===============
code  type             code  type
====  ===============  ====  ===============
1     SubmitOrder      16    OrderAccepted
2     CancelOrder      17    OrderRejected
3     AmendOrder       18    OrderFilled
                       19    OrderCanceled
                       20    OrderAmended
                       21    CancelRejected
                       22    AmendRejected
                       32    TradeOccurred
                       33    BookChanged
                       34    FeedHeartbeat
====  ===============  ====  ===============

Commands are 1-15, private events 16-31, public events 32-47: all fit msgpack's one-byte
positive fixint.

Strictness
----------

``encode*`` trust their input (they are on the hot path and are fed by zmx's own code); the
edges that build records from client input check them first (``is_valid_id``,
``SymbolSpec.to_ticks`` ...). ``decode*`` trust nothing: any input that is not exactly a
valid message -- empty, another version, not msgpack, trailing bytes, too large, too deeply
nested, an unknown type code, a wrong field count, a field of the wrong type or out of
range -- raises ``DecodeError`` and nothing else.

Validation is table-driven: ``_WIRE`` gives each record type its code and one field kind per
field, and each kind has one checker (``_CHECKERS``). Decoding a message is one ``unpackb``
and one pass of the checkers over its fields; only when a checker refuses does a second
pass find which field it was, for the message.
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from operator import call
from typing import Any, Union

import msgpack
from msgpack.exceptions import ExtraData, FormatError, StackError, UnpackException

from zmx.commands import COMMAND_TYPES, AmendOrder, CancelOrder, Command, SubmitOrder
from zmx.events import (
    EVENT_TYPES,
    PUBLIC_EVENT_TYPES,
    AmendRejected,
    BookChanged,
    CancelRejected,
    Event,
    FeedHeartbeat,
    OrderAccepted,
    OrderAmended,
    OrderCanceled,
    OrderFilled,
    OrderRejected,
    TradeOccurred,
)
from zmx.exceptions import DecodeError
from zmx.model import MAX_UNITS, OrderType, Side, TimeInForce
from zmx.topics import account_topic, is_private, split_topic, topic

__all__ = [
    "MAX_ID_LENGTH", "MAX_INT", "MAX_MESSAGE_BYTES", "MAX_PUBLICATION_BYTES", "MAX_REPLY_BYTES", "TYPE_CODES",
    "VERSION", "Message",
    "decode", "decode_batch", "decode_counted_publication", "decode_publication", "encode",
    "encode_account_publication", "encode_batch", "encode_publication", "is_valid_id", "join_account_publication",
    "join_batch", "join_publication", "pack_records",
]

VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20  # 1 MiB, the default limit of every decode function
# The largest publication a subscriber takes (gateway, probe): one command's events, and a market
# order that sweeps a deep book makes thousands of trades at once (about 35 bytes each)
MAX_PUBLICATION_BYTES = 64 * MAX_MESSAGE_BYTES
# The largest reply batch: every event of one command (a market order that sweeps the book makes a
# fill for each order it met). The routers take frames this big from the matchers; clients read
# replies up to it
MAX_REPLY_BYTES = 16 * MAX_MESSAGE_BYTES
MAX_ID_LENGTH = 64
MAX_INT = MAX_UNITS  # 2**63 - 1: integers fit a signed 64-bit word everywhere

Message = Union[Command, Event]

# -- field kinds -------------------------------------------------------------------------

ID = "id"  # symbol, order_id, account, reason: 1..MAX_ID_LENGTH printable ASCII characters
INT = "int"  # 0..MAX_INT, never a bool
OPT_INT = "int?"  # INT or nil
BOOL = "bool"
SIDE = "side"
ORDER_TYPE = "order_type"
TIME_IN_FORCE = "time_in_force"
LEVELS = "levels"  # array of [price, lots] pairs, each an INT

# -- the wire table: code, record type, one kind per field (in field order) ---------------

_WIRE: tuple[tuple[int, type, tuple[str, ...]], ...] = (
    (1, SubmitOrder, (ID, ID, ID, SIDE, ORDER_TYPE, TIME_IN_FORCE, OPT_INT, INT)),
    (2, CancelOrder, (ID, ID, ID)),
    (3, AmendOrder, (ID, ID, ID, OPT_INT, OPT_INT)),
    (16, OrderAccepted, (ID, INT, INT, ID, ID, SIDE, ORDER_TYPE, TIME_IN_FORCE, OPT_INT, INT)),
    (17, OrderRejected, (ID, INT, INT, ID, ID, ID)),
    (18, OrderFilled, (ID, INT, INT, ID, ID, SIDE, INT, INT, INT, INT, INT, BOOL)),
    (19, OrderCanceled, (ID, INT, INT, ID, ID, SIDE, OPT_INT, INT, INT, ID)),
    (20, OrderAmended, (ID, INT, INT, ID, ID, SIDE, INT, INT, INT)),
    (21, CancelRejected, (ID, INT, INT, ID, ID, ID)),
    (22, AmendRejected, (ID, INT, INT, ID, ID, ID)),
    (32, TradeOccurred, (ID, INT, INT, INT, INT, INT, SIDE)),
    (33, BookChanged, (ID, INT, INT, LEVELS, LEVELS)),
    (34, FeedHeartbeat, (ID, INT, INT)),
)

TYPE_CODES: dict[type, int] = {cls: code for code, cls, _ in _WIRE}
_PUBLIC = frozenset(PUBLIC_EVENT_TYPES)
_PRIVATE = frozenset(EVENT_TYPES) - _PUBLIC

# -- checkers: the definition of a valid field ------------------------------------------

_repr = reprlib.Repr()
_repr.maxstring = 40
_repr.maxother = 40
_repr.maxlevel = 3
_repr.maxtuple = 6


_WIRE_NAMES = {tuple: "array", str: "string", int: "integer", bool: "boolean", float: "float",
               bytes: "bin", dict: "map", msgpack.ExtType: "ext", msgpack.Timestamp: "timestamp"}


def _show(value: object) -> str:
    """A short description of a decoded value for an error message (never deep or long)."""
    if value is None:
        return "nil"
    if type(value) is tuple and not value:
        return "an empty array"
    return f"{_WIRE_NAMES.get(type(value), type(value).__name__)} {_repr.repr(value)}"


class _Invalid(Exception):
    """A field failed its check; the caller adds which field."""


def is_valid_id(text: object) -> bool:
    """True when ``text`` may be a symbol, order id, account or reason on the wire:
    a str of 1 to ``MAX_ID_LENGTH`` printable ASCII characters."""
    return type(text) is str and 0 < len(text) <= MAX_ID_LENGTH and text.isascii() and text.isprintable()


# One checker per kind: it returns the field's value (an enum member for an enum's string)
# or raises _Invalid saying what is wrong. The first line of each is the whole check; the
# rest only explains a failure.


def _check_id(value: object) -> object:
    if type(value) is str and 0 < len(value) <= MAX_ID_LENGTH and value.isascii() and value.isprintable():
        return value
    if type(value) is not str:
        raise _Invalid(f"must be a string, got {_show(value)}")
    if not value:
        raise _Invalid("must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise _Invalid(f"is {len(value)} characters long, at most {MAX_ID_LENGTH} allowed")
    raise _Invalid(f"must be printable ASCII, got {_repr.repr(value)}")


def _check_int(value: object) -> object:
    if type(value) is int and 0 <= value <= MAX_INT:
        return value
    if type(value) is not int:
        raise _Invalid(f"must be an integer, got {_show(value)}")
    raise _Invalid(f"must be in [0, 2**63 - 1], got {value}")


def _check_opt_int(value: object) -> object:
    if value is None or type(value) is int and 0 <= value <= MAX_INT:
        return value
    if type(value) is not int:
        raise _Invalid(f"must be an integer or nil, got {_show(value)}")
    raise _Invalid(f"must be in [0, 2**63 - 1], got {value}")


def _check_bool(value: object) -> object:
    if value is True or value is False:
        return value
    raise _Invalid(f"must be a boolean, got {_show(value)}")


def _enum_checker(enum: type) -> Callable[[object], object]:
    members = {m.value: m for m in enum}
    allowed = ", ".join(repr(v) for v in members)

    def check(value: object) -> object:
        if type(value) is str:
            member = members.get(value)
            if member is not None:
                return member
            raise _Invalid(f"must be one of {allowed}, got {_repr.repr(value)}")
        raise _Invalid(f"must be a string, one of {allowed}; got {_show(value)}")

    return check


def _is_level(level: object) -> bool:
    return (type(level) is tuple and len(level) == 2
            and type(level[0]) is int and 0 <= level[0] <= MAX_INT
            and type(level[1]) is int and 0 <= level[1] <= MAX_INT)


def _check_levels(value: object) -> object:
    if type(value) is tuple and all(map(_is_level, value)):
        return value
    if type(value) is not tuple:
        raise _Invalid(f"must be an array of [price, lots] pairs, got {_show(value)}")
    for i, level in enumerate(value):
        if type(level) is not tuple or len(level) != 2:
            raise _Invalid(f"level {i} must be a [price, lots] pair, got {_show(level)}")
        for what, number in zip(("price", "lots"), level):
            try:
                _check_int(number)
            except _Invalid as e:
                raise _Invalid(f"level {i} {what} {e}") from None
    raise AssertionError("unreachable: a level failed _is_level")


_CHECKERS: dict[str, Callable[[object], object]] = {
    ID: _check_id,
    INT: _check_int,
    OPT_INT: _check_opt_int,
    BOOL: _check_bool,
    SIDE: _enum_checker(Side),
    ORDER_TYPE: _enum_checker(OrderType),
    TIME_IN_FORCE: _enum_checker(TimeInForce),
    LEVELS: _check_levels,
}


class _Spec:
    """One record type's wire schema: its code, its fields' checkers, its encoded header."""

    __slots__ = ("checkers", "cls", "code", "fields", "header", "kinds", "size")

    def __init__(self, code: int, cls: type, kinds: tuple[str, ...]) -> None:
        fields = cls._fields  # type: ignore[attr-defined]
        if len(kinds) != len(fields):
            raise AssertionError(f"codec table: {cls.__name__} has {len(fields)} fields, {len(kinds)} kinds")
        if not 0 < code < 128 or len(fields) + 1 > 15:
            raise AssertionError(f"codec table: {cls.__name__} needs a code in 1..127 and at most 14 fields")
        self.code = code
        self.cls = cls
        self.fields = fields
        self.kinds = kinds
        self.size = len(kinds)
        self.checkers = tuple(_CHECKERS[k] for k in kinds)
        # encode: version, fixarray header of [code, *fields], code; then the packed record
        # without its own array header.
        self.header = bytes((VERSION, 0x90 | (len(fields) + 1), code))


_SPECS: dict[int, _Spec] = {code: _Spec(code, cls, kinds) for code, cls, kinds in _WIRE}
_SPEC_OF: dict[type, _Spec] = {spec.cls: spec for spec in _SPECS.values()}
if set(_SPEC_OF) != set(COMMAND_TYPES) | set(EVENT_TYPES) or len(_SPEC_OF) != len(_WIRE):
    raise AssertionError("codec table: every command and event type needs exactly one type code")

# -- encoding ----------------------------------------------------------------------------

# One Packer for the process: packb() builds a new one per call, which costs about as much
# as the packing itself. Packer.pack does all its work in C without running Python code or
# releasing the GIL for the plain types a record holds, and resets its buffer on error, so
# sharing it between threads is safe in CPython.
_pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack
_VERSION_BYTE = bytes((VERSION,))
_new = tuple.__new__


def _not_a_message(obj: object) -> TypeError:
    return TypeError(f"not a zmx command or event: {type(obj).__name__}")


def encode(message: Message) -> bytes:
    """A command or event -> ``VERSION + msgpack [type_code, *fields]``."""
    try:
        header = _SPEC_OF[type(message)].header
    except KeyError:
        raise _not_a_message(message) from None
    # The record packs as a fixarray of its fields; swap that one header byte for ours.
    return header + _pack(message)[1:]


def _pack_batch(messages: Iterable[Message]) -> bytes:
    try:
        return _pack([(TYPE_CODES[type(m)], *m) for m in messages])
    except KeyError as e:
        raise TypeError(f"not a zmx command or event: {e.args[0].__name__}") from None


def encode_batch(messages: Iterable[Message]) -> bytes:
    """Several commands or events -> ``VERSION + msgpack [[type_code, *fields], ...]``."""
    return _VERSION_BYTE + _pack_batch(messages)


def pack_records(messages: Sequence[Message]) -> list[bytes]:
    """Each message as its own msgpack record ``[type_code, *fields]``, for a sender that puts
    the same events in several frames (a matcher's reply, public and private publications):
    packed once, joined by ``join_batch`` / ``join_publication`` /
    ``join_account_publication`` into the bytes the ``encode_*`` functions give."""
    try:
        return [_pack((TYPE_CODES[type(m)], *m)) for m in messages]
    except KeyError as e:
        raise TypeError(f"not a zmx command or event: {e.args[0].__name__}") from None


_FIX_ARRAYS = [_VERSION_BYTE + bytes((0x90 | n,)) for n in range(16)]


def _batch_head(n: int) -> bytes:
    """The version byte and the msgpack array header of ``n`` elements."""
    if n < 16:
        return _FIX_ARRAYS[n]
    if n < 1 << 16:
        return _VERSION_BYTE + b"\xdc" + n.to_bytes(2, "big")
    return _VERSION_BYTE + b"\xdd" + n.to_bytes(4, "big")


def join_batch(records: Sequence[bytes]) -> bytes:
    """``encode_batch`` of the messages ``records`` came from (``pack_records``)."""
    return _batch_head(len(records)) + b"".join(records)


_symbol_topic = lru_cache(maxsize=4096)(topic)
_account_topic = lru_cache(maxsize=4096)(account_topic)


def join_publication(symbol: str, records: Sequence[bytes]) -> bytes:
    """``encode_publication`` of the events ``records`` came from (``pack_records``)."""
    return _symbol_topic(symbol) + _batch_head(len(records)) + b"".join(records)


def join_account_publication(account: str, records: Sequence[bytes],
                             counted: tuple[int, int, int] | None = None) -> bytes:
    """``encode_account_publication`` of the events ``records`` came from (``pack_records``)."""
    n = len(records)
    if counted is None:
        return _account_topic(account) + _batch_head(n) + b"".join(records)
    return (_account_topic(account) + _counted_head(counted[0]) + _pack(counted[1]) + _pack(counted[2])
            + (_ARRAY_HEADS[n] if n < 16 else _batch_head(n)[1:]) + b"".join(records))


def encode_publication(symbol: str, events: Iterable[Event]) -> bytes:
    """A symbol's public events (``TradeOccurred``, ``BookChanged``) as one PUB frame:
    ``topic(symbol) + encode_batch(events)``."""
    return _symbol_topic(symbol) + _VERSION_BYTE + _pack_batch(events)


def encode_account_publication(account: str, events: Iterable[Event],
                               counted: tuple[int, int, int] | None = None) -> bytes:
    """An account's private events as one PUB frame: ``account_topic(account) + encode_batch(events)``;
    ``counted``: the matcher's epoch, the account's count and the frame's number in it
    (``VERSION [epoch, start, n, [...]]``)."""
    if counted is None:
        return _account_topic(account) + _VERSION_BYTE + _pack_batch(events)
    return _account_topic(account) + _VERSION_BYTE + _pack((*counted, [(TYPE_CODES[type(m)], *m) for m in events]))


@lru_cache(maxsize=16)
def _counted_head(epoch: int) -> bytes:
    """The version byte, the header of ``[epoch, start, n, events]`` and the packed epoch."""
    return _VERSION_BYTE + b"\x94" + _pack(epoch)


_ARRAY_HEADS = [bytes((0x90 | n,)) for n in range(16)]


# -- decoding ----------------------------------------------------------------------------

_VALID_INPUT = (bytes, bytearray, memoryview)


def _body(data: bytes | bytearray | memoryview, max_bytes: int, what: str = "message") -> Any:
    """Check size and version; return the msgpack part."""
    size = len(data)
    if size > max_bytes:
        raise DecodeError(f"{what} is {size} bytes, above the limit of {max_bytes}")
    if not size:
        raise DecodeError(f"empty {what}")
    if data[0] != VERSION:
        if not isinstance(data, _VALID_INPUT):
            raise TypeError(f"can only decode bytes, bytearray or memoryview, not {type(data).__name__}")
        raise DecodeError(f"unsupported wire version {data[0]} (this zmx supports version {VERSION})")
    return data[1:]


def _unpack(body: Any) -> Any:
    try:
        return msgpack.unpackb(
            body, use_list=False, raw=False, strict_map_key=True,
            # A valid message holds no bin, map or ext at all, and no string longer than an
            # id (at most 4 bytes a character); arrays are bounded by the input's length.
            max_str_len=4 * MAX_ID_LENGTH, max_bin_len=0, max_map_len=0, max_ext_len=0,
            max_array_len=len(body),
        )
    except StackError:
        raise DecodeError("malformed msgpack: nested too deeply") from None
    except ExtraData as e:
        raise DecodeError(f"malformed msgpack: {len(e.extra)} trailing byte(s) after the message") from None
    except FormatError:
        raise DecodeError("malformed msgpack: a byte that starts no msgpack value") from None
    except (ValueError, TypeError, OverflowError, UnpackException) as e:
        # Truncated input, bad UTF-8, one of the limits above ...
        if str(e).endswith(f"exceeds max_str_len({4 * MAX_ID_LENGTH})"):
            raise DecodeError(f"a string of {str(e).split()[0]} bytes: no field takes more than {MAX_ID_LENGTH} "
                              "characters") from None
        raise DecodeError(f"malformed msgpack: {str(e) or type(e).__name__}") from None


def _field_error(spec: _Spec, fields: tuple) -> DecodeError:
    """The error that names the first wrong field (run only once a check has failed)."""
    for field, check, value in zip(spec.fields, spec.checkers, fields):
        try:
            check(value)
        except _Invalid as e:
            return DecodeError(f"{spec.cls.__name__}.{field} {e}")
    raise AssertionError("unreachable: a field failed its check above")


def _build(obj: Any) -> Message:
    """One unpacked ``[type_code, *fields]`` -> its record."""
    if type(obj) is not tuple or not obj:
        raise DecodeError(f"a message is an array [type_code, *fields], got {_show(obj)}")
    code = obj[0]
    spec = _SPECS.get(code) if type(code) is int else None
    if spec is None:
        if type(code) is int:
            raise DecodeError(f"unknown message type code {code}")
        raise DecodeError(f"a message type code is an integer, got {_show(code)}")
    fields = obj[1:]
    if len(fields) != spec.size:
        raise DecodeError(f"{spec.cls.__name__} has {spec.size} fields, got {len(fields)}")
    try:
        # operator.call runs each field's checker from C: no Python loop on the hot path.
        return _new(spec.cls, map(call, spec.checkers, fields))  # type: ignore[no-any-return]
    except _Invalid:
        raise _field_error(spec, fields) from None


def decode(data: bytes | bytearray | memoryview, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """``encode``'s inverse. Raises ``DecodeError`` for anything but a valid message."""
    return _build(_unpack(_body(data, max_bytes)))


def _build_all(obj: Any) -> tuple[Message, ...]:
    if type(obj) is not tuple:
        raise DecodeError(f"a batch is an array of messages, got {_show(obj)}")
    messages = []
    for i, item in enumerate(obj):
        try:
            messages.append(_build(item))
        except DecodeError as e:
            raise DecodeError(f"message {i}: {e}") from None
    return tuple(messages)


def decode_batch(data: bytes | bytearray | memoryview, max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[Message, ...]:
    """``encode_batch``'s inverse: a tuple of commands and events, in order."""
    return _build_all(_unpack(_body(data, max_bytes, "batch")))


def _misplaced(events: tuple[Message, ...], name: str, account: str | None) -> DecodeError:
    """The error for the first event that does not belong under topic ``name`` (``account``:
    an account topic's account, None for a symbol's); run only once a check has failed."""
    if account is None:
        allowed, visibility, field, owner, where = _PUBLIC, "public", "symbol", name, f"symbol {name!r}"
    else:
        allowed, visibility, field, owner, where = _PRIVATE, "private", "account", account, repr(name)
    for i, event in enumerate(events):
        kind = type(event).__name__
        if type(event) not in allowed:
            return DecodeError(f"message {i}: {kind} is not a {visibility} event; it cannot be published "
                               f"under {where}")
        value = getattr(event, field)
        if value != owner:
            return DecodeError(f"message {i}: {kind} of {field} {value!r} published under {where}")
    raise AssertionError("unreachable: an event failed its check above")


def decode_publication(
    frame: bytes | bytearray | memoryview, max_bytes: int = MAX_MESSAGE_BYTES,
) -> tuple[str, tuple[Event, ...]]:
    """A PUB frame -> ``(name, events)``.

    ``name`` is the topic's name as ``zmx.topics.split_topic`` gives it: a symbol
    (``"BTC-USDT"``), whose frame may only hold that symbol's public events, or ``"@"`` and
    an account (``"@alice"``), whose frame may only hold that account's private events (and
    may be counted: ``decode_counted_publication``). Anything else raises ``DecodeError``.
    """
    return decode_counted_publication(frame, max_bytes)[:2]  # type: ignore[return-value]


def decode_counted_publication(
    frame: bytes | bytearray | memoryview, max_bytes: int = MAX_MESSAGE_BYTES,
) -> tuple[str, tuple[Event, ...], tuple[int, int, int] | None]:
    """``decode_publication``, and an account frame's ``(epoch, start, n)`` if it is counted (else None)."""
    if len(frame) > max_bytes:
        raise DecodeError(f"publication is {len(frame)} bytes, above the limit of {max_bytes}")
    name, rest = split_topic(frame)
    body = _unpack(_body(rest, max_bytes, "publication body"))
    counted = None
    if type(body) is tuple and len(body) == 4 and type(body[0]) is int and is_private(name):
        epoch, start, n, body = body
        if not (0 <= epoch <= MAX_INT and type(start) is int and 1 <= start <= MAX_INT
                and type(n) is int and 1 <= n <= MAX_INT):
            raise DecodeError(f"a counted account frame starts with an epoch, a count and a number, the last two "
                              f"from 1, got {_show(epoch)}, {_show(start)}, {_show(n)}")
        counted = (epoch, start, n)
    events = _build_all(body)
    if is_private(name):
        account = name[1:]
        for event in events:
            if type(event) not in _PRIVATE or event.account != account:  # type: ignore[union-attr]
                raise _misplaced(events, name, account)
    else:
        for event in events:
            if type(event) not in _PUBLIC or event.symbol != name:  # type: ignore[union-attr]
                raise _misplaced(events, name, None)
    return name, events, counted  # type: ignore[return-value]
