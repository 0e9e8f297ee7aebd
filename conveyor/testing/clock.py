"""SimClock: a clock that moves only when a test says so (trio's MockClock)."""

from __future__ import annotations

import asyncio
import heapq
import itertools


class SimClock:
    def __init__(self, wall_start_ms: int = 1_700_000_000_000) -> None:
        self._monotonic_ms = 0
        self._wall_start_ms = wall_start_ms
        self._wall_step_ms = 0  # NTP steps / an operator's `date -s`: wall time only
        self._sleepers: list[tuple[int, int, asyncio.Future[None]]] = []
        self._sequence = itertools.count()

    def monotonic_ms(self) -> int:
        return self._monotonic_ms

    def wall_ms(self) -> int:
        return self._wall_start_ms + self._wall_step_ms + self._monotonic_ms

    def step_wall(self, step_ms: int) -> None:
        """Jump the wall clock by ``step_ms`` (either way); monotonic time and sleepers
        are untouched, as a real clock step leaves CLOCK_MONOTONIC alone."""
        self._wall_step_ms += step_ms

    async def sleep_ms(self, duration_ms: int) -> None:
        if duration_ms <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        deadline_ms = self._monotonic_ms + duration_ms
        heapq.heappush(self._sleepers, (deadline_ms, next(self._sequence), future))
        await future

    def advance(self, duration_ms: int) -> None:
        """Move time forward and wake every sleeper whose deadline has passed."""
        assert duration_ms >= 0
        self._monotonic_ms += duration_ms
        while self._sleepers and self._sleepers[0][0] <= self._monotonic_ms:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)

    def next_deadline_ms(self) -> int | None:
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
        return self._sleepers[0][0] if self._sleepers else None
