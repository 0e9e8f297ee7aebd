"""Value types that cross the broker API (ARCHITECTURE §1).

Every protocol adapter speaks to the broker only in these types. They are plain
frozen dataclasses: no I/O, no protocol knowledge.

Reserved record headers (prefix ``conveyor.``) carry the queue features that a
Kafka RecordBatch has no field for; they are written by ``Broker.publish`` and
read by shared groups, so a record keeps its meaning whichever protocol reads it:

    conveyor.priority      b"0".."9"          higher is served first
    conveyor.deliver-at    wall ms, decimal    not acquirable before this time
    conveyor.expires-at    wall ms, decimal    dropped (or dead-lettered) after
    conveyor.dedup-id      utf-8               duplicate ids inside the window dropped
    conveyor.group         utf-8               FIFO message group
    conveyor.dead-reason   utf-8               set on records appended to a DLQ
    conveyor.source        "topic/partition/offset" of a dead-lettered record
    conveyor.deaths        JSON {"deaths": [...], "first": {...}} on a record dead-lettered
                           through an exchange (RabbitMQ's x-death, protocol-neutral)
    conveyor.exchange      the exchange a record was published to (AMQP)
    conveyor.routing-key   its routing key (AMQP; the dead-letter routing key default)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from conveyor.storage.log_config import CleanupPolicy as CleanupPolicy
from conveyor.storage.log_config import FsyncPolicy as FsyncPolicy

Headers = tuple[tuple[str, bytes | None], ...]

HEADER_PRIORITY = "conveyor.priority"
HEADER_DELIVER_AT = "conveyor.deliver-at"
HEADER_EXPIRES_AT = "conveyor.expires-at"
HEADER_DEDUP_ID = "conveyor.dedup-id"
HEADER_GROUP = "conveyor.group"
HEADER_DEAD_REASON = "conveyor.dead-reason"
HEADER_SOURCE = "conveyor.source"
HEADER_DELIVERY_COUNT = "conveyor.delivery-count"
HEADER_DEATHS = "conveyor.deaths"
HEADER_EXCHANGE = "conveyor.exchange"
HEADER_ROUTING_KEY = "conveyor.routing-key"
HEADER_EXPIRATION = "conveyor.expiration"

ExchangeType = Literal["direct", "topic", "fanout", "headers"]
DestinationKind = Literal["queue", "exchange", "topic"]


@dataclass(frozen=True, slots=True)
class Message:
    """What a producer hands to ``Broker.publish``."""

    value: bytes | None
    key: bytes | None = None
    headers: Headers = ()
    timestamp_ms: int | None = None  # None: the broker's wall clock
    priority: int | None = None  # 0..9
    deliver_at_ms: int | None = None  # wall ms
    expires_at_ms: int | None = None  # wall ms
    dedup_id: str | None = None
    message_group: str | None = None  # FIFO group


@dataclass(frozen=True, slots=True)
class PublishResult:
    topic: str
    partition: int
    offset: int  # -1 when dropped as a duplicate (dedup id) or by an overflow policy
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class AppendResult:
    base_offset: int
    last_offset: int
    log_append_time_ms: int
    log_start_offset: int
    duplicate: bool = False  # idempotent producer retry: nothing appended


@dataclass(frozen=True, slots=True)
class TopicConfig:
    """Per-topic settings; names in ``to_mapping`` follow Kafka's where one exists."""

    retention_ms: int = 7 * 24 * 3600 * 1000  # Kafka's default retention.ms
    retention_bytes: int = -1
    segment_bytes: int = 1 << 30  # Kafka's default segment.bytes
    segment_ms: int = 7 * 24 * 3600 * 1000
    cleanup_policy: CleanupPolicy = "delete"
    fsync: FsyncPolicy = "always"
    fsync_interval_ms: int = 1000
    max_message_bytes: int = 1 << 20  # 1 MiB, as the issue asks
    min_compaction_lag_ms: int = 0
    delete_retention_ms: int = 24 * 3600 * 1000  # tombstones kept this long


@dataclass(frozen=True, slots=True)
class TopicInfo:
    name: str
    partitions: int
    config: TopicConfig
    kind: Literal["topic", "queue"] = "topic"
    created_ms: int = 0


@dataclass(frozen=True, slots=True)
class PartitionOffsets:
    log_start_offset: int
    high_watermark: int


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """A queue = a topic with retention ``work-queue`` plus a shared group of its name."""

    visibility_timeout_ms: int = 30_000  # SQS default
    max_deliveries: int = 0  # 0: unlimited; else dead-letter after this many
    dead_letter_topic: str | None = None  # default "<queue>.dlq" when max_deliveries > 0;
    # "" = no dead-letter topic (dead records are dropped)
    dead_letter_exchange: str | None = None  # route dead records through this exchange
    dead_letter_routing_key: str | None = None  # None: the record's own routing key
    message_ttl_ms: int | None = None
    delay_ms: int = 0  # default delivery delay
    max_length: int | None = None
    overflow: Literal["drop-head", "reject-publish"] = "drop-head"
    max_priority: int | None = None  # None: priorities ignored
    fifo: bool = False
    dedup_window_ms: int = 5 * 60 * 1000  # SQS's 5-minute deduplication interval
    durable: bool = True
    partitions: int = 1
    fsync: FsyncPolicy = "always"


@dataclass(frozen=True, slots=True)
class QueueInfo:
    name: str
    config: QueueConfig
    ready: int
    in_flight: int
    delayed: int


@dataclass(slots=True)
class Delivery:
    """One record handed to a shared-group consumer, locked until ``lock_deadline_ms``.

    Read-only by convention, not ``frozen``: one is built per delivered record, and a
    frozen dataclass's ``__init__`` (an ``object.__setattr__`` call per field) cost 4 %
    of the broker's CPU on AMQP consume, ~5 times this one's (bench/README.md, issue 17)."""

    receipt: str  # opaque handle for ack / release / extend
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    delivery_count: int  # 1 on the first delivery
    lock_deadline_ms: int  # wall ms


@dataclass(frozen=True, slots=True)
class ExchangeInfo:
    name: str
    type: ExchangeType
    durable: bool = True
    auto_delete: bool = False
    internal: bool = False
    alternate_exchange: str | None = None
    arguments: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Binding:
    source: str  # exchange name
    destination_kind: DestinationKind
    destination: str
    routing_key: str = ""
    arguments: tuple[tuple[str, str], ...] = ()  # headers exchange: x-match + values


@dataclass(frozen=True, slots=True)
class RouteResult:
    routed: bool  # False: no destination (after the alternate exchange); mandatory -> return
    results: Sequence[PublishResult] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class PartitionLag:
    topic: str
    partition: int
    committed_offset: int  # -1: nothing committed
    high_watermark: int
    lag: int  # high_watermark - committed (or - log_start_offset when nothing committed)
