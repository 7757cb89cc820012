"""The WebSocket JSON protocol, as Sans-I/O state machines (no sockets, no clock of its own).

``Session`` is one client connection: ``receive(text, now)`` takes a client message and
returns the actions the I/O shell carries out, in order (``Send`` bytes to this client,
``Subscribe``/``Unsubscribe`` a channel, ``Submit``/``Cancel``/``Amend`` an order, ``Close``). Replies to
orders come back through ``on_reply`` and ``on_private``, which return the JSON messages to
send. ``Channel`` is one symbol's channel: it keeps the L2 mirror and turns what the matcher
published into the JSON messages every subscriber gets, each encoded once.

The public contract is docs/protocol.md (it follows the design's "WebSocket protocol" and
says what that leaves open). Messages are built as bytes (``orjson``) so that the shell can
frame them once and write the same bytes to every subscriber.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from heapq import heappop, heappush
from typing import Any, NamedTuple, Union

import orjson

from zmx.codec import is_valid_id
from zmx.commands import AmendOrder, CancelOrder, SubmitOrder
from zmx.depth import L2Mirror
from zmx.events import (
    AmendRejected, BookChanged, CancelRejected, Event, Level, OrderAccepted, OrderAmended, OrderCanceled,
    OrderFilled, OrderRejected, TradeOccurred,
)
from zmx.exceptions import ClientError, InvalidNumber, SequenceGap
from zmx.model import OrderType, Side, SymbolSpec, TimeInForce

__all__ = [
    "CLOSE_INVALID_DATA", "CLOSE_POLICY", "MAX_CHANNELS_PER_REQUEST", "MAX_ID_CHARS", "RATE_UNIT_BYTES", "Action",
    "Amend", "Cancel",
    "Channel", "Close", "Send", "SequenceGap", "Session", "Submit", "Subscribe", "Unsubscribe", "error",
    "order_update", "rejected",
]

MAX_ID_CHARS = 64
MAX_CHANNELS_PER_REQUEST = 100
# Toward the rate limit a message counts once per RATE_UNIT_BYTES begun: reading JSON costs
# about its size (a message of empty arrays takes orjson 60 ns a byte here), so a client's
# reading per second is bounded by twice the limit times this, not by what it packs in each.
RATE_UNIT_BYTES = 4096
_MAX_INT_ID = 2**63 - 1

# WebSocket close codes the session asks for
CLOSE_POLICY = 1008  # a flood past twice the rate limit
CLOSE_INVALID_DATA = 1007  # a text message that is not UTF-8 (RFC 6455, 8.1)


# -- actions for the I/O shell -------------------------------------------------------------

class Send(NamedTuple):
    """Write this JSON message (UTF-8 bytes of one text frame) to the client."""

    payload: bytes


class Subscribe(NamedTuple):
    """The client now holds ``channel``: add it to the channel's subscribers and send it the
    channel's ``depth_snapshot`` as soon as there is one."""

    channel: str


class Unsubscribe(NamedTuple):
    """The client dropped ``channel``: send it nothing more of it."""

    channel: str


class Submit(NamedTuple):
    """Send ``command`` to the routers; give the reply to ``Session.on_reply``."""

    command: SubmitOrder
    request_id: object  # the client's ``id`` (None when it sent none)


class Cancel(NamedTuple):
    command: CancelOrder
    request_id: object


class Amend(NamedTuple):
    command: AmendOrder
    request_id: object


class Close(NamedTuple):
    """Close the connection with this WebSocket close code."""

    code: int
    reason: str


Action = Union[Send, Subscribe, Unsubscribe, Submit, Cancel, Amend, Close]


# -- message builders ------------------------------------------------------------------------

def _dumps(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message)


def error(code: str, message: str, request_id: object = None, **extra: Any) -> bytes:
    """``{"type":"error","code":...,"message":...}`` with the request's ``id`` if it had one."""
    body: dict[str, Any] = {"type": "error", "code": code, "message": message}
    body.update(extra)
    if request_id is not None:
        body["id"] = request_id
    return _dumps(body)


def _with_id(body: dict[str, Any], request_id: object) -> bytes:
    if request_id is not None:
        body["id"] = request_id
    return _dumps(body)


def order_update(spec: SymbolSpec, event: Event, request_id: object = None,
                 command: SubmitOrder | AmendOrder | None = None,
                 order_kind: tuple[str, str] | None = None) -> bytes | None:
    """The ``order_update`` (or, for a refused cancel or amend, the ``error``) a private event
    becomes; None for an event that clients do not see. ``command`` is the submit or amend the
    event answers, when it is known: it gives the order's own price (and a submit its type).
    ``order_kind``: the order's ``type`` and ``time_in_force``, for an event that does not carry
    them (a fill, cancel or amend of an order the connection placed earlier)."""
    price_text, quantity_text = spec.ticks_to_price, spec.lots_to_quantity
    kind = type(event)
    data: dict[str, Any]
    if kind is OrderAccepted:
        data = {"order_id": event.order_id, "symbol": event.symbol, "status": "accepted",
                "side": event.side.value, "type": event.type.value, "time_in_force": event.time_in_force.value,
                "price": None if event.price is None else price_text(event.price),
                "quantity": quantity_text(event.quantity), "filled": "0",
                "remaining": quantity_text(event.quantity), "ts": event.ts_ns}
    elif kind is OrderFilled:
        if command is not None and command.order_id == event.order_id and (
                command.price is not None or type(command) is SubmitOrder):
            price = None if command.price is None else price_text(command.price)
        else:  # a resting order (or one amended in quantity only): it trades at its own price
            price = price_text(event.price)
        data = {"order_id": event.order_id, "symbol": event.symbol,
                "status": "partially_filled" if event.remaining else "filled",
                "side": event.side.value, "price": price, "quantity": quantity_text(event.filled + event.remaining),
                "filled": quantity_text(event.filled), "remaining": quantity_text(event.remaining),
                "last_price": price_text(event.price), "last_quantity": quantity_text(event.quantity),
                "trade_id": event.trade_id, "liquidity": "maker" if event.maker else "taker", "ts": event.ts_ns}
    elif kind is OrderCanceled:
        data = {"order_id": event.order_id, "symbol": event.symbol, "status": "canceled", "reason": event.reason,
                "side": event.side.value, "price": None if event.price is None else price_text(event.price),
                "quantity": quantity_text(event.filled + event.canceled), "filled": quantity_text(event.filled),
                "remaining": "0", "ts": event.ts_ns}
    elif kind is OrderRejected:
        data = _rejected_data(spec, command, event.order_id, event.symbol, event.reason)
        data["ts"] = event.ts_ns
    elif kind is OrderAmended:
        data = {"order_id": event.order_id, "symbol": event.symbol, "status": "amended", "side": event.side.value,
                "price": price_text(event.price), "quantity": quantity_text(event.quantity),
                "filled": quantity_text(event.quantity - event.remaining), "remaining": quantity_text(event.remaining),
                "ts": event.ts_ns}
    elif kind is CancelRejected or kind is AmendRejected:
        what = {"unknown_order": f"order {event.order_id!r} is not on the {event.symbol} book of this connection",
                "invalid_quantity": "the new quantity must be above what has filled already and within the "
                                    "symbol's quantity limits, and must not take the total of its price level "
                                    "above 2^63 - 1 lots",
                "would_cross": "the new price would cross the book, and the order is post_only"}
        doing = "cancel" if kind is CancelRejected else "amend"
        return error(event.reason, what.get(event.reason, f"{doing} refused: {event.reason}"), request_id,
                     order_id=event.order_id, symbol=event.symbol)
    else:
        return None
    if "type" not in data:
        if type(command) is SubmitOrder and command.order_id == event.order_id:
            data["type"] = command.type.value
            data["time_in_force"] = command.time_in_force.value
        elif order_kind is not None:
            data["type"], data["time_in_force"] = order_kind
    return _with_id({"type": "order_update", "data": data}, request_id)


