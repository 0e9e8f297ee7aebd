"""What another node changed in the catalog, applied to this node's memory (issue 12).

Owns: the re-read that catalog.py runs when another node tells a change (and every
heartbeat): the topics, the queues, the durable exchanges and bindings, compared with
what this node holds and applied as a difference, never written back to the stores.

- **Topics** (queues are topics too): a topic held here whose row is gone from the
  state store was deleted elsewhere; one whose partitions have other ids in the log
  database (``PostgresLogStore.stored_partitions``) was deleted and made again under the
  same name. Either way it is forgotten here: its topic entry, its partitions' view,
  its producer states, its transaction index, the groups' pending transactional offsets
  of it, its counters and its shared groups (the
  queue's window copy; their parked acquires return empty and the next one is "unknown
  queue", so an AMQP consumer here is cancelled) and its long-poll fetches are woken.
  Then the topics are loaded again, the new incarnation among them. The name is never
  what decides: a topic declared again after the delete has new partition ids, and a
  late notification of the delete finds the new one in the store and leaves it.
- **Queues**: a queue stored but not held here is loaded (as a non-owner loads one at
  its first acquire); a queue whose stored config differs from the one held here takes
  the stored one (an alter made elsewhere), in memory only.
- **Exchanges and bindings**: ``Exchanges.reload``.

A re-read that overlapped a change made on this node (a topic created, deleted or
altered here; a queue altered here) is thrown away and read again, at most
``ATTEMPTS`` times; the next notification or heartbeat catches up after that.
Must not know: protocols.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from conveyor.broker.types import TopicInfo

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker
    from conveyor.broker.shared_groups import SharedGroups

logger = logging.getLogger("conveyor.cluster")

ATTEMPTS: Final = 3


class CatalogApply:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.topics_forgotten = 0  # topics dropped because another node deleted them

    async def reread(self, kinds: frozenset[str]) -> None:
        broker = self.broker
        if kinds & {"topics", "queues"}:
            await self._topics()
        shared = broker.shared_groups
        if "queues" in kinds and shared is not None:
            await self._queues(shared)
        if "exchanges" in kinds:
            await broker.exchanges.reload()

    # --- topics ------------------------------------------------------------------------
    async def _topics(self) -> None:
        broker = self.broker
        topics = broker.topics
        stored_partitions = getattr(broker.log_store, "stored_partitions", None)
        for _ in range(ATTEMPTS):
            mark = topics.changes
            if topics.changing:
                break  # the change in progress notifies; the next re-read applies it
            held = {info.name: info for info in topics.list_topics()}
            rows = await broker.state_store.load_topics()
            ids = None if stored_partitions is None else await stored_partitions()
            if topics.changing or topics.changes != mark:
                continue
            stored = {row.name for row in rows}
            for name, info in held.items():
                if topics.find(name) is info and self._gone(info, name in stored, ids):
                    self.forget_topic(info)
            break
        await topics.load()  # new topics, new incarnations, configs altered elsewhere

    def _gone(self, info: TopicInfo, stored: bool,
              ids: dict[tuple[str, int], int] | None) -> bool:
        """Was the topic deleted elsewhere (no row), or made again (other partition ids)?
        A replaced topic's partitions are forgotten here as they are found."""
        if not stored:
            return True
        forget = getattr(self.broker.log_store, "forget_partition", None)
        if ids is None or forget is None:
            return False
        return any([forget(info.name, partition, ids[(info.name, partition)])
                    for partition in range(info.partitions)
                    if (info.name, partition) in ids])

    def forget_topic(self, info: TopicInfo) -> None:
        """Drop a topic another node deleted from this node's memory (not its stores)."""
        broker = self.broker
        name = info.name
        broker.topics.forget(name)
        forget = getattr(broker.log_store, "forget_partition", None)
        for partition in range(info.partitions):
            if forget is not None:
                forget(name, partition, None)
        broker.producer.forget_topic(name)
        broker.txn_index.forget_topic(name)
        broker.txn_offsets.forget_topic(name)  # the deleting node removed the stored rows
        broker.traffic.forget_topic(name)
        shared = broker.shared_groups
        if shared is not None:
            shared.forget_topic(name)
        for partition in range(info.partitions):  # as after a delete on one node
            if shared is not None:
                shared.notify_appended(name, partition)
            broker.fetcher.wake((name, partition))  # a long poll answers "unknown topic"
        self.topics_forgotten += 1
        logger.info("topic deleted on another node forgotten", extra={"topic": name})

    # --- queues ------------------------------------------------------------------------
    async def _queues(self, shared: SharedGroups) -> None:
        broker = self.broker
        for _ in range(ATTEMPTS):
            mark = shared.config_changes
            if shared.configs_changing:
                return
            rows = await broker.state_store.load_queues()
            if shared.configs_changing or shared.config_changes != mark:
                continue
            for row in rows:
                if not shared.queue_exists(row.name):
                    async with shared.hold_queue(row.name):
                        await shared.load_declared(row.name, row.name)
                else:
                    shared.apply_config(row.name, row.config)
            return
