"""Commands: what a client asks a matching engine to do (imperative names).

Prices are integer ticks and quantities integer lots of the symbol's ``SymbolSpec``;
the edges (gateway, client SDK) convert decimal strings before building a command.
"""

from __future__ import annotations

from typing import NamedTuple, Union

from zmx._record import typed_equality
from zmx.model import OrderType, Side, TimeInForce


@typed_equality
class SubmitOrder(NamedTuple):
    order_id: str
    account: str
    symbol: str
    side: Side
    type: OrderType
    time_in_force: TimeInForce
    price: int | None  # ticks; None for a market order
    quantity: int  # lots


@typed_equality
class CancelOrder(NamedTuple):
    order_id: str
    account: str
    symbol: str


@typed_equality
class AmendOrder(NamedTuple):
    """Change a resting order. ``quantity`` is the new total quantity (filled part
    included), like FIX OrderQty; ``None`` keeps what is there. Lowering the quantity keeps
    the order's place in the queue; a new price or a higher quantity sends it to the back."""

    order_id: str
    account: str
    symbol: str
    price: int | None
    quantity: int | None


Command = Union[SubmitOrder, CancelOrder, AmendOrder]
COMMAND_TYPES: tuple[type, ...] = (SubmitOrder, CancelOrder, AmendOrder)
