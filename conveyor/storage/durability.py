"""DurabilityBarrier: one fsync pass per event-loop turn for everything that must be durable.

Owns the moment data becomes durable (Redis's ``beforeSleep``: write before replying,
once per loop turn). Every partition's group committer and the SQLite state store are
*sources*: a source with writes someone waits for calls ``mark_dirty``; the barrier
schedules one pass with ``loop.call_soon`` (so every write of the current turn is in
it), asks each dirty source for its sync jobs (``prepare_sync``, on the loop: the
state store COMMITs its open transaction there, a committer takes its dirty handles),
runs every job at once in worker threads (one fdatasync per dirty file, spread over
at most ``SYNC_THREADS_MAX`` concurrent executor calls through ``fs.call_in_thread``),
and then tells each source how its own jobs ended (``sync_done``), which answers
that source's waiters. Standing sources (the state
store) are asked at every pass, so a commit nobody awaited rides along for free.

One pass at a time: sources marked while a pass runs form the next pass, started as
soon as the running one ends (the group commit of the whole process, not of one
partition). No fsync ever runs on the event loop.

Knows nothing of partitions, SQL or acknowledgements. One barrier per event loop
(``barrier_for_loop``): every store opened on a loop shares it without wiring.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Protocol

from conveyor.storage.fs import call_in_thread
from conveyor.tasks import Supervisor

SyncJob = Callable[[], None]
# executor calls per pass: fdatasyncs of files on one disk gain little from more at once
# (the default executor has min(32, cpus + 4) workers; the checkpoint and file creation
# use it too)
SYNC_THREADS_MAX = 4


class SyncSource(Protocol):
    def prepare_sync(self) -> list[SyncJob]:
        """On the loop, at the start of a pass: take what this pass makes durable and
        return the blocking calls that do it (run in worker threads)."""
        ...

    def sync_done(self, error: BaseException | None) -> None:
        """On the loop: this source's jobs of the pass ended (``error``: the first that
        failed); answer the waiters ``prepare_sync`` took."""
        ...


class DurabilityBarrier:
    def __init__(self) -> None:
        self._dirty: dict[SyncSource, None] = {}  # ordered set: sources of the next pass
        self._standing: dict[SyncSource, None] = {}  # asked at every pass
        self._next: asyncio.Future[None] | None = None  # resolved when the next pass ends
        self._scheduled = False
        self._running: asyncio.Task[None] | None = None
        self._tasks = Supervisor("conveyor.storage.durability-barrier")
        self.pass_count = 0  # passes run
        self.job_count = 0  # sync jobs (fdatasyncs, directory fsyncs) run

    def add_standing(self, source: SyncSource) -> None:
        self._standing[source] = None

    def remove_standing(self, source: SyncSource) -> None:
        self._standing.pop(source, None)
        self._dirty.pop(source, None)

    def mark_dirty(self, source: SyncSource) -> asyncio.Future[None]:
        """Include ``source`` in the next pass; the future of that pass's end."""
        self._dirty[source] = None
        loop = asyncio.get_running_loop()
        if self._next is None:
            self._next = loop.create_future()
        if not self._scheduled and self._running is None:
            self._scheduled = True
            loop.call_soon(self._start)
        return self._next

    def _start(self) -> None:
        self._scheduled = False
        if self._running is None and self._dirty:
            self._running = self._tasks.start(self._pass(), name="durability barrier")

    async def _pass(self) -> None:
        sources = list(self._dirty)
        sources += [source for source in self._standing if source not in self._dirty]
        self._dirty = {}
        finished, self._next = self._next, None
        try:
            prepared = [(source, source.prepare_sync()) for source in sources]
            for source in sources:  # marked again while preparing: this pass covers that
                self._dirty.pop(source, None)
            jobs = [job for _, source_jobs in prepared for job in source_jobs]
            self.job_count += len(jobs)
            # every job of every source at once, spread over a few executor calls (one
            # submission per file cost the loop more than the files' own work); each
            # source is then told of its own jobs' outcomes
            chunk_count = min(len(jobs), SYNC_THREADS_MAX)
            chunks = [list(range(start, len(jobs), chunk_count)) for start in range(chunk_count)]
            if len(chunks) == 1:  # the usual pass (one file): no gather, one loop hop less
                ran = [await call_in_thread(_run_jobs, jobs)]
            else:
                ran = await asyncio.gather(*(call_in_thread(_run_jobs, [jobs[i] for i in chunk])
                                             for chunk in chunks))
            outcomes: list[BaseException | None] = [None] * len(jobs)
            for chunk, errors in zip(chunks, ran, strict=True):
                for position, error in zip(chunk, errors, strict=True):
                    outcomes[position] = error
            index = 0
            for source, source_jobs in prepared:
                own = outcomes[index:index + len(source_jobs)]
                index += len(source_jobs)
                errors = [outcome for outcome in own if outcome is not None]
                source.sync_done(errors[0] if errors else None)
            self.pass_count += 1
        finally:
            if finished is not None and not finished.done():
                finished.set_result(None)
            self._running = None
            if self._dirty and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._start)

    async def flush(self, source: SyncSource) -> None:
        """Run a pass that includes ``source`` (and wait for it)."""
        await asyncio.shield(self.mark_dirty(source))


def _run_jobs(jobs: list[SyncJob]) -> list[BaseException | None]:
    """In a worker thread: run each job in turn; each one's error (or None)."""
    errors: list[BaseException | None] = []
    for job in jobs:
        try:
            job()
        except Exception as error:  # the source's sync_done decides what it means
            errors.append(error)
        else:
            errors.append(None)
    return errors


_barriers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, DurabilityBarrier] = (
    weakref.WeakKeyDictionary())


def barrier_for_loop() -> DurabilityBarrier:
    """The running loop's barrier (made on first use): every store of a loop shares it."""
    loop = asyncio.get_running_loop()
    barrier = _barriers.get(loop)
    if barrier is None:
        barrier = _barriers[loop] = DurabilityBarrier()
    return barrier


__all__ = ["DurabilityBarrier", "SyncJob", "SyncSource", "barrier_for_loop"]
