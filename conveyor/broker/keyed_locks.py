"""KeyedLocks: one asyncio.Lock per key, forgotten when nobody holds or awaits it.

The idempotent-producer check must run under a lock per (producer id, topic,
partition); a map of locks that only grows holds one lock per producer ever seen.
Here each key's lock lives only while some task is inside ``hold(key)`` (a user
count, not the lock's private waiter list), so the map is bounded by the appends
in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager


class KeyedLocks:
    def __init__(self) -> None:
        # key -> (lock, tasks holding or waiting for it)
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            _, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
