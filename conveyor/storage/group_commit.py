"""GroupCommitter: turns many appends into few fdatasyncs, per the partition's fsync policy.

Owns the durability wait of one partition. Policies:
``always``: an append's future resolves only after an fdatasync that started after its
bytes were written. All appends written while no sync is running share the next one,
which starts on the next loop turn (``call_soon``) and runs in a worker thread
(``fs.in_thread``) so the event loop keeps accepting appends; those become the
next group. ``interval``: appends resolve at once; a task syncs every
``fsync_interval_ms`` on the Clock. ``never``: appends resolve at once; sync on close.
"At once" still means on the next loop turn, so a tight append loop cannot starve the
interval task or other connections.

Invariant: durability is reported in write order; ``on_durable(token)`` is called with
the token of the last write a completed sync covers.

A failed fdatasync is never retried as if the data were still in the page cache
(Linux may have dropped the dirty pages and will report the next fsync clean; the
PostgreSQL "fsyncgate" lesson): the committer becomes ``failed`` (a
PartitionFailedError, logged once), every pending and later write is refused with it,
and only a restart (recovery re-reads and re-validates the log) clears it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from typing import Any

from conveyor.clock import Clock
from conveyor.errors import PartitionFailedError
from conveyor.storage.fs import FileSystem, in_thread
from conveyor.storage.log_config import FSYNC_POLICIES
from conveyor.tasks import Supervisor

logger = logging.getLogger(__name__)


class GroupCommitter:
    def __init__(
        self, fs: FileSystem, clock: Clock, *, policy: str, interval_ms: int,
        on_durable: Callable[[Any], None],
    ) -> None:
        assert policy in FSYNC_POLICIES, policy
        self.fs = fs
        self.clock = clock
        self.policy = policy
        self.interval_ms = interval_ms
        self._on_durable = on_durable
        self._dirty: set[int] = set()
        self._forgotten: set[int] = set()  # closed since the last sync pass (see forget)
        self._waiters: list[asyncio.Future[None]] = []
        self._last_token: Any = None
        self._scheduled = False
        self._syncing = False
        self._sync_task: asyncio.Task[None] | None = None
        self._interval_task: asyncio.Task[None] | None = None
        self._tasks = Supervisor("conveyor.storage.group-commit")  # both tasks above
        self.sync_count = 0
        self.failed: PartitionFailedError | None = None
        self.name = ""  # for the log line (the partition directory)

    def fail(self, error: OSError) -> PartitionFailedError:
        """Mark the committer failed (once); every later write is refused with it."""
        if self.failed is None:
            self.failed = PartitionFailedError(
                "fdatasync failed; partition stopped acknowledging until restart",
                partition=self.name, reason=str(error))
            logger.error("fdatasync failed: partition %s stops acknowledging writes until a "
                         "restart (recovery re-validates its log)", self.name,
                         extra={"reason": str(error)})
        return self.failed

    def wrote(self, handle: int, token: Any) -> asyncio.Future[None]:
        """Record a write to ``handle``; the future resolves when it is durable per policy."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if self.failed is not None:
            future.set_exception(self.failed)
            return future
        self._dirty.add(handle)
        self._last_token = token
        if self.policy != "always":
            self._on_durable(token)
            loop.call_soon(_resolve, future)  # yield once, so a tight append loop lets others run
            if self.policy == "interval" and self._interval_task is None:
                self._interval_task = self._tasks.start(self._sync_every_interval(),
                                                      name="fsync interval")
            return future
        self._waiters.append(future)
        if not self._scheduled and not self._syncing:
            self._scheduled = True
            loop.call_soon(self._start_sync)
        return future

    def _start_sync(self) -> None:
        self._scheduled = False
        if self._waiters and not self._syncing:
            self._syncing = True
            self._sync_task = self._tasks.start(self._sync_group(), name="group commit")

    async def _sync_group(self) -> None:
        waiters, self._waiters = self._waiters, []
        handles, self._dirty = self._dirty, set()
        token = self._last_token
        try:
            await in_thread(self._sync_handles, handles)
        except OSError as error:
            failure = self.fail(error)
            waiters += self._waiters  # written before the failure was known: not durable
            self._waiters = []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(failure)
        else:
            self._on_durable(token)
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        finally:
            self._syncing = False
            self._sync_task = None
            if self._waiters:
                self._start_sync()

    def _sync_handles(self, handles: set[int]) -> None:
        for handle in handles:
            if handle in self._forgotten:
                continue  # closed meanwhile: its file is gone
            try:
                self.fs.fdatasync(handle)
            except OSError as error:
                if error.errno != errno.EBADF or handle not in self._forgotten:
                    raise
        self._forgotten.clear()
        self.sync_count += 1

    async def _sync_every_interval(self) -> None:
        while self.failed is None:
            await self.clock.sleep_ms(self.interval_ms)
            if self._dirty:
                handles, self._dirty = self._dirty, set()
                try:
                    await in_thread(self._sync_handles, handles)
                except OSError as error:
                    self.fail(error)

    def forget(self, handle: int) -> None:
        """A handle about to be closed because its file goes (retention deleted it, or
        compaction replaced it with a synced copy): nothing of it needs syncing — its
        records were durable before anyone could read and settle them, and a segment
        compaction may touch is never the one still being synced — so no fdatasync on
        the event loop. A sync already running in a thread may find it closed: that
        EBADF is not a failure (``_sync_handles``)."""
        self._dirty.discard(handle)
        self._forgotten.add(handle)

    async def settle(self) -> None:
        """Wait until every ``always`` write so far is durable or failed (its waiters
        answered); the committer keeps running (a truncation waits for this)."""
        while self._sync_task is not None or self._waiters:
            if self._sync_task is None:
                self._start_sync()
            if self._sync_task is not None:
                await asyncio.wait([self._sync_task])

    def truncated(self) -> None:
        """The log was cut below the last write: its token must not be reported again."""
        self._last_token = None

    async def close(self) -> None:
        """Sync everything written so far and stop the interval task."""
        if self._interval_task is not None:
            self._interval_task.cancel()
            self._interval_task = None
        while self._sync_task is not None or self._waiters:
            if self._sync_task is None:
                self._start_sync()
            if self._sync_task is not None:
                await asyncio.wait([self._sync_task])
        await self._tasks.close()  # the cancelled interval task, awaited
        handles, self._dirty = self._dirty, set()
        if self.failed is not None:
            return  # nothing written since the failure may be called durable
        if handles:
            try:
                await in_thread(self._sync_handles, handles)
            except OSError as error:
                self.fail(error)
                return
        if self._last_token is not None:
            self._on_durable(self._last_token)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
