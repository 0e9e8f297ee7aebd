"""Wake-ups across nodes: coalesced notifications after commit, polling as the fallback.

Owns: telling the other nodes that partitions moved, and learning it from them. After
an append has committed (the broker's on-append callback runs after the store's
transaction), the partition is noted; once per loop turn every noted partition goes out
in ONE ``pg_notify`` on a connection of its own — never inside the append transaction,
where NOTIFY would take PostgreSQL's global notify lock at every commit. A listening
connection receives the others' notifications, moves this node's view of each head and
wakes its long-polls and consumers. Every ``poll_ms`` all heads are read as well, so a
lost notification (a dropped listening connection) only delays a wake-up.
Must not know: protocols.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final

import asyncpg

from conveyor.cluster.membership import DB_ERRORS
from conveyor.errors import OperatingError
from conveyor.storage.postgres_dsn import COMMAND_TIMEOUT_S, CONNECT_TIMEOUT_S, SESSION_SETTINGS
from conveyor.tasks import Supervisor

logger = logging.getLogger("conveyor.cluster")

CHANNEL: Final = "conveyor_appends"
PAYLOAD_MAX: Final = 7_000  # PostgreSQL refuses payloads of 8000 bytes or more
HEADS: Final = """SELECT topic, partition, next_offset FROM conveyor_log_partitions"""

Appended = Callable[[str, int], None]


async def _connect(dsn: str) -> Any:
    return await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S,
                                 server_settings=SESSION_SETTINGS,
                                 command_timeout=COMMAND_TIMEOUT_S)


class Wakeups:
    def __init__(self, dsn: str, log_store: Any, wake: Appended, poll_ms: int) -> None:
        self.dsn = dsn
        self.log_store = log_store  # a PostgresLogStore (observe_head)
        self.wake = wake  # the broker's own on-append: wakes fetches and acquires
        self.poll_ms = poll_ms
        self._pending: set[tuple[str, int]] = set()
        self._scheduled = False
        self._sender: Any = None
        self._sender_lock = asyncio.Lock()  # one statement at a time on the connection
        self._listener: Any = None
        self._tasks = Supervisor("cluster-wakeups")
        self._stopping = asyncio.Event()
        self.sent = 0  # notifications sent (each carries a loop turn's partitions)
        self.received = 0

    async def open(self) -> None:
        self._sender = await _connect(self.dsn)
        self._listener = await _connect(self.dsn)
        await self._listener.add_listener(CHANNEL, self._on_notify)
        self._tasks.start(self._poll(), name="conveyor.cluster.poll")

    async def close(self) -> None:
        self._stopping.set()
        await self._tasks.close(cancel=True)
        for connection in (self._listener, self._sender):
            if connection is not None:
                try:
                    await asyncio.wait_for(connection.close(), 5)
                except DB_ERRORS:
                    connection.terminate()
        self._listener = self._sender = None

    async def _reconnect(self) -> None:
        """The database went away (a restart): new sending and listening connections."""
        async with self._sender_lock:
            for connection in (self._listener, self._sender):
                if connection is not None:
                    connection.terminate()
            self._listener = self._sender = None
            try:
                self._sender = await _connect(self.dsn)
                self._listener = await _connect(self.dsn)
                await self._listener.add_listener(CHANNEL, self._on_notify)
            except DB_ERRORS as error:
                logger.warning("wake-up connections not back yet", extra={"error": str(error)})

    # --- sending -----------------------------------------------------------------------
    def appended(self, topic: str, partition: int) -> None:
        """Called after a committed append on this node: note it, send once per turn."""
        self._pending.add((topic, partition))
        if not self._scheduled and not self._stopping.is_set():
            self._scheduled = True
            self._tasks.start(self._send(), name="conveyor.cluster.notify")

    async def _send(self) -> None:
        await asyncio.sleep(0)  # let the rest of this loop turn note its appends too
        self._scheduled = False
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
        try:
            async with self._sender_lock:
                for payload in payloads:
                    await self._sender.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)
                    self.sent += 1
        except (*DB_ERRORS, AttributeError) as error:
            logger.warning("wake-up not sent (others poll)", extra={"error": str(error)})

    # --- receiving ---------------------------------------------------------------------
    def _on_notify(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        if self._sender is not None and pid == self._sender.get_server_pid():
            return  # our own
        self.received += 1
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
        """The fallback: read every head every ``poll_ms``."""
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), self.poll_ms / 1000)
                return
            except TimeoutError:
                pass
            try:
                async with self._sender_lock:
                    rows = await self._sender.fetch(HEADS)
            except (*DB_ERRORS, AttributeError) as error:
                logger.warning("head poll failed; reconnecting", extra={"error": str(error)})
                await self._reconnect()
                continue
            for row in rows:
                self._observe(row["topic"], row["partition"], row["next_offset"])
