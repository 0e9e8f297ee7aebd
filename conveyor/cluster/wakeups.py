"""Wake-ups across nodes: coalesced notifications after commit, polling as the fallback.

Owns: telling the other nodes that partitions moved, and learning it from them. After
an append has committed (the broker's on-append callback runs after the store's
transaction), the partition is noted; once per loop turn every noted partition goes out
in ONE ``pg_notify`` on a connection of its own — never inside the append transaction,
where NOTIFY would take PostgreSQL's global notify lock at every commit (the connections:
notify_channel.py). A listening connection receives the others' notifications, moves
this node's view of each head and wakes its long-polls and consumers. Every ``poll_ms``
all heads are read as well, so a lost notification (a dropped listening connection)
only delays a wake-up.
Must not know: protocols.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from conveyor.cluster.notify_channel import NotifyChannel, OverChannel
from conveyor.errors import OperatingError

CHANNEL: Final = "conveyor_appends"
PAYLOAD_MAX: Final = 7_000  # PostgreSQL refuses payloads of 8000 bytes or more
HEADS: Final = """SELECT topic, partition, next_offset FROM conveyor_log_partitions"""

Appended = Callable[[str, int], None]


class Wakeups(OverChannel):
    def __init__(self, dsn: str, log_store: Any, wake: Appended, poll_ms: int) -> None:
        self.dsn = dsn
        self.log_store = log_store  # a PostgresLogStore (observe_head)
        self.wake = wake  # the broker's own on-append: wakes fetches and acquires
        self.poll_ms = poll_ms
        self._pending: set[tuple[str, int]] = set()
        self._channel = NotifyChannel(dsn, CHANNEL, payloads=self._payloads,
                                      received=self._on_notify, poll=self._poll,
                                      poll_ms=poll_ms, label="wake-up")

    # --- sending -----------------------------------------------------------------------
    def appended(self, topic: str, partition: int) -> None:
        """Called after a committed append on this node: note it, send once per turn."""
        self._pending.add((topic, partition))
        self._channel.note()

    def _payloads(self) -> list[str]:
        pending, self._pending = self._pending, set()
        lines = []
        for topic, partition in sorted(pending):
            try:
                next_offset = self.log_store.offsets(topic, partition).high_watermark
            except OperatingError:  # the partition went away: nothing to say
                continue
            lines.append(f"{partition}\t{next_offset}\t{topic}")
        payloads: list[str] = []
        for line in lines:
            if payloads and len(payloads[-1]) + len(line) < PAYLOAD_MAX:
                payloads[-1] += "\n" + line
            elif len(line) < PAYLOAD_MAX:
                payloads.append(line)
        return payloads

    # --- receiving ---------------------------------------------------------------------
    def _on_notify(self, payload: str) -> None:
        for line in payload.split("\n"):
            partition, _, rest = line.partition("\t")
            next_offset, _, topic = rest.partition("\t")
            try:
                self._observe(topic, int(partition), int(next_offset))
            except ValueError:
                continue

    def _observe(self, topic: str, partition: int, next_offset: int) -> None:
        if self.log_store.observe_head(topic, partition, next_offset):
            self.wake(topic, partition)

    async def _poll(self) -> None:
        """The fallback, every ``poll_ms``: read every head."""
        for row in await self._channel.fetch(HEADS):
            self._observe(row["topic"], row["partition"], row["next_offset"])
