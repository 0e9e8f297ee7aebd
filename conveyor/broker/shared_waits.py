"""LongPolls: the acquires parked in a long poll, and who wakes how many of them.

Owns: per (group, topic), the futures of the acquires waiting for a record, how many
of them take only some partitions, each partition's high watermark at the last
append, and the sleepers that end a poll at its deadline. An append wakes as many
parked acquires of each of the topic's groups as records arrived (not the whole herd);
a release, an expiry or a moved window wakes a group's acquires (``wake``).
Must not know: records, windows' rules, the stores.
"""

from __future__ import annotations

import asyncio
import contextlib

from conveyor.clock import Clock
from conveyor.errors import OperatingError
from conveyor.tasks import Supervisor

from .shared_model import SharedGroupWindows
from .topics import TopicRegistry


def _resolve_waiter(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class LongPolls:
    def __init__(self, clock: Clock, topics: TopicRegistry) -> None:
        self.clock = clock
        self.topics = topics
        # (group, topic) -> acquires waiting for a record
        self.waiters: dict[tuple[str, str], list[asyncio.Future[None]]] = {}
        # (group, topic) -> how many of its waiting acquires take only some partitions
        self._filtered_waits: dict[tuple[str, str], int] = {}
        # the long polls' deadline sleepers: cancelled when the poll ends, awaited at close
        self._sleepers = Supervisor("conveyor.shared-groups")
        # (topic, partition) -> its high watermark at the last notify_appended
        self._seen_ends: dict[tuple[str, int], int] = {}

    async def close(self) -> None:
        for waiters in self.waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        self.waiters.clear()
        await self._sleepers.close(cancel=True)

    async def wait(self, state: SharedGroupWindows, remaining_ms: int,
                   filtered: bool = False) -> None:
        """Until an append, a release, the group's next deadline, or ``remaining_ms``.
        ``filtered``: the acquire takes only some partitions, so a wake meant for one
        record may not be its own: while such an acquire waits, every wake of the group
        wakes all its acquires (``wake``)."""
        now_ms = self.clock.monotonic_ms()
        deadlines = [d for d in (p.next_deadline_ms() for p in state.partitions.values())
                     if d is not None]
        if deadlines:
            remaining_ms = min(remaining_ms, max(0, min(deadlines) - now_ms))
        for part in state.partitions.values():
            # what this acquire could see: records past it must wake someone (an earlier
            # value only wakes more acquires than needed, never fewer)
            end_key = (part.topic, part.partition)
            seen = self._seen_ends.get(end_key)
            self._seen_ends[end_key] = (part.next_offset if seen is None
                                        else min(seen, part.next_offset))
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        key = (state.group, state.topic)
        self.waiters.setdefault(key, []).append(waiter)
        if filtered:
            self._filtered_waits[key] = self._filtered_waits.get(key, 0) + 1
        sleeper = self._sleepers.start(self.clock.sleep_ms(remaining_ms), name="acquire wait")
        sleeper.add_done_callback(lambda _: _resolve_waiter(waiter))
        try:
            await waiter  # resumes straight from wake: no extra loop hop on the hot path
        finally:
            if filtered:
                left = self._filtered_waits.pop(key, 1) - 1
                if left > 0:
                    self._filtered_waits[key] = left
            sleeper.cancel()  # awaited by close(), not here: that would cost a loop turn
            waiters = self.waiters.get(key)
            if waiters is not None:
                with contextlib.suppress(ValueError):
                    waiters.remove(waiter)
                if not waiters:
                    del self.waiters[key]

    def waiting(self, topic: str, group: str) -> int:
        """How many acquires of ``group`` are parked in a long poll (metrics, tests)."""
        return len(self.waiters.get((group, topic), ()))

    def appended(self, topic: str, partition: int) -> None:
        """After an append (or when a partition went), while acquires wait: wakes as
        many parked acquires of each of the topic's groups as records arrived since the
        last call (all of them when the partition went or was not seen before), not the
        whole herd; an acquire that got records wakes the next one while more are there
        (``acquire``)."""
        key = (topic, partition)
        try:
            end: int | None = self.topics.offsets(topic, partition).high_watermark
        except OperatingError:
            end = None
        seen = self._seen_ends.get(key)
        arrived = None if end is None or seen is None or end < seen else end - seen
        if end is None:
            self._seen_ends.pop(key, None)
        else:
            self._seen_ends[key] = end
        if arrived == 0:
            return  # an earlier call of this durable group already woke enough
        for group, group_topic in list(self.waiters):
            if group_topic == topic:
                self.wake(group, topic, arrived)

    def wake(self, group: str, topic: str, count: int | None = None) -> None:
        """Resolve the group's parked acquires: all, or the ``count`` oldest."""
        key = (group, topic)
        waiters = self.waiters.get(key)
        if not waiters:
            return
        if count is None or count >= len(waiters) or key in self._filtered_waits:
            del self.waiters[key]
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
            return
        while waiters and count > 0:
            waiter = waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                count -= 1
        if not waiters:
            del self.waiters[key]

