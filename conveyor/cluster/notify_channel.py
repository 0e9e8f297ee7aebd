"""One PostgreSQL notification channel between the nodes: coalesced sends after commit,
a listening connection, and a poll as the fallback (issue 12).

Owns: the two connections a node keeps for one channel and what keeps them useful. A
*sending* connection carries ``pg_notify`` calls, never inside a write's transaction
(NOTIFY takes PostgreSQL's global notify lock at its commit); ``note()`` asks for a send,
and once per event-loop turn the owner's ``payloads()`` (what it noted meanwhile) go out,
one ``pg_notify`` each. A *listening* connection hands every payload another node sent
to ``received``; this node's own are skipped. Every ``poll_ms`` the listening connection
is checked (both are opened again when it was closed: a database restart, a dropped
link) and ``poll()`` runs (the owner re-reads what a lost notification would have told);
a poll that fails on a connection error reopens both. Used by wakeups.py (appends) and
catalog.py (catalog changes).
Must not know: what the payloads mean.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from conveyor.cluster.membership import DB_ERRORS
from conveyor.storage.postgres_dsn import COMMAND_TIMEOUT_S, CONNECT_TIMEOUT_S, SESSION_SETTINGS
from conveyor.tasks import Supervisor

logger = logging.getLogger("conveyor.cluster")


async def connect(dsn: str) -> Any:
    return await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S,
                                 server_settings=SESSION_SETTINGS,
                                 command_timeout=COMMAND_TIMEOUT_S)


class NotifyChannel:
    def __init__(self, dsn: str, channel: str, *, payloads: Callable[[], list[str]],
                 received: Callable[[str], None], poll: Callable[[], Awaitable[None]],
                 poll_ms: int, label: str) -> None:
        self.dsn = dsn
        self.channel = channel
        self.payloads = payloads  # what was noted since the last send (taken: cleared)
        self.received = received  # a payload another node sent
        self.poll = poll  # the fallback, every poll_ms; may use fetch()
        self.poll_ms = poll_ms
        self.label = label  # names the tasks and the log lines ("wake-up", "catalog")
        self._scheduled = False
        self._sender: Any = None
        self._sender_lock = asyncio.Lock()  # one statement at a time on the connection
        self._listener: Any = None
        self._tasks = Supervisor(f"cluster-{label}")
        self._stopping = asyncio.Event()
        self.sent = 0  # notifications sent
        self.heard = 0  # notifications received from other nodes

    async def open(self) -> None:
        await self._connect()
        self._tasks.start(self._poll(), name=f"conveyor.cluster.{self.label}-poll")

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

    async def _connect(self) -> None:
        """New sending and listening connections (the old ones, if any, dropped)."""
        for connection in (self._listener, self._sender):
            if connection is not None:
                connection.terminate()
        self._listener = self._sender = None
        self._sender = await connect(self.dsn)
        self._listener = await connect(self.dsn)
        await self._listener.add_listener(self.channel, self._on_notify)

    async def _reconnect(self) -> None:
        async with self._sender_lock:
            try:
                await self._connect()
            except DB_ERRORS as error:
                logger.warning("%s connections not back yet", self.label,
                               extra={"error": str(error)})

    # --- sending -----------------------------------------------------------------------
    def note(self) -> None:
        """Something to tell was noted: send once this loop turn is over."""
        if not self._scheduled and not self._stopping.is_set():
            self._scheduled = True
            self._tasks.start(self._send(), name=f"conveyor.cluster.{self.label}-notify")

    async def _send(self) -> None:
        await asyncio.sleep(0)  # the rest of this loop turn notes its changes too
        self._scheduled = False
        payloads = self.payloads()
        if not payloads:
            return
        try:
            async with self._sender_lock:
                for payload in payloads:
                    await self._sender.execute("SELECT pg_notify($1, $2)", self.channel,
                                               payload)
                    self.sent += 1
        except (*DB_ERRORS, AttributeError) as error:
            logger.warning("%s not sent (others poll)", self.label,
                           extra={"error": str(error)})

    # --- receiving ---------------------------------------------------------------------
    def _on_notify(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        if self._sender is not None and pid == self._sender.get_server_pid():
            return  # our own
        self.heard += 1
        self.received(payload)

    async def fetch(self, query: str) -> list[Any]:
        """Run a read on the sending connection (a poll's), between sends."""
        async with self._sender_lock:
            if self._sender is None:
                raise asyncpg.InterfaceError("not connected")
            rows: list[Any] = await self._sender.fetch(query)
            return rows

    async def _poll(self) -> None:
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), self.poll_ms / 1000)
                return
            except TimeoutError:
                pass
            if self._listener is None or self._listener.is_closed():
                await self._reconnect()
            try:
                await self.poll()
            except DB_ERRORS as error:
                logger.warning("%s poll failed; reconnecting", self.label,
                               extra={"error": str(error)})
                await self._reconnect()


class OverChannel:
    """What a user of one channel shows: its counters, open and close."""

    _channel: NotifyChannel

    @property
    def sent(self) -> int:
        """Notifications sent."""
        return self._channel.sent

    @property
    def received(self) -> int:
        """Notifications received from other nodes."""
        return self._channel.heard

    async def open(self) -> None:
        await self._channel.open()

    async def close(self) -> None:
        await self._channel.close()
