"""IdleExpiry: which keys have been idle for a period, without scanning every key.

Owns a heap of (deadline_ms, key) with at most one entry per key. A key is armed on
its first use; later uses only move its owner's "last used" time, never the heap.
When an entry comes due, the owner's ``last_used(key)`` is asked again: idle for the
whole period -> expired (returned); used since -> re-armed at last use + period; gone
(None) -> dropped. So each use costs nothing here, and each key costs one heap entry
and one pop per period, as Kafka's transactional-id and producer-id expiry would if it
did not scan (it scans every ``...expiration.check.interval.ms``).

Used for ``transactional.id.expiration.ms`` (transactions.py) and
``producer.id.expiration.ms`` (producer_state.py). Times are wall-clock milliseconds
(what is persisted as "last used"). Pure: no clock, no I/O.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class IdleExpiry(Generic[K]):
    def __init__(self, idle_ms: int) -> None:
        self.idle_ms = idle_ms
        self._heap: list[tuple[int, int, K]] = []  # (deadline, tie-breaker, key)
        self._armed: set[K] = set()  # keys with an entry in the heap
        self._counter = 0

    def arm(self, key: K, last_used_ms: int) -> None:
        """``key`` was used at ``last_used_ms``; arms it unless it already has an entry."""
        if key in self._armed:
            return
        self._armed.add(key)
        self._counter += 1
        heapq.heappush(self._heap, (last_used_ms + self.idle_ms, self._counter, key))

    def next_deadline_ms(self) -> int | None:
        return self._heap[0][0] if self._heap else None

    def due(self, now_ms: int, last_used: Callable[[K], int | None]) -> list[K]:
        """Keys idle for ``idle_ms`` at ``now_ms`` (removed from the heap); the others
        that came due are re-armed from their last use."""
        expired: list[K] = []
        while self._heap and self._heap[0][0] <= now_ms:
            _, _, key = heapq.heappop(self._heap)
            self._armed.discard(key)
            used_ms = last_used(key)
            if used_ms is None:
                continue  # forgotten meanwhile
            if used_ms + self.idle_ms <= now_ms:
                expired.append(key)
            else:
                self.arm(key, used_ms)
        return expired

    def __len__(self) -> int:
        return len(self._heap)
