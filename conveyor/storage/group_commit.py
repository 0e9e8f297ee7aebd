"""GroupCommitter: the durability wait of one partition, per its fsync policy.

Policies:
``always``: an append's future resolves only after an fdatasync that started after its
bytes were written. The committer is a source of the loop's ``DurabilityBarrier``
(storage/durability.py): a write marks it dirty, and the barrier's next pass (one per
loop turn for the whole process) takes every handle written since the last pass,
fdatasyncs each in a worker thread, concurrently with every other partition's files
and the state store's WAL, and then resolves the writes' futures. Writes made while a
pass runs go into the next one, which may start before that pass ends (a slow pass:
the barrier's overlap); the passes' futures resolve in pass order all the same. A new
segment's directory entry (a roll) is made durable in the same pass (``new_file``), so
rolling costs the event loop no fsync.
``interval``: appends resolve at once; a task syncs every ``fsync_interval_ms`` on the
Clock (in a worker thread). ``never``: appends resolve at once; sync on close.
"At once" still means on the next loop turn, so a tight append loop cannot starve the
interval task or other connections.

Invariant: durability is reported in write order; ``on_durable(token)`` is called with
the token of the last write a completed pass covers.

A failed fdatasync is never retried as if the data were still in the page cache
(Linux may have dropped the dirty pages and will report the next fsync clean; the
PostgreSQL "fsyncgate" lesson): the committer becomes ``failed`` (a
PartitionFailedError, logged once), every pending and later write is refused with it,
and only a restart (recovery re-reads and re-validates the log) clears it.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import functools
import logging
from collections.abc import Callable
from typing import Any

from conveyor.clock import Clock
from conveyor.errors import PartitionFailedError
from conveyor.storage.durability import DurabilityBarrier, SyncJob, barrier_for_loop
from conveyor.storage.fs import FileSystem, in_thread
from conveyor.storage.log_config import FSYNC_POLICIES
from conveyor.tasks import Supervisor

logger = logging.getLogger(__name__)


class GroupCommitter:
    def __init__(
        self, fs: FileSystem, clock: Clock, *, policy: str, interval_ms: int,
        on_durable: Callable[[Any], None], barrier: DurabilityBarrier | None = None,
    ) -> None:
        assert policy in FSYNC_POLICIES, policy
        self.fs = fs
        self.clock = clock
        self.policy = policy
        self.interval_ms = interval_ms
        self._on_durable = on_durable
        self._barrier = barrier  # None: the running loop's (barrier_for_loop)
        self._dirty: set[int] = set()  # handles written since the last pass took them
        self._new_directories: set[str] = set()  # a file was created in them (a roll)
        # per sync running (a pass of the barrier, the interval task's): the handles
        # closed since it took its handles, which its thread may then find closed (see
        # forget); a later sync's own set starts empty, so a handle number the OS gave
        # to a new file meanwhile is synced by it
        self._forgotten_while_syncing: list[set[int]] = []
        self._waiters: list[asyncio.Future[None]] = []  # writes for the next pass
        self._last_token: Any = None
        # per pass started and not told yet, oldest first: the writes it covers, the
        # token of the last of them, the handles closed while it runs (two passes at
        # once when the barrier overlaps a slow pass)
        self._passes: collections.deque[
            tuple[list[asyncio.Future[None]], Any, set[int]]] = collections.deque()
        self._interval_task: asyncio.Task[None] | None = None
        self._tasks = Supervisor("conveyor.storage.group-commit")  # the interval task
        self.sync_count = 0  # passes that synced this partition
        self.failed: PartitionFailedError | None = None
        self.name = ""  # for the log line (the partition directory)

    @property
    def barrier(self) -> DurabilityBarrier:
        if self._barrier is None:
            self._barrier = barrier_for_loop()
        return self._barrier

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
        self.barrier.mark_dirty(self)
        return future

    def new_file(self, directory: str) -> None:
        """A file was created in ``directory`` (a segment roll): its directory entry is
        made durable by the pass that syncs the file's first writes."""
        self._new_directories.add(directory)

    # --- the barrier's source ----------------------------------------------------------
    def prepare_sync(self) -> list[SyncJob]:
        handles, self._dirty = self._dirty, set()
        directories, self._new_directories = self._new_directories, set()
        forgotten: set[int] = set()
        self._forgotten_while_syncing.append(forgotten)
        self._passes.append((self._waiters, self._last_token, forgotten))
        self._waiters = []
        jobs: list[SyncJob] = [functools.partial(self.fs.fsync_dir, directory)
                               for directory in directories]
        jobs += [functools.partial(self._sync_handle, handle, forgotten)
                 for handle in handles]
        return jobs

    def sync_done(self, error: BaseException | None) -> None:
        """The oldest pass not told yet ended (the barrier tells them in order)."""
        waiters, token, forgotten = self._passes.popleft()
        _drop(self._forgotten_while_syncing, forgotten)  # its jobs have ended
        if error is not None:
            self.fail(error if isinstance(error, OSError) else OSError(str(error)))
        if self.failed is not None:
            failure = self.failed
            # written before the failure was known (in later passes or none): not durable
            for later_waiters, _, _ in self._passes:
                waiters += later_waiters
            waiters += self._waiters
            self._waiters = []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(failure)
            return
        self.sync_count += 1
        if token is not None:
            self._on_durable(token)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _sync_handle(self, handle: int, forgotten: set[int]) -> None:
        """In a worker thread: fdatasync one file (gone since its sync took it, i.e. in
        ``forgotten``: nothing to sync)."""
        if handle in forgotten:
            return  # closed meanwhile: its file is gone
        try:
            self.fs.fdatasync(handle)
        except OSError as error:
            if error.errno != errno.EBADF or handle not in forgotten:
                raise

    def _sync_handles(self, handles: set[int], directories: set[str],
                      forgotten: set[int]) -> None:
        for directory in directories:
            self.fs.fsync_dir(directory)
        for handle in handles:
            self._sync_handle(handle, forgotten)
        self.sync_count += 1

    async def _sync_every_interval(self) -> None:
        while self.failed is None:
            await self.clock.sleep_ms(self.interval_ms)
            if self._dirty or self._new_directories:
                handles, self._dirty = self._dirty, set()
                directories, self._new_directories = self._new_directories, set()
                forgotten: set[int] = set()
                self._forgotten_while_syncing.append(forgotten)
                try:
                    await in_thread(self._sync_handles, handles, directories, forgotten)
                except OSError as error:
                    self.fail(error)
                finally:
                    _drop(self._forgotten_while_syncing, forgotten)

    def forget(self, handle: int) -> None:
        """A handle about to be closed because its file goes (retention deleted it, or
        compaction replaced it with a synced copy): nothing of it needs syncing — its
        records were durable before anyone could read and settle them, and a segment
        compaction may touch is never the one still being synced — so no fdatasync on
        the event loop. A sync already running in a thread may find it closed: that
        EBADF is not a failure (``_sync_handle``). Only the syncs running now learn of
        it: a later one that takes the same number took it for a new file."""
        self._dirty.discard(handle)
        for forgotten in self._forgotten_while_syncing:
            forgotten.add(handle)

    async def settle(self) -> None:
        """Wait until every ``always`` write so far is durable or failed (its waiters
        answered by the barrier's passes); the committer keeps running (a truncation
        waits for this)."""
        pending = [waiter for waiters, _, _ in self._passes for waiter in waiters
                   if not waiter.done()]
        pending += [waiter for waiter in self._waiters if not waiter.done()]
        if pending:
            await asyncio.wait(pending)

    def truncated(self) -> None:
        """The log was cut below the last write: its token must not be reported again."""
        self._last_token = None

    async def close(self) -> None:
        """Sync everything written so far (one more pass) and stop the interval task."""
        if self._interval_task is not None:
            self._interval_task.cancel()
            self._interval_task = None
        await self._tasks.close()  # the cancelled interval task, awaited
        while self._waiters or self._passes or self._dirty or self._new_directories:
            if self.failed is not None:
                for waiter in self._waiters:
                    if not waiter.done():
                        waiter.set_exception(self.failed)
                self._waiters = []
                self._dirty = set()
                break
            await self.barrier.flush(self)
        if self.failed is not None:
            return  # nothing written since the failure may be called durable
        if self._last_token is not None:
            self._on_durable(self._last_token)


def _drop(syncing: list[set[int]], forgotten: set[int]) -> None:
    """Remove that very set (by identity: two syncs' sets may hold the same handles)."""
    for index, candidate in enumerate(syncing):
        if candidate is forgotten:
            del syncing[index]
            return
    raise AssertionError("a sync's set of forgotten handles was not registered")


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
