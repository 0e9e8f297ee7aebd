"""ClusterNode: one Conveyor node's membership wired to its broker (issue 12).

Owns: what a claim reloads (a partition's head and producers; a group's state, offsets,
configs, KIP-848 / KIP-932 members and pending transactional offsets; a transactional
id's transaction, finished if it was in flight), the group fence handed to the group
coordinator and the members' writes (a WriteGuard carried into an offset commit's, a
leader SyncGroup's, a TxnOffsetCommit's, a transaction end's and a membership write),
the transactional-id fence on every write of a transaction's row, the calls between a
transaction's coordinator and its groups' (txn_offsets_remote.py), the HTTP API's
ordered-group operations run by each group's owner (remote_groups.py), the
producer ids handed out from the database, the catalog kept alike on every node (topics,
queues, exchanges and bindings re-read when another node tells a change and every
heartbeat: catalog.py, applied by catalog_apply.py), and the view the Kafka listener
asks: live nodes and their addresses, each partition's leader and epoch, each group's
and transactional id's coordinator.
Must not know: wire formats.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from conveyor.broker.group_operations import GroupOperations, LocalGroups
from conveyor.broker.txn_model import TxnFence
from conveyor.clock import Clock
from conveyor.cluster.catalog import CatalogSync
from conveyor.cluster.catalog_apply import CatalogApply
from conveyor.cluster.internal_api import InternalServer, cluster_secret
from conveyor.cluster.lag import GROUP_LAG_SQL, group_lag, queue_backlog
from conveyor.cluster.membership import DB_ERRORS, ClusterSettings, Membership
from conveyor.cluster.ownership import GROUP, PARTITION, SHARED, TXN, item_name
from conveyor.cluster.remote_groups import OPS as GROUP_OPS
from conveyor.cluster.remote_groups import RemoteGroups
from conveyor.cluster.remote_queues import OwnerSide, RemoteQueues
from conveyor.cluster.txn_offsets_remote import OPS as TXN_OFFSETS_OPS
from conveyor.cluster.txn_offsets_remote import RemoteTxnOffsets
from conveyor.cluster.wakeups import Wakeups
from conveyor.config import TlsConfig
from conveyor.errors import UnavailableError
from conveyor.server.tls import RefusalLog, ServerTls
from conveyor.storage.log_api import PartitionLease
from conveyor.tasks import Supervisor

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker

logger = logging.getLogger("conveyor.cluster")


@dataclass(frozen=True, slots=True)
class InternalChannel:
    """How the node-to-node channel listens and connects (config ``[listeners.internal]``)."""

    port: int = 0  # 0: any free port
    server_tls: ServerTls | None = None  # the listener's context (SIGHUP reloads it)
    client_tls: TlsConfig | None = None  # this node's certificate and its peers' CA
    refusals: RefusalLog | None = None  # the server's rate-limited log of refused peers


class ClusterNode:
    def __init__(self, broker: Broker, settings: ClusterSettings, clock: Clock,
                 internal_host: str = "127.0.0.1", advertised_host: str = "127.0.0.1",
                 internal: InternalChannel | None = None) -> None:
        self.broker = broker
        # the node-to-node listener (internal_api.py): bound here, advertised as this
        self.internal_host = internal_host
        self.channel = internal or InternalChannel()
        self.advertised_host = advertised_host
        self.internal: InternalServer | None = None
        self.remote_queues: RemoteQueues | None = None
        self.owner_side: OwnerSide | None = None
        self.remote_txn: RemoteTxnOffsets | None = None  # transactional offsets across nodes
        self.remote_groups: RemoteGroups | None = None  # the HTTP API's group operations
        self.settings = settings
        self.membership = Membership(settings, clock)
        self.membership.on_acquire = self._acquired
        self._tasks = Supervisor("cluster-node")
        self._stopping = asyncio.Event()
        self.wakeups: Wakeups | None = None
        self.catalog: CatalogSync | None = None
        self.catalog_apply: CatalogApply | None = None
        self._shared: dict[str, tuple[str, str]] = {}  # item name -> (group, topic)
        self.secret = b""  # the cluster secret (internal_api.cluster_secret), at open
        # told a group id whenever this node claims it (protocols drop what they held)
        self._group_claimed: list[Callable[[str], Awaitable[None]]] = []

    @property
    def node_id(self) -> int:
        return self.membership.node_id

    async def open(self) -> None:
        """Register (before the listeners start: they advertise this node's id)."""
        producers = self.broker.producers
        producers.id_source = self.membership.allocate_producer_id
        producers.shared_store = True
        await self.membership.open({})
        coordinator = self.broker.group_coordinator
        coordinator.commit_guard = lambda group_id: self.membership.write_guard(
            GROUP, group_id)
        coordinator.guard_refused = lambda group_id: self.membership.forget(GROUP, group_id)
        transactions = self.broker.transactions
        # KIP-848 / KIP-932 members are written under the same fence
        members = self.broker.group_members
        members.guard = coordinator.commit_guard
        members.guard_refused = coordinator.guard_refused
        self._serve_transactions()
        self.secret = secret = await cluster_secret(self.settings.dsn)
        self._serve_txn_offsets(secret)
        self._serve_groups(secret)
        shared = self.broker.shared_groups
        if shared is not None:  # queue consumers on any node, served by the queue's owner
            broker = self.broker
            self.owner_side = OwnerSide(
                self.membership, shared, self.serve_shared, self.refresh_catalog,
                lambda name, if_unused, if_empty: broker.delete_queue(
                    name, if_unused, if_empty, local=True))
            channel = self.channel
            self.internal = InternalServer(secret, self._internal_request,
                                           self.owner_side.orphan, tls=channel.server_tls,
                                           refusals=channel.refusals)
            await self.internal.start(self.internal_host, channel.port)
            self.remote_queues = RemoteQueues(self.membership, shared, secret, self.serve_shared,
                                              tls=channel.client_tls)
            shared.remote = self.remote_queues
            # give back what consumers of dead nodes held here
            self._tasks.start(self._every_heartbeat(
                self.owner_side.sweep, "release of dead nodes' deliveries failed"),
                name="conveyor.cluster.sweep")
        # the catalog (topics among it) is re-read every heartbeat and when told
        self.catalog_apply = CatalogApply(self.broker)
        self.catalog = CatalogSync(self.settings.dsn, self.catalog_apply.reread,
                                   self.settings.heartbeat_ms)
        await self.catalog.open()
        self.broker.catalog_changed = self.catalog.changed
        self.broker.catalog_miss = self.catalog.miss
        self.broker.catalog_shared = True
        if hasattr(self.broker.log_store, "observe_head"):  # the PostgreSQL LogStore
            producer = self.broker.producer
            # a Kafka append is written only while this node's lease on the partition
            # holds at the epoch it had when it took the append (in the append's own
            # transaction); the others (queue publishes, markers) go through any node
            producer.lease = self._lease
            own = producer.on_append
            leader = transactions.leader

            def remote(topic: str, partition: int) -> None:
                own(topic, partition)
                if leader is not None:  # a marker written by a transaction's coordinator
                    leader.remote_appended(topic, partition)

            self.wakeups = Wakeups(self.settings.dsn, self.broker.log_store, remote,
                                   self.settings.heartbeat_ms)
            await self.wakeups.open()
            wakeups = self.wakeups

            def appended(topic: str, partition: int) -> None:
                own(topic, partition)
                wakeups.appended(topic, partition)

            producer.on_append = appended

    def _serve_transactions(self) -> None:
        """A transactional id is served by its owner only, reloaded at each claim, and
        every write of its row is fenced by its owner row; a partition leader checks the
        transactional batches of producers coordinated elsewhere against the store."""
        membership = self.membership
        transactions = self.broker.transactions
        transactions.clustered(TxnFence(
            lambda transactional_id: membership.write_guard(TXN, transactional_id),
            lambda transactional_id: membership.forget(TXN, transactional_id)))
        self.broker.producer.verify_transactional = transactions.verify_remote

    def _serve_txn_offsets(self, secret: bytes) -> None:
        """A transaction's end tells each of its groups' owner (on whichever node) how it
        ended; a TxnOffsetCommit v5 adds its group at the transactional id's owner."""
        broker = self.broker
        self.remote_txn = remote = RemoteTxnOffsets(
            self.membership, secret, self.membership.ensure_owned, broker.transactions,
            broker.txn_offsets, tls=self.channel.client_tls)
        broker.transactions.finish_offsets = remote.finish
        broker.transactions.add_group = remote.add_group

    def _serve_groups(self, secret: bytes) -> None:
        """The HTTP API's ordered-group operations: run by the group's owner (claimed on
        demand), forwarded to it from the other nodes."""
        self.remote_groups = RemoteGroups(
            self.membership, LocalGroups(self.broker), self.serve_group, self.broker.topics,
            self.refresh_catalog, secret, tls=self.channel.client_tls)

    async def _internal_request(self, op: str, args: dict[str, Any], node: int,
                                incarnation: int) -> Any:
        """What another node asks over the internal channel (internal_api.py)."""
        if op in TXN_OFFSETS_OPS and self.remote_txn is not None:
            return await self.remote_txn.handle(op, args)
        if op in GROUP_OPS and self.remote_groups is not None:
            return await self.remote_groups.handle(op, args)
        assert self.owner_side is not None  # the server starts after it
        return await self.owner_side.handle(op, args, node, incarnation)

    @property
    def groups(self) -> GroupOperations:
        """The HTTP API's ordered-group operations: run by each group's owner."""
        assert self.remote_groups is not None, "groups before open"
        return self.remote_groups

    def derived_key(self, label: str) -> bytes:
        """A key every node derives alike (receipt seals valid on any node)."""
        assert self.secret, "derived_key before open"
        return hmac.new(self.secret, label.encode(), hashlib.sha256).digest()

    async def advertise(self, addresses: dict[str, str]) -> None:
        """The listeners' addresses, once they are bound (and the internal one)."""
        if self.internal is not None:
            addresses = {**addresses,
                         "internal": f"{self.advertised_host}:{self.internal.port}"}
        await self.membership.advertise(addresses)

    async def close(self) -> None:
        """Drain: hand every lease over, then stop."""
        self._stopping.set()
        await self._tasks.close(cancel=True)
        if self.remote_queues is not None:
            await self.remote_queues.close()
        if self.owner_side is not None:
            await self.owner_side.close()
        if self.remote_txn is not None:
            await self.remote_txn.close()
        if self.remote_groups is not None:
            await self.remote_groups.close()
        if self.internal is not None:
            await self.internal.close()
        if self.wakeups is not None:
            await self.wakeups.close()
        if self.catalog is not None:
            await self.catalog.close()
        await self.membership.close(drain=True)

    async def _every_heartbeat(self, action: Callable[[], Awaitable[None]],
                               failure: str) -> None:
        """Run ``action`` once a heartbeat until the node stops; a failure is logged and
        the next turn retries."""
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(),
                                       self.settings.heartbeat_ms / 1000)
                return
            except TimeoutError:
                pass
            try:
                await action()
            except Exception as error:  # logged; the next turn retries
                logger.warning(failure, extra={"error": str(error)})

    async def refresh_catalog(self) -> None:
        """Re-read the topic catalog now (a name another node may just have created)."""
        await self.broker.topics.load()

    async def serve_shared(self, group: str, topic: str) -> bool:
        """Does this node hold the queue's (shared group's) window? Its owner only; the
        others forward to it (remote_queues.py)."""
        name = item_name(SHARED, group, topic)
        self._shared[name] = (group, topic)
        return await self.membership.ensure_owned(SHARED, name)

    async def _acquired(self, kind: str, name: str) -> None:
        """Reload what another node may have changed while it owned the item."""
        if kind == SHARED:
            group, topic = self._shared[name]
            if self.broker.shared_groups is not None:
                await self.broker.shared_groups.reload_group(group, topic)
            return
        if kind == TXN:
            # topics made on other nodes first: a marker goes to every partition the
            # transaction holds, and an unknown one would be skipped
            await self.broker.topics.load()
            await self.broker.transactions.reload(name)
            return
        if kind == GROUP:
            await self.broker.group_coordinator.reload_group(name)
            await self.broker.txn_offsets.reload_group(name)  # a dead owner's pending ones
            await self.broker.group_configs.reload_group(name)
            for callback in self._group_claimed:
                await callback(name)
            return
        topic, _, index = name.rpartition("/")
        partition = int(index)
        if not self.broker.log_store.has_partition(topic, partition):
            await self.broker.topics.load()
        refresh = getattr(self.broker.log_store, "refresh_partition", None)
        if refresh is not None and self.broker.log_store.has_partition(topic, partition):
            await refresh(topic, partition)
            leader = self.broker.transactions.leader
            if leader is not None:  # its open and aborted transactions, from the log
                await leader.rebuild(topic, partition)
        self.broker.producers.forget_partition(topic, partition)

    # --- the view the Kafka listener asks --------------------------------------------
    def kafka_nodes(self) -> list[tuple[int, str, int]]:
        """(node id, host, port) of every live node's Kafka listener."""
        found = []
        for node in self.membership.live_nodes():
            address = node.addresses.get("kafka")
            if address is None:
                continue
            host, _, port = address.rpartition(":")
            found.append((node.node_id, host, int(port)))
        return found

    def partition_leader(self, topic: str, partition: int) -> tuple[int, int]:
        """(leader node id or -1, leader epoch)."""
        owner, epoch = self.membership.owner_of(PARTITION, item_name(PARTITION, topic, partition))
        return (owner if owner is not None else -1), epoch

    def group_coordinator(self, group_id: str) -> int:
        owner, _ = self.membership.owner_of(GROUP, group_id)
        return owner if owner is not None else -1

    def txn_coordinator(self, transactional_id: str) -> int:
        owner, _ = self.membership.owner_of(TXN, transactional_id)
        return owner if owner is not None else -1

    async def serve_txn(self, transactional_id: str) -> bool:
        return await self.membership.ensure_owned(TXN, transactional_id)

    async def serve_partition(self, topic: str, partition: int) -> bool:
        return await self.membership.ensure_owned(
            PARTITION, item_name(PARTITION, topic, partition))

    def _lease(self, topic: str, partition: int) -> PartitionLease | None:
        return self.membership.lease(PARTITION, item_name(PARTITION, topic, partition))

    async def serve_group(self, group_id: str) -> bool:
        return await self.membership.ensure_owned(GROUP, group_id)

    def on_group_claimed(self, callback: Callable[[str], Awaitable[None]]) -> None:
        """Await ``callback(group_id)`` whenever this node claims a group (the KIP-848 and
        share coordinators read the group's members again from the state store)."""
        self._group_claimed.append(callback)

    def status(self) -> dict[str, Any]:
        return self.membership.status()

    async def lag(self) -> dict[str, Any]:
        """Per group its lag (from PostgreSQL), per queue its backlog (from its owner)."""
        owners = self.membership.owner_rows()
        try:
            rows = await self.membership.read(GROUP_LAG_SQL)
        except DB_ERRORS as error:
            raise UnavailableError("cannot read the cluster database",
                                   reason=str(error)) from error
        return {"groups": group_lag(rows, owners),
                "queues": await queue_backlog(self.broker, owners)}
