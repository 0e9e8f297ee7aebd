"""IdleTransactionalIds: Kafka's ``transactional.id.expiration.ms`` for the transaction
coordinator (split from transactions.py).

Owns: the idle-deadline heap of transactional ids (``IdleExpiry``: one entry per id;
a use only moves the row's ``updated_ms``, persisted with it) and the pass that
forgets the ids idle for the whole period. An id with a transaction open is in use
(its timeout ends the transaction first); an id is judged again under its lock before
it goes. The coordinator does the forgetting (``forget``, called under the lock).
Must not know: protocols, files, SQL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from conveyor.clock import Clock
from conveyor.storage.txn_state import TransactionRow

from .idle_expiry import IdleExpiry
from .keyed_locks import KeyedLocks
from .txn_model import OPEN

logger = logging.getLogger("conveyor.transactions")


class IdleTransactionalIds:
    def __init__(self, clock: Clock, idle_ms: int, rows: dict[str, TransactionRow],
                 locks: KeyedLocks, forget: Callable[[TransactionRow], None]) -> None:
        self.clock = clock
        self._rows = rows  # the coordinator's rows, by transactional id (read here)
        self._locks = locks  # the coordinator's per-id locks
        self._forget = forget
        self._idle: IdleExpiry[str] = IdleExpiry(idle_ms)
        self.expired = 0  # transactional ids forgotten for idleness (a counter)

    def loaded(self, row: TransactionRow) -> None:
        if row.updated_ms < 0:  # written before updated_ms was kept: used now
            row.updated_ms = self.clock.wall_ms()
        self._idle.arm(row.transactional_id, row.updated_ms)

    def touch(self, row: TransactionRow) -> None:
        self._idle.arm(row.transactional_id, row.updated_ms)

    def __len__(self) -> int:
        return len(self._idle)

    async def expire(self) -> list[str]:
        """Forget the ids idle past the period; only heap entries that came due are
        looked at. The caller commits the state store."""
        now_ms = self.clock.wall_ms()
        next_ms = self._idle.next_deadline_ms()
        if next_ms is None or next_ms > now_ms:
            return []
        expired = []
        for transactional_id in self._idle.due(now_ms, self._last_used):
            async with self._locks.hold(transactional_id):
                row = self._rows.get(transactional_id)
                if row is None:
                    continue
                if row.state in OPEN or \
                        row.updated_ms + self._idle.idle_ms > self.clock.wall_ms():
                    self._idle.arm(transactional_id, row.updated_ms)  # used meanwhile
                    continue
                logger.info("transactional id %s expired (idle since %d)", transactional_id,
                            row.updated_ms)
                self._forget(row)
                expired.append(transactional_id)
        self.expired += len(expired)
        return expired

    def _last_used(self, transactional_id: str) -> int | None:
        row = self._rows.get(transactional_id)
        if row is None:
            return None
        if row.state in OPEN:  # in use: its timeout ends the transaction first
            return self.clock.wall_ms()
        return row.updated_ms
