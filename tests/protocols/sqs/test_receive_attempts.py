"""ReceiveAttempts: a FIFO receive retried with its attempt id gets the same answer.

Goal: the answer replays while every lock in it holds and within five minutes, and is
forgotten otherwise. Method: a stand-in broker with a SimClock whose ``extend`` holds
or refuses as the test says; no sockets.
"""

from __future__ import annotations

from typing import Any

import pytest

from conveyor.errors import LockExpiredError
from conveyor.protocols.sqs.errors import InvalidParameterValue
from conveyor.protocols.sqs.receive_attempts import (
    ATTEMPT_WINDOW_MS,
    ReceiveAttempts,
    check_attempt_id,
)
from conveyor.testing.clock import SimClock


class StandInBroker:
    def __init__(self) -> None:
        self.clock = SimClock()
        self.held = True
        self.extended: list[tuple[list[str], int]] = []

    async def extend(self, receipts: list[str], lock_ms: int) -> list[int]:
        if not self.held:
            raise LockExpiredError("the lock of this delivery expired")
        self.extended.append((list(receipts), lock_ms))
        return [0 for _ in receipts]


ANSWER: dict[str, Any] = {"Messages": [{"Body": "a", "ReceiptHandle": "h1"}]}


async def test_replays_while_held_and_extends_the_locks() -> None:
    broker = StandInBroker()
    attempts = ReceiveAttempts(broker)  # type: ignore[arg-type]
    attempts.remember("q.fifo", "try-1", ["r1"], ANSWER)
    assert await attempts.replay("q.fifo", "try-1", 30_000) is ANSWER
    assert broker.extended == [(["r1"], 30_000)]
    assert await attempts.replay("q.fifo", "other", 30_000) is None
    assert await attempts.replay("other.fifo", "try-1", 30_000) is None


async def test_forgotten_once_a_lock_is_gone_or_after_five_minutes() -> None:
    broker = StandInBroker()
    attempts = ReceiveAttempts(broker)  # type: ignore[arg-type]
    attempts.remember("q.fifo", "gone", ["r1"], ANSWER)
    broker.held = False
    assert await attempts.replay("q.fifo", "gone", 30_000) is None
    broker.held = True
    assert await attempts.replay("q.fifo", "gone", 30_000) is None  # forgotten for good
    attempts.remember("q.fifo", "old", ["r2"], ANSWER)
    broker.clock.advance(ATTEMPT_WINDOW_MS)
    assert await attempts.replay("q.fifo", "old", 30_000) is None
    attempts.remember("q.fifo", "deleted", ["r3"], ANSWER)
    attempts.forget_queue("q.fifo")
    assert await attempts.replay("q.fifo", "deleted", 30_000) is None


def test_attempt_ids_are_printable_ascii_up_to_128() -> None:
    check_attempt_id("a" * 128)
    check_attempt_id("!~")
    for bad in ("", "a" * 129, "with space", "é"):
        with pytest.raises(InvalidParameterValue):
            check_attempt_id(bad)
