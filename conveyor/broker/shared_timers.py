"""SharedTimers: which shared partitions the timer must visit, instead of all of them.

Owns one deadline heap over every shared partition (the earliest lock expiry, delay
end or record expiry of each, pushed whenever a window changes) and the set of queue
partitions appended to since the timer last loaded them (their new records may
expire before anyone consumes them). A timer pass then visits only the partitions
whose time has come or that got records, not every group x partition.

Lazy deletion: a partition keeps one live entry (its registered due time); an entry
whose time no longer matches is skipped when popped, and the visit registers the
partition's next deadline again. Must not know: records, the stores. Sans-IO.
"""

from __future__ import annotations

import heapq

# (group, topic, partition)
Key = tuple[str, str, int]


class SharedTimers:
    def __init__(self) -> None:
        self._heap: list[tuple[int, str, str, int]] = []
        self._due: dict[Key, int] = {}  # the live entry of each partition
        # (topic, partition) appended to (or opened) since the timer last loaded it
        self.unfilled: set[tuple[str, int]] = set()

    def schedule(self, key: Key, due_ms: int | None) -> None:
        """The partition's earliest deadline is ``due_ms`` (None: it has none)."""
        if due_ms is None:
            return
        registered = self._due.get(key)
        if registered is not None and registered <= due_ms:
            return  # an earlier visit is booked; it books the next one
        self._due[key] = due_ms
        heapq.heappush(self._heap, (due_ms, *key))

    def due(self, now_ms: int) -> list[Key]:
        """The partitions whose booked time has come (each once), unbooked."""
        found: list[Key] = []
        heap = self._heap
        while heap and heap[0][0] <= now_ms:
            due_ms, group, topic, partition = heapq.heappop(heap)
            key = (group, topic, partition)
            if self._due.get(key) == due_ms:
                del self._due[key]
                found.append(key)
        if len(heap) > 4 * len(self._due) + 1024:  # stale entries: rebuild
            self._heap = [(due_ms, *key) for key, due_ms in self._due.items()]
            heapq.heapify(self._heap)
        return found
