"""Text that every state store can keep.

Owns: the rule that a string stored as text has no NUL character and is valid UTF-8
(no lone surrogate). SQLite would store either; PostgreSQL's ``text`` refuses both,
so the broker refuses them at its door for names it stores (exchanges, queues,
bindings, groups), the same on every backend, and the PostgreSQL engine refuses a
write that still carries one before it joins a shared transaction (one bad string
must not fail the other writes of its loop turn).
Must not know: protocols (callers turn the error into theirs).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from conveyor.errors import InvalidNameError


def unstorable(value: str) -> str | None:
    """Why ``value`` cannot be stored as text, or None when it can."""
    if "\x00" in value:
        return "contains a NUL character"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "is not valid UTF-8 (a lone surrogate)"
    return None


def check_storable(what: str, values: Iterable[str | None]) -> None:
    """InvalidNameError naming ``what`` when one of ``values`` cannot be stored."""
    for value in values:
        if value is not None:
            reason = unstorable(value)
            if reason is not None:
                raise InvalidNameError(f"{what} {reason}", value=value[:40])


def check_row(row: Sequence[Any]) -> None:
    """A state-store write's parameters: InvalidNameError for a string no engine can keep
    (checked before the write joins its loop turn's transaction, on every engine)."""
    for value in row:
        if isinstance(value, str):
            reason = unstorable(value)
            if reason is not None:
                raise InvalidNameError(f"text that {reason} cannot be stored",
                                       value=value[:40])
