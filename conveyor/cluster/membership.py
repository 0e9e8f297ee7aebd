"""Membership: nodes, leases and owner epochs in PostgreSQL (issue 12).

Owns: this node's row in ``conveyor_nodes`` (advertised addresses per listener, a lease
renewed every heartbeat and judged by the database clock), the owner rows of
``conveyor_owners`` (one per partition or group: owner node and epoch), claiming and
releasing them, and the producer-id sequence shared by every node.

Rules:
- A node is live while ``lease_until > clock_timestamp()`` on the database.
- An item belongs to the live node rendezvous hashing picks (ownership.py). The chosen
  node claims the row when a request first needs it: the claim bumps the epoch and
  succeeds only while the previous owner is no longer live or has released it. A node
  that stops being the choice releases the row (``WHERE epoch = $mine``).
- Locally a node serves only while its own view of the lease is fresh (monotonic
  clock): a node paused past its lease serves nothing when it wakes, and its next
  heartbeat finds the lease lapsed and drops every ownership (re-claiming bumps the
  epoch and reloads state). Writes on the owner rows are fenced by epoch; a
  coordinator's own writes (an offset commit, a leader's SyncGroup, a TxnOffsetCommit)
  carry ``write_guard``: the owner row checked and share-locked inside the write's
  transaction; a refused one makes the node ``forget`` the item.
Must not know: protocols, the broker (acquisition hooks are callbacks).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import asyncpg

from conveyor.clock import Clock
from conveyor.cluster.ownership import choose_owner
from conveyor.errors import StorageError, UnavailableError
from conveyor.storage.log_api import PartitionLease
from conveyor.storage.postgres_dsn import (
    COMMAND_TIMEOUT_S,
    CONNECT_TIMEOUT_S,
    NO_PRIMARY_YET,
    SESSION_SETTINGS,
)
from conveyor.storage.sql_engine import WriteGuard
from conveyor.tasks import Supervisor

logger = logging.getLogger("conveyor.cluster")
# what a dropped connection or a database going away raises (retried at the next turn)
DB_ERRORS: Final = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
                    NO_PRIMARY_YET)

SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS conveyor_nodes (
        node_id INTEGER PRIMARY KEY, addresses TEXT NOT NULL, incarnation BIGINT NOT NULL,
        started_at TIMESTAMPTZ NOT NULL, lease_until TIMESTAMPTZ NOT NULL,
        draining BOOLEAN NOT NULL DEFAULT false)""",
    """CREATE TABLE IF NOT EXISTS conveyor_owners (
        kind TEXT NOT NULL, name TEXT NOT NULL, owner INTEGER, epoch BIGINT NOT NULL,
        since TIMESTAMPTZ NOT NULL, PRIMARY KEY (kind, name))""",
    "CREATE SEQUENCE IF NOT EXISTS conveyor_node_ids START WITH 1000",
    # producer ids handed out by any node; above the range a single node's counter used
    "CREATE SEQUENCE IF NOT EXISTS conveyor_producer_ids START WITH 4294967296",
)
REGISTER: Final = """INSERT INTO conveyor_nodes AS n
    (node_id, addresses, incarnation, started_at, lease_until)
    VALUES ($1, $2, 1, clock_timestamp(), clock_timestamp() + $3 * interval '1 millisecond')
    ON CONFLICT (node_id) DO UPDATE SET addresses = EXCLUDED.addresses,
        incarnation = n.incarnation + 1, started_at = EXCLUDED.started_at,
        lease_until = EXCLUDED.lease_until, draining = false
    WHERE n.lease_until <= clock_timestamp() OR n.draining
    RETURNING incarnation"""
# renew; says whether the lease had already lapsed (others may have taken our items)
HEARTBEAT: Final = """UPDATE conveyor_nodes n
    SET lease_until = clock_timestamp() + $3 * interval '1 millisecond'
    FROM (SELECT lease_until AS before FROM conveyor_nodes WHERE node_id = $1) o
    WHERE n.node_id = $1 AND n.incarnation = $2 AND NOT n.draining
    RETURNING o.before <= clock_timestamp() AS lapsed"""
LIVE_NODES: Final = """SELECT node_id, addresses, lease_until, started_at, draining,
    lease_until > clock_timestamp() AS live FROM conveyor_nodes ORDER BY node_id"""
