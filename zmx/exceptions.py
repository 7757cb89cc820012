"""One exception tree for the whole project."""


class ZmxError(Exception):
    """Base of every error zmx raises on purpose."""


class TopologyError(ZmxError):
    """A topology file is unreadable or breaks a rule; the message names the place."""


class InvalidNumber(ZmxError, ValueError):
    """A decimal string is not a valid price or quantity for a symbol.

    ``reason`` is the machine-readable code that reaches clients
    (``invalid_price`` or ``invalid_quantity``).
    """

    def __init__(self, message: str, reason: str = "invalid_quantity") -> None:
        super().__init__(message)
        self.reason = reason


class InvalidOrder(ZmxError, ValueError):
    """An order a client was asked to send has a field the cluster does not take (a side, type or
    time in force it does not know, a symbol its topology does not have)."""


class ProtocolError(ZmxError):
    """Something received from a peer does not follow the protocol."""


class DecodeError(ProtocolError):
    """Bytes that are not a valid zmx wire message."""


class ClientError(ProtocolError):
    """A client message that is well-formed JSON but not a valid request.

    ``code`` is the error code sent back (``bad_json``, ``missing_field`` ...).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class SequenceGap(ZmxError):
    """An update does not follow the last one applied: something was missed.

    The holder of a mirror resynchronises from a fresh snapshot.
    """

    def __init__(self, symbol: str, expected: int, got: int) -> None:
        super().__init__(f"{symbol}: expected seq {expected}, got {got}")
        self.symbol = symbol
        self.expected = expected
        self.got = got
