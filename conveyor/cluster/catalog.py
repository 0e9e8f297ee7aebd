"""The catalog across nodes: exchanges, bindings, queues and topics changed on one node
are seen by the others while they run (issue 12).

Owns: telling the other nodes that this node committed a catalog change, learning it
from them, and re-reading the changed part of the catalog from the state store. The
broker calls ``changed(kind)`` after its commit ("topics", "queues", "exchanges": an
exchange or a binding); once per loop turn the kinds noted go out in ONE ``pg_notify``
on a connection of its own (never inside the write's transaction, as wakeups.py). A
listening connection receives the others' notifications and re-reads those kinds
(topics, then queues, then exchanges with their bindings), one re-read at a time; what
arrives during one is re-read after it. Every ``poll_ms`` everything is re-read, so a
lost notification (a dropped listening connection) only delays the change.

``miss()`` is the broker's last look before it answers "no such exchange/queue" or
"unroutable": it waits for a re-read of everything that starts after it was asked (one
at a time; every miss during a re-read shares the one queued after it), so a publish
that races the notification of a bind made elsewhere is routed. Misses may ask for at
most ``MISS_REREADS_PER_S`` re-reads a second (a token bucket), so a flood of publishes
that are unroutable by design costs a bounded number of reads; past it, a miss is
answered from the table as it is.
Must not know: protocols.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from conveyor.cluster.membership import DB_ERRORS
from conveyor.cluster.wakeups import _connect
from conveyor.tasks import Supervisor

logger = logging.getLogger("conveyor.cluster")

CHANNEL: Final = "conveyor_catalog"
KINDS: Final = ("topics", "queues", "exchanges")  # the order a re-read applies them in
MISS_REREADS_PER_S: Final = 20  # re-reads misses may ask for, a second (sustained)
MISS_REREADS_BURST: Final = 5

Reread = Callable[[frozenset[str]], Awaitable[None]]


class CatalogSync:
    def __init__(self, dsn: str, reread: Reread, poll_ms: int) -> None:
        self.dsn = dsn
        self.reread = reread  # re-reads the given kinds from the state store
        self.poll_ms = poll_ms
        self._pending: set[str] = set()  # kinds changed here, not sent yet
        self._scheduled = False
        self._wanted: set[str] = set()  # kinds to re-read (told by others)
        self._reading: asyncio.Task[None] | None = None
        # the misses' token bucket (re-reads a publish or a look-up may ask for)
        self._miss_tokens = float(MISS_REREADS_BURST)
        self._miss_refilled_s = time.monotonic()
        self.misses_refused = 0  # misses answered without a re-read (bucket empty)
        self._sender: Any = None
        self._sender_lock = asyncio.Lock()
        self._listener: Any = None
        self._tasks = Supervisor("cluster-catalog")
        self._stopping = asyncio.Event()
        self.sent = 0  # notifications sent
        self.received = 0  # notifications received from other nodes
        self.rereads = 0  # re-reads done (notified, polled or missed)

    async def open(self) -> None:
        await self._connect()
        self._tasks.start(self._poll(), name="conveyor.cluster.catalog-poll")

    async def _connect(self) -> None:
        for connection in (self._listener, self._sender):
            if connection is not None:
                connection.terminate()
        self._listener = self._sender = None
        self._sender = await _connect(self.dsn)
        self._listener = await _connect(self.dsn)
        await self._listener.add_listener(CHANNEL, self._on_notify)

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

    # --- sending -----------------------------------------------------------------------
    def changed(self, kind: str) -> None:
        """A catalog change of ``kind`` committed on this node: tell the others (once
        per loop turn, whatever the number of changes)."""
        self._pending.add(kind)
        if not self._scheduled and not self._stopping.is_set():
            self._scheduled = True
            self._tasks.start(self._send(), name="conveyor.cluster.catalog-notify")

    async def _send(self) -> None:
        await asyncio.sleep(0)  # the rest of this loop turn notes its changes too
        self._scheduled = False
        kinds, self._pending = self._pending, set()
        payload = ",".join(kind for kind in KINDS if kind in kinds)
        if not payload:
            return
        try:
            async with self._sender_lock:
                await self._sender.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)
            self.sent += 1
        except (*DB_ERRORS, AttributeError) as error:
            logger.warning("catalog change not sent (others poll)", extra={"error": str(error)})

    # --- receiving ---------------------------------------------------------------------
    def _on_notify(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        if self._sender is not None and pid == self._sender.get_server_pid():
            return  # our own
        self.received += 1
        kinds = {kind for kind in payload.split(",") if kind in KINDS}
        if kinds:
            self._want(kinds)

    def _want(self, kinds: set[str]) -> None:
        self._wanted |= kinds
        if self._reading is None or self._reading.done():
            self._reading = self._tasks.start(self._read_wanted(),
                                              name="conveyor.cluster.catalog-reread")

    async def _read_wanted(self) -> None:
        while self._wanted and not self._stopping.is_set():
            kinds, self._wanted = frozenset(self._wanted), set()
            try:
                await self.reread(kinds)
                self.rereads += 1
            except Exception as error:  # logged; the poll re-reads everything later
                logger.warning("catalog re-read failed", extra={"error": str(error)})
                return

    async def refresh(self) -> None:
        """Re-read everything now and wait for it (after the re-read in progress)."""
        self._want(set(KINDS))  # the re-read in progress takes it on its next turn
        if self._reading is not None:
            await asyncio.shield(self._reading)

    async def miss(self) -> None:
        """The broker found no exchange, queue or route: wait for a re-read that starts
        after this call (one already queued is shared). Re-reads asked so are limited
        to ``MISS_REREADS_PER_S`` a second (a burst of ``MISS_REREADS_BURST``); past
        that the table is answered from as it is."""
        if not set(KINDS) <= self._wanted:  # no re-read queued yet: this one costs
            now_s = time.monotonic()
            self._miss_tokens = min(
                MISS_REREADS_BURST,
                self._miss_tokens + (now_s - self._miss_refilled_s) * MISS_REREADS_PER_S)
            self._miss_refilled_s = now_s
            if self._miss_tokens < 1:
                self.misses_refused += 1
                return
            self._miss_tokens -= 1
        await self.refresh()

    async def _poll(self) -> None:
        """The fallback: re-read everything every ``poll_ms``."""
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), self.poll_ms / 1000)
                return
            except TimeoutError:
                pass
            if self._listener is None or self._listener.is_closed():
                try:
                    async with self._sender_lock:
                        await self._connect()
                except DB_ERRORS as error:
                    logger.warning("catalog connections not back yet",
                                   extra={"error": str(error)})
            self._want(set(KINDS))