OWNERS: Final = "SELECT kind, name, owner, epoch, since FROM conveyor_owners"
# the claim: only a live claimer, only from no owner, itself, or an owner that is not live
CLAIM: Final = """INSERT INTO conveyor_owners AS o (kind, name, owner, epoch, since)
    SELECT $1, $2, $3, 1, clock_timestamp() WHERE EXISTS (SELECT 1 FROM conveyor_nodes
        WHERE node_id = $3 AND incarnation = $4 AND lease_until > clock_timestamp())
    ON CONFLICT (kind, name) DO UPDATE SET owner = EXCLUDED.owner, epoch = o.epoch + 1,
        since = EXCLUDED.since
    WHERE o.owner IS NULL OR o.owner = EXCLUDED.owner OR NOT EXISTS (
        SELECT 1 FROM conveyor_nodes WHERE node_id = o.owner
        AND lease_until > clock_timestamp() AND NOT draining)
    RETURNING epoch"""
RELEASE: Final = """UPDATE conveyor_owners SET owner = NULL, since = clock_timestamp()
    WHERE kind = $1 AND name = $2 AND owner = $3 AND epoch = $4"""
# a coordinator write's fence: still the owner at this epoch, with a live lease
FENCE: Final = """SELECT 1 FROM conveyor_owners o JOIN conveyor_nodes n ON n.node_id = o.owner
    WHERE o.kind = $1 AND o.name = $2 AND o.owner = $3 AND o.epoch = $4
    AND n.incarnation = $5 AND n.lease_until > clock_timestamp()"""
# the same fence inside a coordinator write's own transaction: it locks the owner row
# (FOR SHARE), so a claim by another node waits until the write has committed, and a
# claim that committed first makes it find no row (the write is then not made)
FENCE_LOCKED: Final = FENCE + " FOR SHARE OF o"
# the partition fence of Kafka appends, in the append transaction after the head locks
# ($1 names, $2 epochs; log_api.PartitionLease): the owner rows still this node's at
# those epochs under a live lease, share-locked until COMMIT
LEASES_LOCKED: Final = """SELECT o.name, o.epoch
    FROM unnest($1::text[], $2::bigint[]) AS w(name, epoch)
    JOIN conveyor_owners o ON o.kind = $3 AND o.name = w.name AND o.epoch = w.epoch
    JOIN conveyor_nodes n ON n.node_id = o.owner
    WHERE o.owner = $4 AND n.incarnation = $5 AND n.lease_until > clock_timestamp()
    FOR SHARE OF o"""
DRAIN: Final = """UPDATE conveyor_nodes SET draining = true, lease_until = clock_timestamp()
    WHERE node_id = $1 AND incarnation = $2"""

