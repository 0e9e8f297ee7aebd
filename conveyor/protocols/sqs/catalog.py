"""The SQS metadata the broker's QueueConfig has no field for, kept durable in a topic.

Owns: per-queue SQS attributes as the client set them (strings), tags, permissions,
created/modified times, persisted as JSON records keyed by queue name in the
compacted topic ``__sqs.queues`` (a tombstone when the queue goes) and read back in
full when the listener starts. Only the broker facade is used (publish, read_records),
so a queue's SQS view survives restarts like every other record does.
Must not know: wire protocols, sockets.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from conveyor.broker.types import Message
from conveyor.errors import TopicExistsError

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker

CATALOG_TOPIC: Final = "__sqs.queues"
READ_RECORDS_MAX: Final = 1000  # one read_records call; the loop reads until the end


@dataclass(slots=True)
class QueueMeta:
    attributes: dict[str, str] = field(default_factory=dict)  # settable ones, as set
    tags: dict[str, str] = field(default_factory=dict)
    permissions: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # label ->
    created_s: int = 0
    modified_s: int = 0


class QueueCatalog:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.queues: dict[str, QueueMeta] = {}

    async def open(self) -> None:
        try:
            await self.broker.create_topic(CATALOG_TOPIC, 1, {"cleanup.policy": "compact"})
        except TopicExistsError:
            pass
        offsets = self.broker.offsets(CATALOG_TOPIC, 0)
        offset = offsets.log_start_offset
        while offset < offsets.high_watermark:
            records = await self.broker.read_records(CATALOG_TOPIC, 0, offset, READ_RECORDS_MAX)
            if not records:
                break
            for record in records:
                self._apply(record.key, record.value)
            offset = records[-1].offset + 1

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        name = key.decode("utf-8", "replace")
        if value is None:
            self.queues.pop(name, None)
            return
        try:
            document: dict[str, Any] = json.loads(value)
            self.queues[name] = QueueMeta(**document)
        except (ValueError, TypeError):
            return  # a record this version cannot read: the queue keeps its broker config

    def get(self, name: str) -> QueueMeta | None:
        return self.queues.get(name)

    async def save(self, name: str, meta: QueueMeta) -> None:
        self.queues[name] = meta
        value = json.dumps(dataclasses.asdict(meta), sort_keys=True).encode()
        await self.broker.publish(CATALOG_TOPIC, [Message(value, key=name.encode())],
                                  partition=0)

    async def remove(self, name: str) -> None:
        if self.queues.pop(name, None) is not None:
            await self.broker.publish(CATALOG_TOPIC, [Message(None, key=name.encode())],
                                      partition=0)
