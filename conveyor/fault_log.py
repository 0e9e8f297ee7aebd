"""ConditionLog: log an operating fault once per condition, with a count, not per event.

A full disk fails every publish; one line per failure floods the log (1,129 lines in
a second were seen) and hides everything else. ``failed(condition)`` logs the first
failure of a condition at WARNING and counts the rest; ``recovered(condition)`` logs
one line with the count when it clears. A condition still failing logs a reminder
with the count every ``repeat_ms``. Generic: any layer may use it (time comes in
through the Clock). Not thread-safe: one event loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from conveyor.clock import Clock

# Precedent: RabbitMQ repeats its disk alarm state in the log at most every few
# minutes; once a minute keeps an ongoing fault visible without flooding.
REPEAT_INTERVAL_MS = 60_000


@dataclass(slots=True)
class _Condition:
    first_ms: int
    last_logged_ms: int
    count: int


class ConditionLog:
    def __init__(self, logger: logging.Logger, clock: Clock,
                 repeat_ms: int = REPEAT_INTERVAL_MS) -> None:
        self.logger = logger
        self.clock = clock
        self.repeat_ms = repeat_ms
        self._active: dict[str, _Condition] = {}

    def failed(self, condition: str, detail: object = "") -> None:
        now_ms = self.clock.monotonic_ms()
        state = self._active.get(condition)
        if state is None:
            self._active[condition] = _Condition(now_ms, now_ms, 1)
            self.logger.warning("%s: %s (logged once; failures are counted)", condition, detail,
                                extra={"condition": condition, "failures": 1})
            return
        state.count += 1
        if now_ms - state.last_logged_ms >= self.repeat_ms:
            state.last_logged_ms = now_ms
            self.logger.warning("%s: still failing, %d failures so far", condition, state.count,
                                extra={"condition": condition, "failures": state.count})

    def recovered(self, condition: str) -> None:
        state = self._active.pop(condition, None)
        if state is not None:
            self.logger.warning("%s: recovered after %d failures in %d ms", condition,
                                state.count, self.clock.monotonic_ms() - state.first_ms,
                                extra={"condition": condition, "failures": state.count})

    def count(self, condition: str) -> int:
        state = self._active.get(condition)
        return 0 if state is None else state.count