Acquire = Callable[[str, str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    dsn: str
    node_id: int | None = None  # None: the database hands one out
    heartbeat_ms: int = 3_000
    lease_ms: int = 10_000


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: int
    addresses: dict[str, str]
    live: bool
    draining: bool
    lease_until: str
    started_at: str


@dataclass(slots=True)
class _View:
    """What the last heartbeat read: every node, every owner row."""

    nodes: dict[int, NodeInfo] = field(default_factory=dict)
    owners: dict[tuple[str, str], tuple[int | None, int]] = field(default_factory=dict)

    def live(self) -> list[int]:
        return [node.node_id for node in self.nodes.values() if node.live and not node.draining]


class Membership:
    def __init__(self, settings: ClusterSettings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self.node_id = settings.node_id if settings.node_id is not None else -1
        self.incarnation = 0
        self.addresses: dict[str, str] = {}
        self.on_acquire: Acquire | None = None  # reload state of an item just claimed
        self._pool: Any = None
        self._view = _View()
        self._owned: dict[tuple[str, str], int] = {}  # items this node serves -> epoch
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._serving_until_ms = 0  # local monotonic end of the lease as last renewed
        self._tasks = Supervisor("cluster")
        self._stopping = False

    # --- lifecycle -------------------------------------------------------------------
    async def open(self, addresses: dict[str, str]) -> None:
        self.addresses = dict(addresses)
        try:
            self._pool = await asyncpg.create_pool(
                self.settings.dsn, min_size=1, max_size=3, server_settings=SESSION_SETTINGS,
                command_timeout=COMMAND_TIMEOUT_S, timeout=CONNECT_TIMEOUT_S)
        except DB_ERRORS as error:
            raise StorageError("cannot reach the cluster database", reason=str(error)) from error
        async with self._pool.acquire() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock(7140012)")
            for statement in SCHEMA:
                await connection.execute(statement)
        await self._register()
        await self._refresh()
        self._tasks.start(self._heartbeats(), name="conveyor.cluster.heartbeat")
        logger.info("cluster node registered", extra={
            "node_id": self.node_id, "incarnation": self.incarnation, "addresses": addresses})

    async def advertise(self, addresses: dict[str, str]) -> None:
        """The listeners' addresses, once bound; then a heartbeat reads the cluster."""
        self.addresses = dict(addresses)
        async with self._pool.acquire() as connection:
            await connection.execute(
                "UPDATE conveyor_nodes SET addresses = $3 WHERE node_id = $1 "
                "AND incarnation = $2", self.node_id, self.incarnation, json.dumps(addresses))
        await self.heartbeat()

    async def _register(self) -> None:
        started_ms = self.clock.monotonic_ms()
        async with self._pool.acquire() as connection:
            if self.settings.node_id is None:
                for _ in range(100):
                    candidate = int(await connection.fetchval(
                        "SELECT nextval('conveyor_node_ids')"))
                    incarnation = await connection.fetchval(
                        REGISTER, candidate, json.dumps(self.addresses), self.settings.lease_ms)
                    if incarnation is not None:
                        self.node_id = candidate
                        break
            else:
                incarnation = await connection.fetchval(
                    REGISTER, self.node_id, json.dumps(self.addresses), self.settings.lease_ms)
        if incarnation is None:
            raise UnavailableError("node id is in use by a live node", node_id=self.node_id)
        self.incarnation = int(incarnation)
        self._serving_until_ms = started_ms + self._local_lease_ms()

    def _local_lease_ms(self) -> int:
        # a margin under the database's lease (counted from before the heartbeat was
        # sent) so this node stops serving before another may take its items over
        return max(self.settings.lease_ms - self.settings.lease_ms // 10, 1)

    async def close(self, drain: bool = True) -> None:
        """Give up every lease (others take over at once), stop heart-beating."""
        self._stopping = True
        await self._tasks.close(cancel=True)
        if self._pool is None:
            return
        if drain:
            try:
                async with self._pool.acquire() as connection:
                    for (kind, name), epoch in list(self._owned.items()):
                        await connection.execute(RELEASE, kind, name, self.node_id, epoch)
                    await connection.execute(DRAIN, self.node_id, self.incarnation)
            except DB_ERRORS as error:
                logger.warning("could not hand over leases", extra={"error": str(error)})
        self._owned.clear()
        self._serving_until_ms = 0
        pool, self._pool = self._pool, None
        try:
            await asyncio.wait_for(pool.close(), 5)
        except DB_ERRORS:
            pool.terminate()

    # --- heartbeats ------------------------------------------------------------------
    async def _heartbeats(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.settings.heartbeat_ms / 1000)
            try:
                await self.heartbeat()
            except DB_ERRORS as error:
                logger.warning("cluster heartbeat failed", extra={"error": str(error)})

    async def heartbeat(self) -> None:
        sent_ms = self.clock.monotonic_ms()
        async with self._pool.acquire() as connection:
            lapsed = await connection.fetchval(
                HEARTBEAT, self.node_id, self.incarnation, self.settings.lease_ms, timeout=5)
        if lapsed is None:  # our row was taken over by a new incarnation, or we drain
            self._lose_all("node row taken over")
            return
        if lapsed:
            self._lose_all("lease lapsed")
        self._serving_until_ms = sent_ms + self._local_lease_ms()
        await self._refresh()
        await self._release_moved()

    def _lose_all(self, reason: str) -> None:
        if self._owned:
            logger.warning("dropping every ownership", extra={
                "reason": reason, "items": len(self._owned)})
        self._owned.clear()

    async def _refresh(self) -> None:
        async with self._pool.acquire() as connection:
            nodes = await connection.fetch(LIVE_NODES)
            owners = await connection.fetch(OWNERS)
        view = _View()
        for row in nodes:
            view.nodes[row["node_id"]] = NodeInfo(
                row["node_id"], json.loads(row["addresses"]), bool(row["live"]),
                bool(row["draining"]), row["lease_until"].isoformat(),
                row["started_at"].isoformat())
        for row in owners:
            view.owners[(row["kind"], row["name"])] = (row["owner"], int(row["epoch"]))
        self._view = view
        for key, epoch in list(self._owned.items()):  # someone took it: not ours any more
            owner, current = view.owners.get(key, (self.node_id, epoch))  # absent: a claim
            if current > epoch or (owner is not None and owner != self.node_id):  # newer
                del self._owned[key]  # than this read (the read raced it) is still ours

    async def _release_moved(self) -> None:
        live = self._view.live()
        for (kind, name), epoch in list(self._owned.items()):
            if choose_owner(kind, name, live) == self.node_id:
                continue
            async with self._lock(kind, name):
                if self._owned.get((kind, name)) != epoch:
                    continue
                del self._owned[(kind, name)]
                async with self._pool.acquire() as connection:
                    await connection.execute(RELEASE, kind, name, self.node_id, epoch)

    # --- ownership ---------------------------------------------------------------------
    def serving(self) -> bool:
        return not self._stopping and self.clock.monotonic_ms() < self._serving_until_ms

    def live_nodes(self) -> list[NodeInfo]:
        nodes = [node for node in self._view.nodes.values() if node.live and not node.draining]
        if self.serving() and all(node.node_id != self.node_id for node in nodes):
            nodes.append(NodeInfo(self.node_id, self.addresses, True, False, "", ""))
        return sorted(nodes, key=lambda node: node.node_id)

    def owner_of(self, kind: str, name: str) -> tuple[int | None, int]:
        """(the node that should serve the item, the epoch of its owner row)."""
        live = [node.node_id for node in self.live_nodes()]
        _, epoch = self._view.owners.get((kind, name), (None, 0))
        if (kind, name) in self._owned:
            epoch = self._owned[(kind, name)]
        return choose_owner(kind, name, live), epoch

    def owns(self, kind: str, name: str) -> bool:
        return self.serving() and (kind, name) in self._owned

    def _lock(self, kind: str, name: str) -> asyncio.Lock:
        lock = self._locks.get((kind, name))
        if lock is None:
            lock = self._locks[(kind, name)] = asyncio.Lock()
        return lock

    async def ensure_owned(self, kind: str, name: str) -> bool:
        """Serve this item? Claims it (and reloads its state) when this node is the choice."""
        if not self.serving():
            return False
        if (kind, name) in self._owned:
            return True
        if self.owner_of(kind, name)[0] != self.node_id:
            return False
        async with self._lock(kind, name):
            if (kind, name) in self._owned:
                return True
            try:
                async with self._pool.acquire() as connection:
                    epoch = await connection.fetchval(
                        CLAIM, kind, name, self.node_id, self.incarnation, timeout=5)
            except DB_ERRORS as error:
                logger.warning("claim failed", extra={"item": name, "error": str(error)})
                return False
            if epoch is None:
                return False
            if self.on_acquire is not None:
                await self.on_acquire(kind, name)
            self._owned[(kind, name)] = int(epoch)
            self._view.owners[(kind, name)] = (self.node_id, int(epoch))
            logger.info("claimed", extra={"kind": kind, "item": name, "epoch": epoch})
            return True

    async def fence(self, kind: str, name: str) -> bool:
        """Is this node still the owner at its epoch, with a live lease, by the database?"""
        epoch = self._owned.get((kind, name))
        if epoch is None or self._pool is None:
            return False
        try:
            async with self._pool.acquire() as connection:
                found = await connection.fetchval(
                    FENCE, kind, name, self.node_id, epoch, self.incarnation, timeout=5)
        except DB_ERRORS:
            return False  # cannot tell: do not write
        if found is None:
            self._owned.pop((kind, name), None)
            return False
        return True

    def forget(self, kind: str, name: str) -> None:
        """A write under this item's guard found no row: another node owns it now."""
        if self._owned.pop((kind, name), None) is not None:
            logger.warning("lost an item found by its fence", extra={
                "kind": kind, "item": name})

    def write_guard(self, kind: str, name: str) -> WriteGuard | None:
        """The fence a write about this item carries into its own transaction (owner,
        epoch and a live lease, on the database); None when this node does not serve it."""
        epoch = self._owned.get((kind, name))
        if epoch is None or not self.serving():
            return None
        return WriteGuard(FENCE_LOCKED, (kind, name, self.node_id, epoch, self.incarnation))

    def lease(self, kind: str, name: str) -> PartitionLease | None:
        """This node's lease on an item it serves now (its owner-row epoch, and the check
        the log store runs in an append's transaction); None if it does not serve it."""
        epoch = self._owned.get((kind, name))
        if epoch is None or not self.serving():
            return None
        return PartitionLease(name, epoch, LEASES_LOCKED, (kind, self.node_id,
                                                           self.incarnation))

    async def allocate_producer_id(self) -> int:
        async with self._pool.acquire() as connection:
            return int(await connection.fetchval("SELECT nextval('conveyor_producer_ids')"))

    async def read(self, query: str) -> list[Any]:
        """Rows of a read-only query on the cluster database (``cluster status``'s lag)."""
        async with self._pool.acquire() as connection:
            return list(await connection.fetch(query))

    def owner_rows(self) -> dict[tuple[str, str], int | None]:
        """(kind, name) -> owner node id (None: unowned), as last read."""
        return {key: owner for key, (owner, _) in self._view.owners.items()}

    def status(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id, "incarnation": self.incarnation,
            "serving": self.serving(),
            "nodes": [{"node_id": node.node_id, "addresses": node.addresses,
                       "live": node.live, "draining": node.draining,
                       "lease_until": node.lease_until, "started_at": node.started_at}
                      for node in self._view.nodes.values()],
            "owners": [{"kind": kind, "name": name, "owner": owner, "epoch": epoch}
                       for (kind, name), (owner, epoch) in sorted(
                           self._view.owners.items())],
            "owned": sorted(f"{kind}:{name}" for kind, name in self._owned),
        }
