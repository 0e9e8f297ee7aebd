"""The catalog across nodes: exchanges, bindings, queues and topics changed on one node
are seen by the others while they run (issue 12).

Owns: telling the other nodes that this node committed a catalog change, learning it
from them, and re-reading the changed part of the catalog from the state store. The
broker calls ``changed(kind)`` after its commit ("topics", "queues", "exchanges": an
exchange or a binding); once per loop turn the kinds noted go out in ONE ``pg_notify``
on a connection of its own (never inside the write's transaction: notify_channel.py). A
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
from typing import Final

from conveyor.cluster.notify_channel import NotifyChannel, OverChannel
from conveyor.tasks import Supervisor

logger = logging.getLogger("conveyor.cluster")

CHANNEL: Final = "conveyor_catalog"
KINDS: Final = ("topics", "queues", "exchanges")  # the order a re-read applies them in
MISS_REREADS_PER_S: Final = 20  # re-reads misses may ask for, a second (sustained)
MISS_REREADS_BURST: Final = 5

Reread = Callable[[frozenset[str]], Awaitable[None]]


class CatalogSync(OverChannel):
    def __init__(self, dsn: str, reread: Reread, poll_ms: int) -> None:
        self.dsn = dsn
        self.reread = reread  # re-reads the given kinds from the state store
        self.poll_ms = poll_ms
        self._pending: set[str] = set()  # kinds changed here, not sent yet
        self._wanted: set[str] = set()  # kinds to re-read (told by others)
        self._reading: asyncio.Task[None] | None = None
        # the misses' token bucket (re-reads a publish or a look-up may ask for)
        self._miss_tokens = float(MISS_REREADS_BURST)
        self._miss_refilled_s = time.monotonic()
        self.misses_refused = 0  # misses answered without a re-read (bucket empty)
        self._channel = NotifyChannel(dsn, CHANNEL, payloads=self._payloads,
                                      received=self._on_notify, poll=self._poll,
                                      poll_ms=poll_ms, label="catalog")
        self._tasks = Supervisor("cluster-catalog")
        self._stopping = asyncio.Event()
        self.rereads = 0  # re-reads done (notified, polled or missed)

    async def close(self) -> None:
        self._stopping.set()
        await self._tasks.close(cancel=True)
        await super().close()

    # --- sending -----------------------------------------------------------------------
    def changed(self, kind: str) -> None:
        """A catalog change of ``kind`` committed on this node: tell the others (once
        per loop turn, whatever the number of changes)."""
        self._pending.add(kind)
        self._channel.note()

    def _payloads(self) -> list[str]:
        kinds, self._pending = self._pending, set()
        payload = ",".join(kind for kind in KINDS if kind in kinds)
        return [payload] if payload else []

    # --- receiving ---------------------------------------------------------------------
    def _on_notify(self, payload: str) -> None:
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
        """The fallback, every ``poll_ms``: re-read everything."""
        self._want(set(KINDS))
