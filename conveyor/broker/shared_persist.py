"""WindowPersister: shared-group windows saved once per event-loop turn (KIP-932 style).

Owns when a shared partition's state reaches the StateStore. A change to a window
(ack, release, acquire, a moved start offset) only marks the partition dirty; at
the end of the loop turn (``loop.call_soon``, after every handler that ran in the
turn) each dirty partition is saved once as its start offset plus runs of offsets
in one state (``snapshot`` below, folded by ``shared_state.runs``): three
SQL statements per partition per turn, whatever the number of acks. So an ack
costs no row of its own, and a batch of 1,000 acks costs what one costs.

Durability: ``durable()`` returns once every change made before it was called is
saved and its COMMIT is on disk (the StateStore's commit). Acks that answer their
client wait for it. ``committed()`` returns once they are saved and COMMITted, fsynced
or not: an acquire that moved past the committed delivered mark waits for that before
its deliveries leave the process (a mark saved ahead covers the next ones), so a killed
process (-9) keeps the delivered mark of every record it handed out (AMQP's
redelivered flag, the counts behind max_deliveries); a power cut before the next
fsync may lose it, and the record then counts one delivery fewer, as KIP-932 accepts
for the acquired state.

A record that died but whose dead letter is not written yet is saved as unsettled
(the start offset stays at or below it): a crash then judges it again rather than
losing it with its dead letter; ``SharedWindows._flush`` marks the partition again
once the dead letter is written.

Must not know: protocols, the log. It calls the shared-state store only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from conveyor.errors import StorageError
from conveyor.storage.shared_state import RecordRow, SharedStateStore, delivered_mark, runs

from .shared_group import FINAL, RecordState, SharedPartition

# (group, topic, partition)
Key = tuple[str, str, int]


class WindowPersister:
    def __init__(self, store: SharedStateStore, wall_skew_ms: Callable[[], int],
                 live: Callable[[str, str, SharedPartition], bool]) -> None:
        self.store = store
        self._wall_skew_ms = wall_skew_ms
        self._live = live  # False once the group or partition was deleted or replaced
        # key -> (partition window, the group's saved-start map, old-table rows to drop)
        self._dirty: dict[Key, tuple[SharedPartition, dict[int, int], bool]] = {}
        self._round: asyncio.Future[None] | None = None  # resolves after this turn's save
        self.saves = 0  # partitions written (statistics, tests)

    def mark(self, group: str, topic: str, part: SharedPartition,
             saved_start: dict[int, int], legacy_rows: bool = False) -> None:
        key = (group, topic, part.partition)
        previous = self._dirty.get(key)
        legacy = legacy_rows or (previous is not None and previous[2])
        self._dirty[key] = (part, saved_start, legacy)
        if self._round is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # outside a loop (tests, tools): saved at the next flush
                return
            self._round = loop.create_future()
            loop.call_soon(self._save_round)

    async def durable(self) -> None:
        """Every change marked so far saved and committed durably."""
        round_ = self._round
        if round_ is not None:
            await asyncio.shield(round_)
        await self.store.commit()

    async def committed(self) -> None:
        """Every change marked so far saved and committed, fsynced or not: it survives a
        killed process (the COMMIT is in the page cache), not a power cut."""
        round_ = self._round
        if round_ is not None:
            await asyncio.shield(round_)
        await self.store.committed()

    def flush(self) -> None:
        """Save every dirty partition now (close, and callers outside a loop)."""
        self._save_round()

    def _save_round(self) -> None:
        round_, self._round = self._round, None
        dirty, self._dirty = self._dirty, {}
        skew_ms = self._wall_skew_ms()
        error: StorageError | None = None
        for (group, topic, partition), (part, saved_start, legacy) in dirty.items():
            if not self._live(group, topic, part):
                continue
            start, rows = snapshot(part, skew_ms)
            ranges = runs(rows)
            assert part.delivered_mark >= part.delivered_end, (part.delivered_mark,
                                                               part.delivered_end)
            if part.delivered_mark > start:
                ranges.append(delivered_mark(part.delivered_mark))
            saved = (start, ranges)
            if saved == part.saved_snapshot and not legacy:
                continue
            try:
                self.store.save_partition(group, topic, partition, start, ranges,
                                          legacy_rows=legacy)
            except StorageError as failure:
                error = error or failure
                continue
            part.saved_snapshot = saved
            saved_start[partition] = start
            self.saves += 1
        if round_ is None:
            return
        if error is not None:
            round_.set_exception(error)
            round_.add_done_callback(_retrieve)
        else:
            round_.set_result(None)


def snapshot(part: SharedPartition, skew_ms: int) -> tuple[int, list[RecordRow]]:
    """The start offset to save and what a restart needs of the offsets at or above
    it, ascending (KIP-932's state batches before folding): settled offsets as acked,
    counted records (``part.counted``) as available with their count or delayed (a lock
    does not survive a restart: acquired is saved as available), delays in wall ms
    (``skew_ms`` = wall - monotonic), the saved state of offsets not loaded yet, and
    records whose dead letter is still being written as available (the start stays at
    or below them). An offset in none of these is available, never delivered: no row."""
    dying = dict(part.dying)
    for change in part.changes:  # killed, not yet taken by a flush
        if change.state is RecordState.DEAD and change.reason is not None:
            dying[change.offset] = change.delivery_count
    start = min([part.start_offset, *dying])
    rows: dict[int, RecordRow] = {offset: RecordRow(offset, "acked", 0, 0)
                                  for offset in range(start, part.start_offset)}
    for offset, (state, count, at_ms) in part.pending_rows.items():
        if offset >= start:
            rows[offset] = _row(offset, state, count, at_ms, skew_ms)
    for offset in part.settled:
        if offset >= start:
            rows[offset] = RecordRow(offset, "acked", 0, 0)
    for offset in part.counted:
        entry = part.entries.get(offset)
        if entry is not None and offset >= start:
            state = (RecordState.DELAYED if entry.state is RecordState.DELAYED
                     and entry.dead_reason is None else RecordState.AVAILABLE)
            rows[offset] = _row(offset, state, entry.delivery_count, entry.available_at_ms,
                                skew_ms)
    for offset, count in dying.items():
        rows[offset] = RecordRow(offset, "available", count, 0)
    return start, [rows[offset] for offset in sorted(rows)]


def _row(offset: int, state: RecordState, count: int, at_ms: int, skew_ms: int) -> RecordRow:
    if state in FINAL:
        return RecordRow(offset, "acked", 0, 0)
    if state is RecordState.DELAYED:
        return RecordRow(offset, "delayed", count, at_ms + skew_ms if at_ms else 0)
    return RecordRow(offset, "available", count, 0)


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