def _rejected_data(spec: SymbolSpec | None, command: SubmitOrder | None, order_id: str, symbol: str,
                   reason: str, message: str | None = None, outcome_unknown: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {"order_id": order_id, "symbol": symbol, "status": "rejected", "reason": reason}
    if command is not None:
        data["side"] = command.side.value
        data["type"] = command.type.value
        data["time_in_force"] = command.time_in_force.value
        if spec is not None:
            data["price"] = None if command.price is None else spec.ticks_to_price(command.price)
            data["quantity"] = spec.lots_to_quantity(command.quantity)
    if message:
        data["message"] = message
    if outcome_unknown:
        data["outcome_unknown"] = True
    return data


def rejected(order_id: str, symbol: str, reason: str, message: str, request_id: object = None, *,
             spec: SymbolSpec | None = None, command: SubmitOrder | None = None,
             outcome_unknown: bool = False, echo: dict[str, Any] | None = None) -> bytes:
    """An ``order_update`` ``rejected`` that did not come from a matcher (the gateway, a router).
    ``outcome_unknown``: no answer came, so the order may be on the book all the same. ``echo``:
    the order's fields as the client sent them, for a refusal made before there was a command."""
    data = _rejected_data(spec, command, order_id, symbol, reason, message, outcome_unknown)
    if echo:
        data.update({k: v for k, v in echo.items() if k not in data})
    return _with_id({"type": "order_update", "data": data}, request_id)


# -- one client connection -------------------------------------------------------------------

_SIDES = {s.value: s for s in Side}
_TYPES = {t.value: t for t in OrderType}
_TIFS = {t.value: t for t in TimeInForce}


def _field(message: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = message.get(name)
    if value is None:  # null is the same as no field (docs/protocol.md, "Requests")
        raise ClientError("missing_field", f"{name!r} is missing ({what})")
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ClientError("invalid_field", f"{name!r} must be {what}, got {_json_kind(value)}")
    return value


def _is_name(text: str) -> bool:
    """An order id, a symbol or a channel: 1 to MAX_ID_CHARS printable ASCII characters, as on the wire."""
    return len(text) <= MAX_ID_CHARS and is_valid_id(text)


def _name(message: dict[str, Any], name: str, what: str) -> str:
    """A field that names something (``_is_name``)."""
    value: str = _field(message, name, str, what)
    if not _is_name(value):
        raise ClientError("invalid_field", f"{name!r} must be 1 to {MAX_ID_CHARS} printable ASCII characters, "
                          f"got {_show(value)}")
    return value


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def _choice(message: dict[str, Any], name: str, choices: dict[str, Any], default: str | None) -> Any:
    value = message.get(name)
    if value is None:
        if default is None:
            raise ClientError("missing_field", f"{name!r} is missing (one of {', '.join(choices)})")
        return choices[default]
    if type(value) is not str or value not in choices:
        raise ClientError("invalid_field", f"{name!r} must be one of {', '.join(choices)}, got {_show(value)}")
    return choices[value]


def _show(value: object) -> str:
    """A client's value in a message: as JSON, at most about 40 characters (a long string is
    cut inside its quotes)."""
    if type(value) is str and len(value) > 36:
        value = value[:33] + "..."
    if isinstance(value, (set, bytes)):
        text = repr(value)
    else:
        try:
            text = orjson.dumps(value).decode()
        except TypeError:  # (orjson.JSONEncodeError) nested deeper than orjson writes: read, never shown
            text = f"{_json_kind(value)} nested too deeply to show"
    return text if len(text) <= 40 else text[:37] + "..."


PASSED_TRADES = 256  # trade ids of a connection's fills as a maker remembered per symbol, to pass each on once
# ... and while fills of the symbol may be missing (Session.fills_lost), every one passed on since,
# up to this many (the matcher keeps 100,000 fills of all its accounts)
PASSED_TRADES_IN_DOUBT = 100_000


class Session:
    """One WebSocket client: its channels, its account, its rate limit, its orders in flight.

    ``account`` names this connection's orders (one account per connection until
    authentication arrives). ``symbols`` are the cluster's symbols (channel names = symbols).
    """

    __slots__ = ("_ask_floor", "_asking", "_ended", "_filled", "_inflight", "_maker_high", "_passed_trades",
                 "_replay_sure", "_replaying", "_window", "_window_count", "account",
                 "channels", "fills_wanted", "rate_limit", "symbols")

    def __init__(self, account: str, symbols: Mapping[str, SymbolSpec], *, rate_limit_per_s: int = 100) -> None:
        self.account = account
        self.symbols = symbols
        self.rate_limit = rate_limit_per_s
        self.channels: list[str] = []  # held channels; a list, as a set costs 216 bytes per connection
        self._window = -1  # the whole second the rate count is for
        self._window_count = 0
        # (symbol, order_id) -> the order's submits and amends in flight, and its fills as a maker
        # that wait for their replies
        self._inflight: dict[tuple[str, str], _Hold] | None = None
        # symbol -> the trade id of the last fill of a resting order passed on (0: none yet), for
        # each symbol this account placed orders on
        self._maker_high: dict[str, int] | None = None
        # symbol -> the trade ids of the highest PASSED_TRADES fills of resting orders passed on,
        # each with its seq: a fill among them is a repeat, whatever the order's state here says
        # (a late answer, an id sent again, can make an ended order look live, filled 0); the
        # seqs tell which came past a gap in the feed (fills_lost_after)
        self._passed_trades: dict[str, _Passed] | None = None
        # symbol -> its resting orders' fills, and the replies to its orders, that arrived while
        # the gateway asks the matcher for the fills its feed lost (begin_fill_replay)
        self._replaying: dict[str, list[OrderFilled | _HeldReply]] | None = None
        # (symbol, order_id) -> (the lots filled that the messages passed on so far show, a trade
        # id below any fill of the order not passed on yet, its type, its time in force), for
        # each live order this connection placed: a later event of the order that shows more
        # filled before it proves fills that never came, and the matcher is asked for the fills
        # after that trade id; the type and time in force go into the order's later updates,
        # whose events do not carry them
        self._filled: dict[tuple[str, str], tuple[int, int, str, str]] | None = None
        # symbol -> the trade id to ask the matcher for fills after: symbols where an order's own
        # events proved fills missing; the gateway asks (begin_fill_replay), which empties it
        self.fills_wanted: dict[str, int] | None = None
        # symbol -> a trade id after which fills may still be missing although the fills passed on
        # since went higher: the feed lost publications, or an answer never came (fills_lost); the
        # next begin_fill_replay asks from no higher, and empties it
        self._ask_floor: dict[str, int] | None = None
        # symbol -> the trade id the matcher is asked for fills after (begin_fill_replay), until
        # its answer is in (end_fill_replay)
        self._asking: dict[str, int] | None = None
        # (symbol, order_id) -> the type and time in force of an order that ended here while
        # fills of its symbol may have been missing: one may come after its end (a give-up)
        self._ended: dict[tuple[str, str], tuple[str, str]] | None = None
        # symbol -> _sure() when end_fill_replay began, while it runs: what it passes on in the
        # book's order is checked against that (the fills a reply lets go may come before fills
        # of other orders with lower trade ids, which are not repeats for it)
        self._replay_sure: dict[str, int] | None = None

    # -- client messages -------------------------------------------------------------------------

    def _count(self, now: float, size: int) -> bool | None:
        """Count ``size`` bytes received at ``now`` toward the rate limit (at least one unit):
        False below the limit, True past it, None when this reaches twice the limit."""
        second = int(now)
        if second != self._window:
            self._window, self._window_count = second, 0
        count = self._window_count = self._window_count + (-(-size // RATE_UNIT_BYTES) or 1)
        if count <= self.rate_limit:
            return False
        return None if count >= 2 * self.rate_limit else True

    def frame_received(self, now: float, size: int) -> list[Action]:
        """Count a frame that is not a whole text message (a ping, an unasked pong, a binary
        frame; a run of fragments of a message, ``size`` 0, the message counting when
        ``receive`` gets it whole) toward the rate limit: a ``Close`` when it reaches twice the
        limit."""
        if self._count(now, size) is None:
            return [Close(CLOSE_POLICY, "message rate limit exceeded")]
        return []

    def receive(self, data: str | bytes, now: float) -> list[Action]:
        """Act on one client message received at ``now`` (seconds, any monotonic clock)."""
        over_limit = self._count(now, len(data))
        if over_limit is None:  # the message that reaches twice the limit
            return [Close(CLOSE_POLICY, "message rate limit exceeded")]
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            if type(data) is bytes and not _is_utf8(data):  # not text at all: the endpoint must fail it
                return [Close(CLOSE_INVALID_DATA, "a text message that is not UTF-8")]
            if over_limit:
                return [Send(self._rate_limited(None))]
            return [Send(error("bad_json", f"not valid JSON: {e}"))]
        request_id = message.get("id") if type(message) is dict else None
        if request_id is not None and not _valid_request_id(request_id):
            request_id, bad_id = None, request_id
        else:
            bad_id = None
        if over_limit:  # read only to echo its id; not acted on
            return [Send(self._rate_limited(request_id))]
        if type(message) is not dict:
            return [Send(error("bad_json", f"a request is a JSON object, got {_json_kind(message)}"))]
        if bad_id is not None:
            # orjson reads an integer past 64 bits as a float: say so, not the float it became
            got = "a number past the 64-bit range" if type(bad_id) is float and abs(bad_id) >= 2.0 ** 63 \
                and bad_id.is_integer() else _show(bad_id)
            return [Send(error("invalid_field", "'id' must be a string of at most 64 characters or a 64-bit "
                               f"integer, got {got}"))]
        action = message.get("action")
        handler = _HANDLERS.get(action) if type(action) is str else None
        try:
            if handler is None:
                if action is None:
                    raise ClientError("missing_field", "'action' is missing (subscribe, unsubscribe, submit_order, "
                                      "cancel_order, amend_order, ping, symbols)")
                if type(action) is not str:
                    raise ClientError("invalid_field", f"'action' must be a string, got {_json_kind(action)}")
                raise ClientError("unknown_action", f"unknown action {_show(action)} (subscribe, unsubscribe, "
                                  "submit_order, cancel_order, amend_order, ping, symbols)")
            return handler(self, message, request_id)
        except ClientError as e:
            return [Send(error(e.code, str(e), request_id))]

    def _rate_limited(self, request_id: object) -> bytes:
        return error("rate_limited", f"more than {self.rate_limit} messages in one second: this one was not acted "
                     f"on; at {2 * self.rate_limit} the connection is closed", request_id)

    def _channel_names(self, message: dict[str, Any]) -> list[str]:
        has_one, has_many = message.get("channel") is not None, message.get("channels") is not None
        if has_one and has_many:
            raise ClientError("invalid_field", "give either 'channel' or 'channels', not both")
        if has_one:
            return [_name(message, "channel", "a channel name such as \"BTC-USDT\"")]
        if not has_many:
            raise ClientError("missing_field", "'channel' (or 'channels') is missing")
        names = _field(message, "channels", list, "a list of channel names")
        if not 0 < len(names) <= MAX_CHANNELS_PER_REQUEST:
            raise ClientError("invalid_field", f"'channels' must hold 1 to {MAX_CHANNELS_PER_REQUEST} names, "
                              f"got {len(names)}")
        for name in names:
            if type(name) is not str:
                raise ClientError("invalid_field", f"'channels' must hold strings, got {_json_kind(name)}")
            if not _is_name(name):
                raise ClientError("invalid_field", f"'channels' must hold names of 1 to {MAX_ID_CHARS} printable ASCII "
                                  f"characters, got {_show(name)}")
        return names

    def _subscribe(self, message: dict[str, Any], request_id: object) -> list[Action]:
        actions: list[Action] = []
        for name in self._channel_names(message):
            if name not in self.symbols:
                actions.append(Send(error("unknown_channel", f"no channel {_show(name)}; the symbols action "
                                          "lists them", request_id, channel=name)))
                continue
            actions.append(Send(_with_id({"type": "subscription_ack", "channel": name}, request_id)))
            if name not in self.channels:
                self.channels.append(name)
                actions.append(Subscribe(name))
        return actions

    def _unsubscribe(self, message: dict[str, Any], request_id: object) -> list[Action]:
        actions: list[Action] = []
        for name in self._channel_names(message):
            if name in self.channels:
                self.channels.remove(name)
                actions.append(Unsubscribe(name))
            actions.append(Send(_with_id({"type": "unsubscription_ack", "channel": name}, request_id)))
        return actions

    def _ping(self, message: dict[str, Any], request_id: object) -> list[Action]:
        return [Send(_with_id({"type": "pong"}, request_id))]

    def _symbols(self, message: dict[str, Any], request_id: object) -> list[Action]:
        data = [spec.describe() for spec in self.symbols.values()]
        return [Send(_with_id({"type": "symbols", "data": data}, request_id))]

    def _order_id(self, message: dict[str, Any]) -> str:
        return _name(message, "order_id", "a string")

    def _symbol(self, message: dict[str, Any]) -> str:
        # a name no symbol can have is a malformed request, not an unknown symbol: it is not echoed back
        return _name(message, "symbol", "a symbol such as \"BTC-USDT\"")

    def _submit(self, message: dict[str, Any], request_id: object) -> list[Action]:
        order_id = self._order_id(message)
        symbol = self._symbol(message)
        side = _choice(message, "side", _SIDES, None)
        order_type = _choice(message, "type", _TYPES, "limit")
        time_in_force = _choice(message, "time_in_force", _TIFS, "gtc")
        price_text = message.get("price")
        if order_type is OrderType.LIMIT and price_text is None:
            raise ClientError("missing_field", "'price' is missing (a limit order needs a price, as a string)")
        if price_text is not None and type(price_text) is not str:
            raise ClientError("invalid_field", f"'price' must be a decimal string such as \"30000.5\", "
                              f"got {_json_kind(price_text)}")
        quantity_text = _field(message, "quantity", str, "a decimal string such as \"0.5\"")
        # a refusal here shows the order as it was sent, as the book's refusals show it
        echo = {"side": side.value, "type": order_type.value, "time_in_force": time_in_force.value,
                "price": price_text, "quantity": quantity_text}
        spec = self.symbols.get(symbol)
        if spec is None:
            return [Send(rejected(order_id, symbol, "unknown_symbol", f"no symbol {_show(symbol)} in this cluster",
                                  request_id, echo=echo))]
        if order_type is OrderType.MARKET and price_text is not None:
            return [Send(rejected(order_id, symbol, "invalid_price", "a market order carries no price",
                                  request_id, echo=echo))]
        if order_type is OrderType.MARKET and time_in_force is TimeInForce.POST_ONLY:
            return [Send(rejected(order_id, symbol, "invalid_field", "a market order cannot be post_only: it "
                                  "only takes liquidity", request_id, echo=echo))]
        try:
            price = None if price_text is None else spec.to_ticks(price_text)
            quantity = spec.to_lots(quantity_text)
        except InvalidNumber as e:
            return [Send(rejected(order_id, symbol, e.reason, str(e), request_id, echo=echo))]
        command = SubmitOrder(order_id, self.account, symbol, side, order_type, time_in_force, price, quantity)
        if self._maker_high is None:
            self._maker_high = {}
        self._maker_high.setdefault(symbol, 0)
        self._hold(symbol, order_id, submit=True)
        return [Submit(command, request_id)]

    def _cancel(self, message: dict[str, Any], request_id: object) -> list[Action]:
        order_id = self._order_id(message)
        symbol = self._symbol(message)
        if symbol not in self.symbols:  # refusals that name the order, as an amend's and the book's do
            return [Send(error("unknown_symbol", f"no symbol {_show(symbol)} in this cluster", request_id,
                               order_id=order_id, symbol=symbol))]
        return [Cancel(CancelOrder(order_id, self.account, symbol), request_id)]

    def _amend(self, message: dict[str, Any], request_id: object) -> list[Action]:
        order_id = self._order_id(message)
        symbol = self._symbol(message)
        texts = {}
        for name, example in (("price", "30000.5"), ("quantity", "0.5")):
            value = message.get(name)
            if value is not None and type(value) is not str:
                raise ClientError("invalid_field", f"{name!r} must be a decimal string such as \"{example}\", "
                                  f"got {_json_kind(value)}")
            texts[name] = value
        if texts["price"] is None and texts["quantity"] is None:
            raise ClientError("missing_field", "'price' or 'quantity' is missing (an amend changes one or both; "
                              "'quantity' is the new total, the filled part included)")
        spec = self.symbols.get(symbol)
        if spec is None:  # refusals that name the order, as the book's do
            return [Send(error("unknown_symbol", f"no symbol {_show(symbol)} in this cluster", request_id,
                               order_id=order_id, symbol=symbol))]
        try:
            price = None if texts["price"] is None else spec.to_ticks(texts["price"])
            quantity = None if texts["quantity"] is None else spec.to_lots(texts["quantity"])
        except InvalidNumber as e:
            return [Send(error(e.reason, str(e), request_id, order_id=order_id, symbol=symbol))]
        self._hold(symbol, order_id, submit=False)
        return [Amend(AmendOrder(order_id, self.account, symbol, price, quantity), request_id)]

    def _hold(self, symbol: str, order_id: str, *, submit: bool) -> None:
        """A submit or amend of the order is on its way: its fills as a maker wait for the reply."""
        if self._inflight is None:
            self._inflight = {}
        hold = self._inflight.get((symbol, order_id))
        if hold is None:
            hold = self._inflight[(symbol, order_id)] = _Hold()
        hold.requests += 1
        if submit:
            hold.submits += 1
            # a new order's fills come after every fill passed on now (or missing now)
            floor = self._sure(symbol) or 0
            hold.floor = floor if hold.floor is None else min(hold.floor, floor)

    # -- answers from the cluster -------------------------------------------------------------------

    def on_reply(self, command: SubmitOrder | CancelOrder | AmendOrder, request_id: object, status: str,
                 events: Iterable[Event], message: str = "", *, settle: bool = False,
                 late: bool = False) -> list[bytes]:
        """The messages for the router's reply to ``command`` (``status`` as in docs/wire.md, or
        ``unknown_outcome``: no answer, or none that could be read; the client is told
        ``unavailable``). ``settle``: the reply was held for fills asked again, which have come
        (or will not): it goes out whatever it shows. ``late``: the reply came after the request
        was answered ``unknown_outcome`` (pass ``request_id`` None): what it shows goes out all
        the same, without an ``id`` -- the command ran, or a refusal says it never will."""
        symbol, order_id = command.symbol, command.order_id
        events = tuple(events)
        if status == "ok" and events and not settle:
            replaying = self._replaying
            if replaying is None or symbol not in replaying:
                after = self._shows_missing(events)
                if after is None:
                    replaying = None
                else:  # the reply shows fills of its order that never came: they are asked for first
                    replaying = self._want_fills(symbol, after)
            if replaying is not None:
                # The matcher is being asked for fills of this symbol that the feed lost: the reply
                # waits for them, and goes where the book put it (end_fill_replay), so that a fill
                # never comes after the order's cancel or amend that the book made later.
                replaying[symbol].append(_HeldReply(command, request_id, status, events, message, late))
                return []
        spec = self.symbols[symbol]
        is_submit = type(command) is SubmitOrder
        holds = self._inflight
        hold = None
        if type(command) is not CancelOrder and not late and holds is not None:
            hold = holds.get((symbol, order_id))
            if hold is not None:  # this request is answered (a late answer was counted at its timeout)
                hold.requests -= 1
                hold.submits -= is_submit
        out = []
        if status != "ok":
            if late:
                if is_submit and self._filled:
                    self._filled.pop((symbol, order_id), None)  # refused: it never reached the book
            elif status == "unknown_outcome" and is_submit:
                # The order may be live: its later fills and replies are checked as a live
                # order's, from nothing filled (a cancel that shows a fill waits for it).
                submit: SubmitOrder = command  # type: ignore[assignment]
                self._passed(OrderAccepted(symbol, 0, 0, order_id, self.account, submit.side, submit.type,
                                           submit.time_in_force, submit.price, submit.quantity))
            reason = status if status in ("unknown_symbol", "unavailable") else "unavailable"
            text = message or status
            unknown = {"outcome_unknown": True} if status == "unknown_outcome" else {}
            if is_submit:
                out.append(rejected(order_id, symbol, reason, text, request_id, spec=spec, command=command,
                                    **unknown))
            else:
                out.append(error(reason, text, request_id, order_id=order_id, symbol=symbol, **unknown))
            events = ()
        # A late accepted shows nothing filled: left out if fills of the order went out first, or
        # it ended here meanwhile (its timeout made it live here, filled 0: see above)
        known = self._filled.get((symbol, order_id)) if self._filled else None
        stale = late and (known is None or known[0] > 0)
        for event in events:
            if getattr(event, "account", None) != self.account:
                continue  # public events and other accounts' fills are not this client's business
            if holds:
                # A fill of an order with a submit or amend in flight waited for its reply; those
                # the book made before this event go first (a cancel's, an amend's, a self-trade
                # cancel in another order's reply).
                out.extend(self._release(spec, (event.symbol, event.order_id), event.seq))  # type: ignore[attr-defined]
            if stale and type(event) is OrderAccepted:
                continue  # its fills came first (through the feed): an accepted, filled 0, would undo them
            update = order_update(spec, event, request_id, command if type(command) is not CancelOrder else None,
                                  self._kind(event))
            if update is not None:
                out.append(update)
                self._passed(event)
        if hold is not None and not hold.requests:
            # The order's last request in flight is answered: the rest of its held fills follow
            # (after an error status too, since a fill proves that an order whose reply was lost,
            # or timed out, is live).
            out.extend(self._release(spec, (symbol, order_id), None))
            del holds[(symbol, order_id)]  # type: ignore[index]
        return out

    def _release(self, spec: SymbolSpec, key: tuple[str, str], upto: int | None) -> list[bytes]:
        """The held fills of order ``key`` that the book made up to seq ``upto`` (all: None), as
        order_updates, unless a submit of the order is in flight and it is not live here (its
        ``accepted`` comes first; a submit of the id of a live order is one the book refuses)."""
        hold = self._inflight.get(key) if self._inflight else None
        if hold is None or not hold.fills or hold.submits and key not in (self._filled or ()):
            return []
        hold.fills.sort(key=_by_seq)  # they came by several ways (the feed, answers to fills asked again)
        if upto is None:
            fills, hold.fills = hold.fills, []
        else:
            fills = [fill for fill in hold.fills if fill.seq <= upto]
            if not fills:
                return []
            hold.fills = [fill for fill in hold.fills if fill.seq > upto]
        # Not checked again (on_private checked each as it was held, and a fill passed on since
        # then would have been held too): the order may have ended meanwhile, and trade ids
        # passed on since may be above a fill that waited.
        return self._maker_updates(spec, fills, held=True)

    def on_private(self, events: Iterable[Event], *, settle: bool = False) -> list[bytes]:
        """Messages for this account's private events published by a matcher.

        Only a resting order's fills are taken from this stream (``OrderFilled`` with
        ``maker``): every other private event of a command is in the reply to the command,
        which only this connection sent. A fill of an order whose own reply (to a submit or an
        amend) has not come yet is held until it has, so that ``accepted`` always comes first
        and an ``amended`` never shows a state that a fill already changed. A fill passed on
        already is dropped; one that shows earlier fills of its order missing waits for them
        (``fills_wanted``), unless ``settle`` (they were asked for already).
        """
        out = []
        for event in events:
            if type(event) is not OrderFilled or not event.maker or event.account != self.account:
                continue
            symbol = event.symbol
            replaying = self._replaying
            if replaying is not None and symbol in replaying:
                replaying[symbol].append(event)
                continue
            hold = self._inflight.get((symbol, event.order_id)) if self._inflight else None
            if hold is not None:
                # held until the reply; once (a fill asked again may be held already), and not at
                # all if it was passed on before (a fill of an order that ended, asked again while
                # an amend of it, or a submit of its id again, is in flight)
                if event not in hold.fills and not self._repeat(event):
                    hold.fills.append(event)
                continue
            if not settle:
                after = self._shows_missing((event,))
                if after is not None:
                    self._want_fills(symbol, after)[symbol].append(event)
                    continue
            spec = self.symbols.get(symbol)
            if spec is not None:
                out.extend(self._maker_updates(spec, (event,)))
        return out

    def _maker_updates(self, spec: SymbolSpec, fills: Iterable[OrderFilled], *, held: bool = False) -> list[bytes]:
        """The order_updates of resting orders' fills, each passed on once (``_repeat``;
        ``held``: fills that waited for their order's replies, checked as they were held)."""
        out = []
        high = self._maker_high or {}
        for fill in fills:
            if self._repeat(fill, held):
                continue
            last = high.get(fill.symbol)
            if last is not None and fill.trade_id > last:
                high[fill.symbol] = fill.trade_id
            if self._passed_trades is None:
                self._passed_trades = {}
            recent = self._passed_trades.get(fill.symbol)
            if recent is None:
                recent = self._passed_trades[fill.symbol] = _Passed()
            recent.add(fill.trade_id, fill.seq,
                       PASSED_TRADES_IN_DOUBT if self._in_doubt(fill.symbol) else PASSED_TRADES)
            update = order_update(spec, fill, order_kind=self._kind(fill))  # before _passed ends the order
            self._passed(fill)
            out.append(update)  # type: ignore[arg-type]
        return out

    def _repeat(self, fill: OrderFilled, held: bool = False) -> bool:
        """Whether ``fill`` was passed on already. While fills of its symbol may be missing
        (``fills_lost``), every fill passed on above the trade id they may be missing after is
        remembered: one above it is a repeat if and only if it was. Else a fill of a live order
        here that shows no more filled than was passed on came already (asked again, then
        live), and so did one of another order (ended here) whose trade id is not above the
        last passed on (for a new order whose submit is in flight: not above the last passed on
        when it was sent). A ``held`` fill (it waited for its order's replies) was checked when
        it began to wait: only its trade id passed on since makes it a repeat (what its order's
        replies let go meanwhile at a give-up, an ``amended`` that shows it filled, does not)."""
        symbol = fill.symbol
        recent = self._passed_trades.get(symbol) if self._passed_trades else None
        if recent is not None and fill.trade_id in recent:
            return True
        sure = self._sure(symbol)
        if sure is not None and fill.trade_id > sure and self._in_doubt(symbol):
            return False  # remembered above it: never passed on
        if held:
            return False
        key = (symbol, fill.order_id)
        tracked = self._filled
        known = tracked.get(key) if tracked else None
        if known is not None:
            return fill.filled <= known[0]
        # (a new order's fills, its submit in flight: above the last passed on when it was sent)
        return sure is not None and fill.trade_id <= self._new_order_floor(key)

    def _new_order_floor(self, key: tuple[str, str]) -> int:
        """A trade id below every fill of new order ``key``: the last passed on, or the one when
        its submit was sent, if lower (whether its reply is here or still on its way)."""
        hold = self._inflight.get(key) if self._inflight else None
        sure = self._sure(key[0]) or 0
        return sure if hold is None or hold.floor is None else min(sure, hold.floor)

    def _in_doubt(self, symbol: str) -> bool:
        """Whether fills of ``symbol`` may be missing since a trade id (``fills_lost``), to be
        asked for or asked for now."""
        return bool(self._ask_floor and symbol in self._ask_floor or self._asking and symbol in self._asking)

    def _sure(self, symbol: str) -> int | None:
        """The trade id up to which every fill of this account's resting orders on ``symbol``
        was passed on: the last one passed on, or below it a trade id after which fills may
        still be missing, asked for or to be asked for (``None``: no order placed there)."""
        last = (self._maker_high or {}).get(symbol)
        if last is not None:
            for doubt in (self._ask_floor, self._asking, self._replay_sure):
                if doubt and symbol in doubt:
                    last = min(last, doubt[symbol])
        return last

    def _kind(self, event: Event) -> tuple[str, str] | None:
        """The type and time in force of the live order of this connection that ``event`` is of."""
        key = (event.symbol, event.order_id)  # type: ignore[union-attr]
        state = self._filled.get(key) if self._filled else None
        if state is None:
            return self._ended.get(key) if self._ended else None  # (a fill that was missing, after its end)
        return state[2:]  # type: ignore[return-value]

    def _end(self, key: tuple[str, str], known: tuple[int, int, str, str]) -> None:
        """Order ``key`` ended here."""
        del self._filled[key]  # type: ignore[union-attr]
        if self._in_doubt(key[0]):  # (the last PASSED_TRADES of them: a late fill comes soon after)
            if self._ended is None:
                self._ended = {}
            self._ended[key] = known[2:]  # type: ignore[assignment]
            if len(self._ended) > PASSED_TRADES:
                del self._ended[next(iter(self._ended))]

    def _passed(self, event: Event) -> None:
        """What an event passed on to the client says of its order's fills (``_filled``)."""
        kind = type(event)
        tracked = self._filled
        key = (event.symbol, event.order_id)  # type: ignore[union-attr]
        if kind is OrderAccepted:
            if tracked is None:
                tracked = self._filled = {}
            elif key in tracked:
                # The late reply of an order whose request timed out (it was taken as live then),
                # behind fills of the order that came first: what they showed stands.
                return
            # every fill of the order comes after the last one of the symbol passed on when it
            # was sent (or after fills that may still be missing)
            tracked[key] = (0, self._new_order_floor(key),
                            event.type.value, event.time_in_force.value)  # type: ignore[union-attr]
            return
        known = tracked.get(key) if tracked is not None else None
        if known is None:
            return
        if kind is OrderFilled:
            if event.remaining:  # type: ignore[union-attr]
                # (a fill that was missing may come after later ones: it lowers nothing)
                tracked[key] = (max(known[0], event.filled), max(known[1], event.trade_id),  # type: ignore[union-attr]
                                known[2], known[3])
            else:
                self._end(key, known)
        elif kind is OrderCanceled or (kind is CancelRejected or kind is AmendRejected) and \
                event.reason == "unknown_order":  # type: ignore[union-attr]
            self._end(key, known)  # (an unknown_order: it ended unseen, or was never placed)
        elif kind is OrderAmended:  # a late one may show less filled than fills passed on before it
            filled = max(known[0], event.quantity - event.remaining)  # type: ignore[union-attr]
            tracked[key] = (filled, known[1], known[2], known[3])  # type: ignore[union-attr]

    def _shows_missing(self, events: Iterable[Event]) -> int | None:
        """If one of ``events`` (a reply's, in order, or one fill), of a live order of this
        connection, shows more filled before it than the messages passed on and the events and
        held fills before it in the book's order did, or refuses a cancel or amend as
        ``unknown_order`` (it ended, so fills made it end); or if a fill held for the order's
        reply (the ``accepted`` of a new order among ``events``) does so: the trade id after
        which its missing fills are. Else None."""
        tracked = self._filled or {}
        inflight = self._inflight or {}
        if not tracked and not inflight:
            return None
        # (symbol, order_id) -> its steps in the book's order: (seq, an event after a held fill at
        # the same seq, filled before, filled after); before -1: it ended
        steps: dict[tuple[str, str], list[tuple[int, int, int, int]]] = {}
        for event in events:
            kind = type(event)
            if kind is OrderFilled:
                before = event.filled - event.quantity  # type: ignore[union-attr]
                after = event.filled  # type: ignore[union-attr]
            elif kind is OrderCanceled:
                before = after = event.filled  # type: ignore[union-attr]
            elif kind is OrderAmended:
                before = after = event.quantity - event.remaining  # type: ignore[union-attr]
            elif (kind is CancelRejected or kind is AmendRejected) and event.reason == "unknown_order":
                before = after = -1  # ended: shown below as missing, if the order is live here
            elif kind is OrderAccepted:
                before = after = 0  # a new order: its held fills start from nothing
            else:
                before = after = None  # says nothing of fills, but lets go held ones (on_reply)
            if getattr(event, "account", None) != self.account:
                continue
            key = (event.symbol, event.order_id)  # type: ignore[union-attr]
            if key in tracked:
                if kind is OrderAccepted:
                    before = None  # a late one: the order is live here already, at what it shows
            elif key not in steps and (kind is not OrderAccepted or key not in inflight):
                continue  # not a live order of this connection (yet; a new one from its accepted on)
            chain = steps.setdefault(key, [])
            if before is not None:
                chain.append((event.seq, 1, before, after))  # type: ignore[union-attr,arg-type]
        for key, chain in steps.items():
            hold = inflight.get(key)
            if hold is not None and hold.fills:
                chain += [(fill.seq, 0, fill.filled - fill.quantity, fill.filled) for fill in hold.fills]
                chain.sort(key=_first_two)  # stable: a reply's events keep their order
            state = tracked.get(key)
            known = state[0] if state is not None else 0
            for _, _, before, after in chain:
                if before > known or before < 0:
                    return state[1] if state is not None else self._new_order_floor(key)
                known = after
        return None

    def _want_fills(self, symbol: str, after: int) -> dict[str, list[OrderFilled | _HeldReply]]:
        """An order's own event proved fills of ``symbol`` after trade id ``after`` missing: what
        comes on it is held, and the gateway asks the matcher for them (``fills_wanted``). The
        hold, to append to."""
        if self.fills_wanted is None:
            self.fills_wanted = {}
        self.fills_wanted[symbol] = min(after, self.fills_wanted.get(symbol, after))
        if self._replaying is None:
            self._replaying = {}
        self._replaying.setdefault(symbol, [])
        return self._replaying

    # -- fills a gateway's feed lost (docs/protocol.md, "Orders") -----------------------------------

    def begin_fill_replay(self, symbols: Iterable[str]) -> dict[str, int] | None:
        """The gateway lost the feed of ``symbols`` (one matcher's) for a while: the fills of
        this account's resting orders made meanwhile never came. For those of ``symbols`` it
        placed orders on: ``{symbol: trade id of the last such fill passed on (0: none)}``,
        what the gateway asks the matcher for (its fills after these); ``None`` if it placed
        none. Until ``end_fill_replay`` the fills arriving live on these symbols, and the
        replies to this account's orders on them, are held, so that everything goes out in the
        book's order."""
        high = self._maker_high
        if not high:
            return None
        wanted = self.fills_wanted or {}
        floor = self._ask_floor or {}
        lost = {symbol: floor.pop(symbol) for symbol in symbols if symbol in floor}
        asked = {symbol: min(high[symbol], wanted.pop(symbol, high[symbol]), lost.get(symbol, high[symbol]))
                 for symbol in symbols if symbol in high}
        if not wanted:
            self.fills_wanted = None
        if not floor:
            self._ask_floor = None
        if not asked:
            return None
        if self._replaying is None:
            self._replaying = {}
        for symbol in asked:
            self._replaying.setdefault(symbol, [])
            if symbol in lost:  # in doubt until the answer is in (fills only wanted are not: _repeat)
                if self._asking is None:
                    self._asking = {}
                self._asking[symbol] = min(lost[symbol], self._asking.get(symbol, lost[symbol]))
        return asked

    def fills_lost(self, symbols: Iterable[str]) -> None:
        """The gateway's feed of ``symbols`` lost publications (its connection was cut, or it was
        lost again while the matcher was asked), or the matcher did not answer a request for
        fills in time (the gateway gave up): fills after those passed on
        until now may be missing. The next ``begin_fill_replay`` asks from no higher than now
        (nor than a request in flight asked), whatever fills pass on before it, and until its
        answer is in a fill above that is checked as new (``_repeat``)."""
        for symbol in symbols:
            sure = self._sure(symbol)
            if sure is not None:
                self._lower_floor(symbol, sure)

    def _lower_floor(self, symbol: str, floor: int) -> None:
        """Fills of ``symbol`` after trade id ``floor`` may be missing (``_ask_floor``)."""
        if self._ask_floor is None:
            self._ask_floor = {}
        self._ask_floor[symbol] = min(floor, self._ask_floor.get(symbol, floor))

    def fills_lost_after(self, symbol: str, seq: int) -> None:
        """The feed of ``symbol`` lost publications after ``seq`` (a gap the next one showed):
        ``fills_lost``, from below the fills passed on since that were made after ``seq``. Those
        came past the gap: a high-water mark drops messages, not a stretch of them, and an
        account's fills go out after their command's public part, so some may get through
        before a public message shows the gap. The floor is the highest trade id passed on that
        was made up to ``seq``; if every one kept was made after it, the lowest kept (or 0, if
        none was ever forgotten). Every fill passed on above the floor is kept (``_Passed``),
        so none of them comes twice."""
        sure = self._sure(symbol)
        if sure is None:
            return
        recent = self._passed_trades.get(symbol) if self._passed_trades else None
        if recent:
            made_before = [trade_id for trade_id, made in recent.seqs.items() if made <= seq]
            if made_before:
                sure = min(sure, max(made_before))
            else:
                sure = min(sure, recent.ids[0] if len(recent) >= PASSED_TRADES else 0)
        self._lower_floor(symbol, sure)

    def end_fill_replay(self, symbols: Iterable[str], fills: Iterable[Event],
                        upto: Mapping[str, int] | None = None) -> list[bytes]:
        """The matcher's answer to ``begin_fill_replay(symbols)``: its fills of this account's
        resting orders (``()`` when the gateway gave up asking), whole up to each symbol's seq
        in ``upto`` (None: not said). With the live fills and the replies held meanwhile, each
        fill not passed on yet is passed on once, and each reply, in the book's order (by
        ``seq``). A reply past ``upto`` (the matcher ran its command after it answered) is
        checked as if it came now: if it shows fills missing, it and what follows it wait for
        another answer (``fills_wanted``). So is everything of a symbol where a gap lowered the
        floor below what was asked while the request was on its way (``fills_lost_after``): the
        answer does not reach down there. ``symbols``: what ``begin_fill_replay`` returned (the
        trade ids asked after), or only the symbols (then the floors of losses asked for count)."""
        asked = symbols if isinstance(symbols, Mapping) else dict(self._asking or {})
        symbols = list(symbols)
        self._replay_sure = {symbol: sure for symbol in symbols if (sure := self._sure(symbol)) is not None}
        try:
            return self._end_fill_replay(symbols, fills, upto, asked)
        finally:
            self._replay_sure = None

    def _end_fill_replay(self, symbols: list[str], fills: Iterable[Event], upto: Mapping[str, int] | None,
                         asked: Mapping[str, int]) -> list[bytes]:
        merged: dict[tuple[str, int], OrderFilled] = {}
        replies: list[_HeldReply] = []
        replaying = self._replaying or {}
        for item in (*fills, *(item for symbol in symbols for item in replaying.pop(symbol, ()))):
            if type(item) is _HeldReply:
                replies.append(item)
            elif type(item) is OrderFilled and item.maker:
                merged[(item.symbol, item.trade_id)] = item
        if not replaying:
            self._replaying = None
        floor = self._ask_floor
        if floor and upto is not None:
            # A gap (fills_lost_after) lowered the floor below what was asked, the request on its
            # way: the answer does not reach down there, and settles nothing of those symbols.
            # (Not a give-up, upto None: what was held goes out then, as docs/protocol.md says.)
            below = {symbol: -1 for symbol in symbols
                     if symbol in floor and symbol in asked and floor[symbol] < asked[symbol]}
            if below:
                upto = {**upto, **below}
        tracked, inflight, sure = self._filled or {}, self._inflight or {}, self._sure
        out = []
        # A fill of an order with a submit or amend in flight joins the fills held for its
        # replies first (on_private holds it once), so that they go out together in the book's
        # order, whichever of the replies below lets them go. Else a fill is new if its order is
        # live here and it shows more filled than was passed on (_maker_updates), or its trade id
        # is above the last one passed on (the order ended here, or its reply timed out).
        # (symbol, seq, a fill before a reply, then trade id or arrival): unique, so the items are
        # never compared. A reply at the seq of a fill is a refusal (it moved nothing), which
        # came after the command that made that seq.
        order: list[tuple[str, int, int, int, Any]] = []
        for (_, trade_id), fill in merged.items():
            key = (fill.symbol, fill.order_id)
            if key in inflight:
                out += self.on_private((fill,), settle=True)
            elif key in tracked or trade_id > (sure(fill.symbol) or 0):
                order.append((fill.symbol, fill.seq, 0, trade_id, fill))
        order += [(reply.command.symbol, reply.events[0].seq, 1, n, reply) for n, reply in enumerate(replies)]
        waiting: set[str] = set()  # symbols where a reply past the answer waits for another one
        for symbol, seq, *_, item in sorted(order, key=lambda entry: entry[:4]):
            if symbol in waiting:
                self._replaying[symbol].append(item)  # type: ignore[index]  # behind that reply
            elif type(item) is not _HeldReply:
                # a fill past the answer (it came live) may show one lost after the answer was made
                out += self.on_private((item,), settle=upto is None or seq <= upto.get(symbol, seq))
                if self._replaying is not None and symbol in self._replaying:
                    waiting.add(symbol)
            elif upto is None or seq <= upto.get(symbol, seq) and not self._holds_past(item.command, upto):
                out += self.on_reply(*item[:5], settle=True, late=item.late)
            else:  # past the answer, or it lets go held fills past it: checked as if it came now
                out += self.on_reply(*item[:5], late=item.late)
                if self._replaying is not None and symbol in self._replaying:
                    waiting.add(symbol)
        if self._asking:
            for symbol in symbols:
                self._asking.pop(symbol, None)
            if not self._asking:
                self._asking = None
        for symbol in symbols:
            if self._in_doubt(symbol):
                continue
            recent = self._passed_trades.get(symbol) if self._passed_trades else None
            if recent is not None:
                recent.keep(PASSED_TRADES)  # the doubt is over: back to the highest PASSED_TRADES
        return out

    def _forget_ended(self, symbol: str) -> None:
        if self._ended:
            for key in [key for key in self._ended if key[0] == symbol]:
                del self._ended[key]
            if not self._ended:
                self._ended = None

    def _holds_past(self, command: SubmitOrder | CancelOrder | AmendOrder, upto: Mapping[str, int]) -> bool:
        """Whether fills held for ``command``'s order were made past ``upto`` (a fill lost
        before them would not be in the answer)."""
        hold = self._inflight.get((command.symbol, command.order_id)) if self._inflight else None
        last = upto.get(command.symbol)
        return hold is not None and last is not None and any(fill.seq > last for fill in hold.fills)

    def forget_fills(self, symbol: str) -> None:
        """The matcher of ``symbol`` came back without its history: its trade ids start again."""
        if self._maker_high is not None and symbol in self._maker_high:
            self._maker_high[symbol] = 0
        if self._passed_trades:
            self._passed_trades.pop(symbol, None)
        for doubt in (self._ask_floor, self._asking):
            if doubt:
                doubt.pop(symbol, None)  # trade ids of its old life
        self._forget_ended(symbol)
        if self._filled:
            for key in [key for key in self._filled if key[0] == symbol]:
                del self._filled[key]  # its orders went with its history


def _first_two(step: tuple[int, int, int, int]) -> tuple[int, int]:
    return step[0], step[1]


def _by_seq(fill: OrderFilled) -> int:
    return fill.seq


class _Passed:
    """The trade ids of one symbol's fills passed on to a connection, each with its seq: the
    highest ``bound`` of them, so that every fill passed on above the lowest one kept is kept
    (fills are passed on out of trade id order at times: held ones, answers)."""

    __slots__ = ("ids", "seqs")

    def __init__(self) -> None:
        self.seqs: dict[int, int] = {}  # trade id -> seq
        self.ids: list[int] = []  # the same trade ids, a heap: the lowest first

    def __contains__(self, trade_id: int) -> bool:
        return trade_id in self.seqs

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, trade_id: int, seq: int, bound: int) -> None:
        """Keep ``trade_id`` (not kept yet: ``Session._repeat`` is asked first)."""
        self.seqs[trade_id] = seq
        heappush(self.ids, trade_id)
        self.keep(bound)

    def keep(self, bound: int) -> None:
        """Forget the lowest trade ids past ``bound``."""
        seqs, ids = self.seqs, self.ids
        while len(ids) > bound:
            seqs.pop(heappop(ids), None)


class _Hold:
    """An order's submits and amends in flight (``requests``, ``submits`` of them) and its fills
    as a maker that arrived meanwhile, each to go out where the book put it among the replies'
    updates (by ``seq``), never before the order's ``accepted``."""

    __slots__ = ("fills", "floor", "requests", "submits")

    def __init__(self) -> None:
        self.fills: list[OrderFilled] = []
        self.requests = 0
        self.submits = 0
        self.floor: int | None = None  # a trade id below every fill of the order, if a submit was sent


class _HeldReply(NamedTuple):
    """A reply held while the fills of its symbol are asked again (``Session.on_reply``'s arguments)."""

    command: SubmitOrder | CancelOrder | AmendOrder
    request_id: object
    status: str
    events: tuple[Event, ...]
    message: str
    late: bool  # the answer to a request told unknown_outcome already (counted out of its hold then)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _valid_request_id(value: object) -> bool:
    if type(value) is str:
        return len(value) <= MAX_ID_CHARS
    return type(value) is int and -_MAX_INT_ID - 1 <= value <= _MAX_INT_ID


_HANDLERS = {
    "subscribe": Session._subscribe,
    "unsubscribe": Session._unsubscribe,
    "submit_order": Session._submit,
    "cancel_order": Session._cancel,
    "amend_order": Session._amend,
    "ping": Session._ping,
    "symbols": Session._symbols,
}


# -- one symbol's channel -------------------------------------------------------------------------

class Channel:
    """One symbol's channel: the gateway's L2 mirror of the book and the messages it becomes.

    Feed it the symbol's publications (``publish``) and snapshots (``load_snapshot``); each
    returns the JSON messages that every subscriber gets, in order. ``snapshot_message`` is
    what a new (or resynced) subscriber gets first. While the mirror is not synced the
    channel sends nothing: updates are buffered in the mirror, ``needs_snapshot`` is true.
    """

    __slots__ = ("_snapshot", "last_ts", "mirror", "spec", "symbol")

    def __init__(self, spec: SymbolSpec) -> None:
        self.spec = spec
        self.symbol = spec.symbol
        self.mirror = L2Mirror(spec.symbol)
        self.last_ts = 0
        self._snapshot: bytes | None = None  # cached depth_snapshot of the current seq

    @property
    def synced(self) -> bool:
        return self.mirror.synced

    @property
    def seq(self) -> int | None:
        return self.mirror.seq

    def publish(self, events: Iterable[Event]) -> list[bytes]:
        """The channel messages of one publication (one command's public events).

        Raises ``SequenceGap`` when the mirror sees a gap: the caller fetches a snapshot and
        calls ``load_snapshot``.
        """
        mirror = self.mirror
        if not mirror.synced:
            for event in events:
                if type(event) is BookChanged:
                    mirror.apply(event)  # buffered until the snapshot
            return []
        out: list[bytes] = []
        trades = []
        for event in events:
            kind = type(event)
            if kind is TradeOccurred:
                trades.append(event)
            elif kind is BookChanged:
                prev_seq = mirror.seq
                if not mirror.apply(event):  # a repeat of what the snapshot held already
                    trades.clear()
                    continue
                self._snapshot = None
                self.last_ts = event.ts_ns
                out.extend(self._trade(t) for t in trades)
                trades.clear()
                out.append(self._update(event, prev_seq))
        return out

    def load_snapshot(self, seq: int, bids: Iterable[Level], asks: Iterable[Level], *,
                      changed_ns: int | None = None) -> bytes:
        """Load a snapshot from the matcher; the ``depth_snapshot`` every subscriber now gets
        (the buffered updates after ``seq`` are in it). ``changed_ns``: when the book last
        changed at the matcher, as of ``seq`` (0: never; None: not told, an older matcher).
        ``SequenceGap`` if the buffer cannot be bridged: ask for a newer snapshot."""
        applied = self.mirror.load_snapshot(seq, bids, asks)
        if applied:
            self.last_ts = applied[-1].ts_ns
        elif changed_ns is not None:
            self.last_ts = changed_ns
        self._snapshot = None
        return self.snapshot_message()

    def reset(self) -> None:
        """Forget the book (the matcher restarted or the feed broke): unsynced until the next snapshot."""
        self.mirror.reset()
        self._snapshot = None

    def snapshot_message(self) -> bytes:
        """The ``depth_snapshot`` of the book as it is now (synced channels only)."""
        if self._snapshot is None:
            spec, mirror = self.spec, self.mirror
            bids, asks = mirror.levels()
            self._snapshot = orjson.dumps({
                "channel": self.symbol, "type": "depth_snapshot",
                "data": {"seq": mirror.seq, "bids": mirror.texts(spec, bids), "asks": mirror.texts(spec, asks),
                         "checksum": mirror.checksum(spec), "ts": self.last_ts}})
        return self._snapshot

    def heartbeat_message(self) -> bytes:
        return orjson.dumps({"channel": self.symbol, "type": "heartbeat", "data": {"seq": self.mirror.seq}})

    def _update(self, change: BookChanged, prev_seq: int | None) -> bytes:
        spec, mirror = self.spec, self.mirror
        bids, asks = change.bids, change.asks  # most updates change one side only
        return orjson.dumps({
            "channel": self.symbol, "type": "depth_update",
            "data": {"seq": change.seq, "prev_seq": prev_seq,
                     "bids": mirror.texts(spec, bids) if bids else [], "asks": mirror.texts(spec, asks) if asks else [],
                     "checksum": mirror.checksum(spec), "ts": change.ts_ns}})

    def _trade(self, trade: TradeOccurred) -> bytes:
        # the mirror's memo of price and quantity texts: a trade's price is a level's price
        (price, quantity), = self.mirror.texts(self.spec, ((trade.price, trade.quantity),))
        return orjson.dumps({
            "channel": self.symbol, "type": "trade",
            "data": {"seq": trade.seq, "trade_id": trade.trade_id, "price": price, "quantity": quantity,
                     "taker_side": trade.taker_side.value, "ts": trade.ts_ns}})
