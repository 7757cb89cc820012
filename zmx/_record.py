"""Immutable, slotted records for commands and events.

Commands and events are ``typing.NamedTuple`` classes: immutable, with ``__slots__ = ()``,
and about 15x cheaper to build than a frozen dataclass on this machine (measured: 200 ns
for ``tuple.__new__`` against 3 us), which matters when the engine builds several events
per order. ``typed_equality`` makes two records equal only when they are the same kind, so
an ``OrderRejected`` never equals a ``CancelRejected`` that happens to hold the same values.
"""

from __future__ import annotations


def typed_equality(cls: type) -> type:
    def __eq__(self: tuple, other: object) -> bool:
        return type(self) is type(other) and tuple.__eq__(self, other)  # type: ignore[arg-type]

    def __ne__(self: tuple, other: object) -> bool:
        return not __eq__(self, other)

    def __hash__(self: tuple) -> int:
        return hash((cls.__name__, tuple(self)))

    cls.__eq__ = __eq__  # type: ignore[method-assign]
    cls.__ne__ = __ne__  # type: ignore[method-assign]
    cls.__hash__ = __hash__  # type: ignore[method-assign]
    return cls
