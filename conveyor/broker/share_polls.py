"""Share-group helpers that wait or position: a ShareFetch's long poll over several
topics, and the by_duration start of a share group on a topic (KIP-932, KIP-1106).

Owns: nothing but these two procedures; the share coordinator calls them.
May call: the broker facade (topic lookup, append waits, timestamps, shared-group
resets) and the clock. Must not know: the wire format.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from conveyor.clock import Clock

from .types import Delivery

if TYPE_CHECKING:
    from .broker import Broker


async def wait_for_any(broker: Broker, clock: Clock, topics: Sequence[str], wait_ms: int,
                       take: Callable[[], Awaitable[list[Delivery]]],
                       partitions: Mapping[str, Sequence[int]] | None = None,
                       ) -> list[Delivery]:
    """Long poll over several topics: woken by an append to any partition of any of them
    (of ``partitions`` only, when given), a wait that acquires nothing, so ending it
    early loses no lock; ``take`` what is ready, until records come or ``wait_ms``
    passes."""
    keys = [(topic, partition) for topic in topics
            if (info := broker.find_topic(topic)) is not None
            for partition in range(info.partitions)
            if partitions is None or partition in partitions.get(topic, ())]
    deadline_ms = clock.monotonic_ms() + wait_ms
    deliveries: list[Delivery] = []
    while not deliveries:
        remaining_ms = deadline_ms - clock.monotonic_ms()
        if remaining_ms <= 0 or not keys:
            break
        if not await broker.wait_for_append(keys, remaining_ms):
            break
        deliveries = await take()
    return deliveries


async def start_by_time(broker: Broker, topic: str, group: str, since_ms: int) -> None:
    """by_duration: each partition of a share group just created at the log end starts
    at its first record stamped ``since_ms`` or later (none: it stays at the log end)."""
    info = broker.find_topic(topic)
    for partition in range(info.partitions if info is not None else 0):
        offset = await broker.offset_for_timestamp(topic, partition, max(0, since_ms))
        if offset is not None and offset >= 0:
            await broker.reset_shared_partition(topic, group, partition, offset)
