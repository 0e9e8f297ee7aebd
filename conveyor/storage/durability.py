"""DurabilityBarrier: one fsync pass per event-loop turn for everything that must be durable.

Owns the moment data becomes durable (Redis's ``beforeSleep``: write before replying,
once per loop turn). Every partition's group committer and the SQLite state store are
*sources*: a source with writes someone waits for calls ``mark_dirty``; the barrier
schedules one pass with ``loop.call_soon`` (so every write of the current turn is in
it), asks each dirty source for its sync jobs (``prepare_sync``, on the loop: the
state store COMMITs its open transaction there, a committer takes its dirty handles),
runs every job at once in worker threads (one fdatasync per dirty file, spread over
at most ``SYNC_THREADS_MAX`` concurrent calls through ``fs.start_in_thread``, whose
threads hand the outcome back with one ``call_soon_threadsafe``),
and tells each source how its own jobs ended (``sync_done``) as soon as they have,
which answers that source's waiters (a partition whose fdatasync returned first is
not held by a slower file of the same pass).

One pass at a time for the partitions, as a rule: sources marked while a pass runs
form the next pass, started as soon as the running pass's committer jobs have ended
(the group commit of the whole process, not of one partition: measured on a fan-out to
4 queues, letting each partition start its own next pass cost ~36 % more fdatasyncs
per message and ~24 % more broker CPU). The exception is a slow pass: once a source
has been marked for ``overlap_after_s`` behind a running pass, the next pass starts
beside it (at most ``PASSES_IN_FLIGHT_MAX`` at once), so a write behind a tail
fdatasync waits for its own sync, not for the rest of that one and then its own
(bench/README.md, "Fifth pass (kafkalat)"). A source that is not standing may then be
asked again while its jobs of the earlier pass still run; it is told how each pass
ended in the order it was asked (``sync_done`` in ``prepare_sync`` order), so a later
fdatasync that returned first never answers before an earlier one that may fail.
*Standing* sources (the state store) are asked at every pass, so a commit nobody
awaited rides along — but their jobs never hold the next pass: the WAL's fdatasync
(and the checkpoint after it) runs beside the partitions' passes, and a pass that
starts while the state store is still syncing leaves it for a later one. No fsync ever
runs on the event loop.

Knows nothing of partitions, SQL or acknowledgements. One barrier per event loop
(``barrier_for_loop``): every store opened on a loop shares it without wiring.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Callable
from typing import Protocol

from conveyor.storage.fs import start_in_thread

SyncJob = Callable[[], None]
# thread calls per pass: fdatasyncs of files on one disk gain little from more at once
# (plus one for the standing sources' jobs; fs.SYNC_THREADS_MAX threads serve them)
SYNC_THREADS_MAX = 4
# a second pass starts beside a running one once a source has waited this long behind
# it: beyond the idle disk's p99 100 B fdatasync (0.27 ms, kafka.json), so a typical
# pass still batches what came meanwhile and only a slow one is overlapped; 1 ms kept
# the sync path's p99 gain of 0.5 ms under load for half the extra CPU (bench/README.md,
# "Fifth pass (kafkalat)")
OVERLAP_AFTER_S = 0.001
PASSES_IN_FLIGHT_MAX = 2  # passes whose committer jobs run at once (a slow one + one)


class SyncSource(Protocol):
    def prepare_sync(self) -> list[SyncJob]:
        """On the loop, at the start of a pass: take what this pass makes durable and
        return the blocking calls that do it (run in worker threads)."""
        ...

    def sync_done(self, error: BaseException | None) -> None:
        """On the loop: this source's jobs of the pass ended (``error``: the first that
        failed); answer the waiters ``prepare_sync`` took."""
        ...


class _Pass:
    """The sources one pass took, and how many of each one's jobs are still running."""

    __slots__ = ("ended", "errors", "flushes", "holding", "owners", "remaining", "sources",
                 "standing")

    def __init__(self, sources: list[SyncSource], owners: list[int], remaining: list[int],
                 flushes: list[list[asyncio.Future[None]]], standing: list[bool]) -> None:
        self.sources = sources
        self.owners = owners  # job position -> index of its source
        self.remaining = remaining  # per source: its jobs not ended yet
        self.errors: list[BaseException | None] = [None] * len(sources)
        self.flushes = flushes  # per source: flush() callers this pass answers
        self.standing = standing  # per source: a standing one (its jobs hold no pass)
        self.ended = [False] * len(sources)  # per source: its jobs ended (maybe untold)
        # sources not standing whose jobs have not all ended: the next pass waits for them
        self.holding = sum(1 for index, count in enumerate(remaining)
                           if count and not standing[index])


