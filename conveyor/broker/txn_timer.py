"""TransactionTimer: the transaction coordinator's one timer task (split from
transactions.py).

Owns: the heap of transaction timeouts and the task that sleeps until the earliest of
them, the next hanging-transaction check (only while a transaction is open in a log or
one was reported) or the next retry of markers that failed to append, whichever comes
first; with none of them it sleeps until woken. It never scans every transaction: a
timeout entry is (deadline, transactional id, started_ms) and is ignored by the
coordinator when that transaction ended or restarted since (lazy deletion).
Must not know: what a transaction is; it calls back the coordinator's functions.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Awaitable, Callable

from conveyor.clock import Clock
from conveyor.errors import OperatingError
from conveyor.tasks import Supervisor

logger = logging.getLogger("conveyor.transactions")

HANGING_CHECK_MS = 60_000  # how often open transactions in logs are checked
RETRY_MS = 1_000  # how often markers that failed to append (a full disk) are retried


class TransactionTimer:
    def __init__(self, clock: Clock, expire: Callable[[str, int], Awaitable[None]],
                 retry_incomplete: Callable[[], Awaitable[bool]],
                 check_hanging: Callable[[], object], watching: Callable[[], bool]) -> None:
        self.clock = clock
        self._expire = expire  # (transactional id, started_ms): abort it if still open
        self._retry_incomplete = retry_incomplete  # True while markers remain unwritten
        self._check_hanging = check_hanging
        self._watching = watching  # whether hanging checks are due periodically
        # (deadline_ms, transactional id, started_ms): lazily deleted when stale
        self._deadlines: list[tuple[int, str, int]] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._supervisor = Supervisor("conveyor.transactions")

    def start(self) -> None:
        self._supervisor.start(self._run(), name="conveyor.transactions.timer")

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        await self._supervisor.close(cancel=True)

    def wake(self) -> None:
        self._wake.set()

    def arm(self, transactional_id: str, started_ms: int, timeout_ms: int) -> None:
        deadline_ms = self.clock.monotonic_ms() + timeout_ms
        first = self._deadlines[0][0] if self._deadlines else None
        heapq.heappush(self._deadlines, (deadline_ms, transactional_id, started_ms))
        if first is None or deadline_ms < first:
            self._wake.set()

    async def _run(self) -> None:
        next_check_ms = self.clock.monotonic_ms() + HANGING_CHECK_MS
        while not self._closing:
            self._wake.clear()  # before looking: a wake during this pass is not lost
            now_ms = self.clock.monotonic_ms()
            while self._deadlines and self._deadlines[0][0] <= now_ms:
                _, transactional_id, started_ms = heapq.heappop(self._deadlines)
                try:
                    await self._expire(transactional_id, started_ms)
                except OperatingError:
                    logger.exception("aborting timed-out transaction %s failed",
                                     transactional_id)
            incomplete = await self._retry_incomplete()
            if now_ms >= next_check_ms:
                self._check_hanging()
                next_check_ms = now_ms + HANGING_CHECK_MS
            waits = [self._deadlines[0][0] - now_ms] if self._deadlines else []
            if self._watching():
                waits.append(next_check_ms - now_ms)
            if incomplete:
                waits.append(RETRY_MS)
            await self._sleep(max(min(waits), 1) if waits else None)

    async def _sleep(self, wait_ms: int | None) -> None:
        if wait_ms is None:
            await self._wake.wait()
            return
        async with asyncio.TaskGroup() as group:
            sleeper = group.create_task(self.clock.sleep_ms(wait_ms))
            woken = group.create_task(self._wake.wait())
            await asyncio.wait([sleeper, woken], return_when=asyncio.FIRST_COMPLETED)
            sleeper.cancel()
            woken.cancel()
