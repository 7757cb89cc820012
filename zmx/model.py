"""Domain vocabulary: sides, order types, time in force, and a symbol's number grid.

Prices and quantities are decimal strings at every public edge and integers inside:
a price is a count of ``tick_size`` ticks, a quantity a count of ``lot_size`` lots.
A string that is not exactly on the grid is rejected, never rounded. No floats.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

from zmx.exceptions import InvalidNumber


class Side(str, Enum):
    BUY = "buy"
    SELL = "sell"

    @property
    def opposite(self) -> Side:
        return Side.SELL if self is Side.BUY else Side.BUY


class OrderType(str, Enum):
    LIMIT = "limit"
    MARKET = "market"


class TimeInForce(str, Enum):
    GTC = "gtc"
    IOC = "ioc"
    FOK = "fok"
    POST_ONLY = "post_only"


# Decimal strings: plain digits with an optional fraction. No sign, exponent, spaces,
# underscores, NaN or Infinity. [0-9] and not \d: \d also matches other scripts' digits.
_DECIMAL = re.compile(r"([0-9]+)(?:\.([0-9]+))?")
MAX_DECIMAL_LENGTH = 32
# Integers inside must fit a signed 64-bit word (msgpack, journals, other languages).
MAX_UNITS = 2**63 - 1

_SYMBOL = re.compile(r"[A-Z0-9]{1,15}(?:[-_/][A-Z0-9]{1,15}){0,2}")


def parse_decimal(text: object, what: str = "value") -> tuple[int, int]:
    """Parse a non-negative decimal string into ``(digits, scale)``: ``"30000.5"`` -> ``(300005, 1)``.

    Raises ``InvalidNumber`` (reason ``invalid_<what>``-style codes are chosen by callers).
    """
    if not isinstance(text, str):
        raise InvalidNumber(f"{what} must be a decimal string like \"30000.5\", got {type(text).__name__}")
    if len(text) > MAX_DECIMAL_LENGTH:
        raise InvalidNumber(f"{what} is too long ({len(text)} characters, at most {MAX_DECIMAL_LENGTH})")
    m = _DECIMAL.fullmatch(text)
    if m is None:
        if text == "":
            raise InvalidNumber(f"{what} is empty")
        raise InvalidNumber(f"{what} {text!r} is not a plain decimal number "
                            "(digits with an optional fraction, no sign or exponent)")
    whole, frac = m.group(1), m.group(2) or ""
    return int(whole + frac), len(frac)


def format_units(units: int, scale: int) -> str:
    """The shortest decimal string for ``units * 10**-scale``: ``(300005, 1)`` -> ``"30000.5"``."""
    if scale == 0:
        return str(units)
    whole, frac = divmod(units, 10**scale)
    if frac == 0:
        return str(whole)
    return f"{whole}.{frac:0{scale}d}".rstrip("0")


@dataclass(frozen=True, slots=True)
class SymbolSpec:
    """A tradable symbol and its grid.

    ``tick_size`` and ``lot_size`` are positive decimal strings. ``min_quantity`` defaults
    to one lot; ``max_quantity`` defaults to no limit but the 64-bit one.
    """

    symbol: str
    tick_size: str
    lot_size: str
    min_quantity: str | None = None
    max_quantity: str | None = None
    # Derived grid, computed once.
    _tick_units: int = field(init=False, repr=False, compare=False)
    _tick_scale: int = field(init=False, repr=False, compare=False)
    _lot_units: int = field(init=False, repr=False, compare=False)
    _lot_scale: int = field(init=False, repr=False, compare=False)
    min_lots: int = field(init=False, repr=False, compare=False)
    max_lots: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.symbol, str) or _SYMBOL.fullmatch(self.symbol) is None:
            raise InvalidNumber(
                f"symbol {self.symbol!r} is not a valid name (1 to 3 parts of 1 to 15 upper-case letters and "
                "digits, joined by '-', '_' or '/', like BTC-USDT)", "unknown_symbol")
        for name, prefix in (("tick_size", "_tick"), ("lot_size", "_lot")):
            units, scale = parse_decimal(getattr(self, name), name)
            if units == 0:
                raise InvalidNumber(f"{name} must be greater than zero")
            if 10**scale // units > MAX_UNITS:  # then no price (or quantity) of 1 or more would fit
                raise InvalidNumber(f"{name} {getattr(self, name)} is too small: 1 would be more than 2^63 - 1 "
                                    f"steps of it")
            object.__setattr__(self, prefix + "_units", units)
            object.__setattr__(self, prefix + "_scale", scale)
        min_lots = 1 if self.min_quantity is None else self._lots(self.min_quantity, "min_quantity")
        max_lots = MAX_UNITS if self.max_quantity is None else self._lots(self.max_quantity, "max_quantity")
        if min_lots > max_lots:
            raise InvalidNumber(f"min_quantity {self.min_quantity} is above max_quantity {self.max_quantity}")
        object.__setattr__(self, "min_lots", min_lots)
        object.__setattr__(self, "max_lots", max_lots)

    # -- decimal string -> integer -------------------------------------------------------

    @staticmethod
    def _on_grid(text: object, what: str, step_units: int, step_scale: int) -> int:
        digits, scale = parse_decimal(text, what)
        if scale > step_scale:
            digits, extra = divmod(digits, 10 ** (scale - step_scale))
            if extra:
                raise InvalidNumber(f"{what} {text} has more decimals than the grid allows")
        else:
            digits *= 10 ** (step_scale - scale)
        count, rest = divmod(digits, step_units)
        if rest:
            raise InvalidNumber(f"{what} {text} is not a multiple of {format_units(step_units, step_scale)}")
        if count == 0:
            raise InvalidNumber(f"{what} must be greater than zero")
        if count > MAX_UNITS:
            raise InvalidNumber(f"{what} {text} is too large")
        return count

    def _lots(self, text: object, what: str) -> int:
        return self._on_grid(text, what, self._lot_units, self._lot_scale)

    def to_ticks(self, price: object) -> int:
        """``"30000.01"`` -> ticks. Raises ``InvalidNumber`` with reason ``invalid_price``."""
        try:
            return self._on_grid(price, "price", self._tick_units, self._tick_scale)
        except InvalidNumber as e:
            raise InvalidNumber(f"{self.symbol}: {e} (tick_size {self.tick_size})", "invalid_price") from None

    def to_lots(self, quantity: object) -> int:
        """``"0.5"`` -> lots, within min/max. Raises ``InvalidNumber`` with reason ``invalid_quantity``."""
        try:
            lots = self._lots(quantity, "quantity")
        except InvalidNumber as e:
            raise InvalidNumber(f"{self.symbol}: {e} (lot_size {self.lot_size})", "invalid_quantity") from None
        if lots < self.min_lots:
            raise InvalidNumber(f"{self.symbol}: quantity {quantity} is below the minimum quantity "
                                f"{self.lots_to_quantity(self.min_lots)}", "invalid_quantity")
        if lots > self.max_lots:
            raise InvalidNumber(f"{self.symbol}: quantity {quantity} is above the maximum quantity "
                                f"{self.lots_to_quantity(self.max_lots)}", "invalid_quantity")
        return lots

    # -- integer -> decimal string ---------------------------------------------------------

    def ticks_to_price(self, ticks: int) -> str:
        return format_units(ticks * self._tick_units, self._tick_scale)

    def lots_to_quantity(self, lots: int) -> str:
        return format_units(lots * self._lot_units, self._lot_scale)

    def describe(self) -> dict[str, str]:
        """The public description sent to clients (``symbols`` action)."""
        return {
            "symbol": self.symbol,
            "tick_size": self.ticks_to_price(1),
            "lot_size": self.lots_to_quantity(1),
            "min_quantity": self.lots_to_quantity(self.min_lots),
            "max_quantity": self.lots_to_quantity(self.max_lots),
        }