class DurabilityBarrier:
    def __init__(self, overlap_after_s: float = OVERLAP_AFTER_S) -> None:
        self._dirty: dict[SyncSource, None] = {}  # ordered set: sources of the next pass
        self._standing: dict[SyncSource, None] = {}  # asked at every pass
        # per source: the passes (and its index in each) not told yet, oldest first
        self._busy: dict[SyncSource, list[tuple[_Pass, int]]] = {}
        self._running: list[_Pass] = []  # passes whose committer jobs still run, oldest first
        self.overlap_after_s = overlap_after_s
        self._overlap_timer: asyncio.TimerHandle | None = None  # armed behind a running pass
        self._flushes: dict[SyncSource, list[asyncio.Future[None]]] = {}  # flush() callers
        self._scheduled = False
        self.pass_count = 0  # passes started
        self.job_count = 0  # sync jobs (fdatasyncs, directory fsyncs) run
        self.overlap_count = 0  # passes started beside a running one

    def add_standing(self, source: SyncSource) -> None:
        self._standing[source] = None

    def remove_standing(self, source: SyncSource) -> None:
        self._standing.pop(source, None)
        self._dirty.pop(source, None)

    def mark_dirty(self, source: SyncSource) -> None:
        """Include ``source`` in the next pass (one that starts after its own jobs of an
        earlier pass, if any, have ended)."""
        self._dirty[source] = None
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start)

    async def flush(self, source: SyncSource) -> None:
        """Run a pass that includes ``source`` (and wait for its jobs)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flushes.setdefault(source, []).append(future)
        self.mark_dirty(source)
        await asyncio.shield(future)

    def _start(self) -> None:
        """A loop turn ended: a pass for every marked source that is not busy, unless a
        pass runs (then its end starts the next, or the overlap timer does)."""
        self._scheduled = False
        if self._running:
            if self._overlap_timer is None and len(self._running) < PASSES_IN_FLIGHT_MAX:
                self._overlap_timer = asyncio.get_running_loop().call_later(
                    self.overlap_after_s, self._start_overlap)
            return
        self._start_pass(overlap=False)

    def _start_overlap(self) -> None:
        """A source has waited ``overlap_after_s`` behind a running pass: the next pass
        starts beside it."""
        self._overlap_timer = None
        if self._running and len(self._running) < PASSES_IN_FLIGHT_MAX:
            self._start_pass(overlap=True)

    def _start_pass(self, *, overlap: bool) -> None:
        busy, standing = self._busy, self._standing
        # a busy source joins only beside a pass (it was marked behind it); a standing
        # one never runs two passes at once
        sources = [source for source in self._dirty if source not in busy
                   or (overlap and source not in standing)]
        if not sources:
            return  # a marked standing source is syncing: its end starts the next pass
        for source in sources:
            del self._dirty[source]
        sources += [source for source in self._standing
                    if source not in busy and source not in self._dirty
                    and source not in sources]
        self.pass_count += 1
        self.overlap_count += overlap
        prepared = [source.prepare_sync() for source in sources]
        for source in sources:  # marked again while preparing: this pass covers that
            self._dirty.pop(source, None)
        flushes = [self._flushes.pop(source, []) for source in sources]
        owners = [index for index, jobs in enumerate(prepared) for _ in jobs]
        jobs = [job for source_jobs in prepared for job in source_jobs]
        self.job_count += len(jobs)
        running = _Pass(sources, owners, [len(source_jobs) for source_jobs in prepared],
                        flushes, [source in self._standing for source in sources])
        if running.holding:
            self._running.append(running)
        for index, source_jobs in enumerate(prepared):
            busy.setdefault(sources[index], []).append((running, index))
            if not source_jobs:  # nothing to sync (a commit already durable): answered
                self._source_ended(running, index)  # now, or after its earlier pass
        # every job at once, spread over a few executor calls (one submission per file
        # cost the loop more than the files' own work), round-robin so one source's
        # jobs run side by side; the standing sources' jobs in a call of their own (a
        # WAL fdatasync queued behind a partition's would hold that partition's answer)
        holding = [position for position, owner in enumerate(owners)
                   if not running.standing[owner]]
        chunk_count = min(len(holding), SYNC_THREADS_MAX)
        chunks = [holding[start::chunk_count] for start in range(chunk_count)]
        if len(holding) < len(jobs):
            chunks.append([position for position, owner in enumerate(owners)
                           if running.standing[owner]])
        for positions in chunks:
            start_in_thread(_run_jobs, [jobs[i] for i in positions],
                            functools.partial(self._chunk_done, running, positions))

    def _chunk_done(self, running: _Pass, positions: list[int],
                    errors: list[BaseException | None] | None,
                    failure: BaseException | None) -> None:
        if errors is None:  # _run_jobs itself failed (it catches what its jobs raise)
            errors = [failure or RuntimeError("sync jobs ended without a result")] * len(
                positions)
        self._jobs_ended(running, positions, errors)

    def _jobs_ended(self, running: _Pass, positions: list[int],
                    errors: list[BaseException | None]) -> None:
        for position, error in zip(positions, errors, strict=True):
            owner = running.owners[position]
            if error is not None and running.errors[owner] is None:
                running.errors[owner] = error
            running.remaining[owner] -= 1
            if running.remaining[owner] == 0:
                if not running.standing[owner]:
                    running.holding -= 1
                    if running.holding == 0:
                        self._running.remove(running)
                        if self._overlap_timer is not None:  # re-armed by the next
                            self._overlap_timer.cancel()  # _start if a pass still runs
                            self._overlap_timer = None
                self._source_ended(running, owner)
        if self._dirty and not self._scheduled:  # marked while their pass ran
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start)

    def _source_ended(self, running: _Pass, owner: int) -> None:
        """The jobs of source ``owner`` in ``running`` ended: tell the source of every
        pass of it whose jobs have ended, oldest first, up to one still running."""
        running.ended[owner] = True
        source = running.sources[owner]
        untold = self._busy[source]
        while untold and untold[0][0].ended[untold[0][1]]:
            told, index = untold.pop(0)
            if not untold:
                del self._busy[source]
            self._finish(told, index)

    def _finish(self, running: _Pass, owner: int) -> None:
        """Every job of the pass's source ``owner`` ended: tell it, answer its flushes."""
        try:
            running.sources[owner].sync_done(running.errors[owner])
        finally:
            for future in running.flushes[owner]:
                if not future.done():
                    future.set_result(None)


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
