"""FIFO ReceiveRequestAttemptId: a retried receive gets the same messages back.

Owns: remembering, per (queue, attempt id), the answer of a FIFO receive for five
minutes (AWS's deduplication interval), and replaying it while every message in it
is still locked by that receive: the locks are extended by the visibility timeout
again, as AWS resets it on a retry. Once any of them was deleted, changed or its
lock ran out, the attempt id is forgotten and the receive runs anew.
Must not know: sockets, JSON/XML.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from conveyor.errors import LockExpiredError, UnknownDeliveryError
from conveyor.protocols.sqs.errors import InvalidParameterValue

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker

ATTEMPT_WINDOW_MS: Final = 5 * 60 * 1000  # AWS: the attempt id lives 5 minutes
ATTEMPTS_MAX: Final = 10_000  # remembered attempts (oldest dropped first)
ATTEMPT_ID: Final = re.compile(r"[\x21-\x7e]{1,128}")  # AWS: 128 printable ASCII characters


def check_attempt_id(attempt: str) -> None:
    if not ATTEMPT_ID.fullmatch(attempt):
        raise InvalidParameterValue(
            f"Value {attempt[:128]} for parameter ReceiveRequestAttemptId is invalid. "
            "Reason: it must be 1 to 128 printable ASCII characters.")


@dataclass(slots=True)
class _Attempt:
    receipts: list[str]  # the broker receipts the answer handed out
    result: dict[str, Any]  # the answer, replayed as it was
    expires_ms: int  # monotonic ms


class ReceiveAttempts:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._attempts: collections.OrderedDict[tuple[str, str], _Attempt] = (
            collections.OrderedDict())

    def remember(self, queue: str, attempt: str, receipts: list[str],
                 result: dict[str, Any]) -> None:
        expires_ms = self.broker.clock.monotonic_ms() + ATTEMPT_WINDOW_MS
        self._attempts[(queue, attempt)] = _Attempt(receipts, result, expires_ms)
        self._attempts.move_to_end((queue, attempt))
        while len(self._attempts) > ATTEMPTS_MAX:
            self._attempts.popitem(last=False)

    async def replay(self, queue: str, attempt: str, lock_ms: int) -> dict[str, Any] | None:
        """The remembered answer with its locks extended, or None to receive anew."""
        remembered = self._attempts.get((queue, attempt))
        if remembered is None:
            return None
        if remembered.expires_ms <= self.broker.clock.monotonic_ms():
            del self._attempts[(queue, attempt)]
            return None
        try:
            await self.broker.extend(remembered.receipts, max(lock_ms, 1))
        except (LockExpiredError, UnknownDeliveryError):
            del self._attempts[(queue, attempt)]
            return None
        return remembered.result

    def forget_queue(self, queue: str) -> None:
        for key in [key for key in self._attempts if key[0] == queue]:
            del self._attempts[key]
