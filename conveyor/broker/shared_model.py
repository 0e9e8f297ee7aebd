"""The shared groups' data: what the share coordinator's modules pass each other.

``SharedGroupsHost`` (the peers the coordinator may call), ``SharedGroupWindows`` (one
shared group on one topic: its per-partition windows and cursors), the receipt format
and a queue config's JSON. Must not know: protocols, files, sockets.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from conveyor.clock import Clock
from conveyor.errors import UnknownDeliveryError
from conveyor.storage.record_batch import Record
from conveyor.storage.state_store import StateStore

from .routing import Destination
from .shared_group import SharedPartition
from .stats import SharedGroupCounters
from .topics import TopicRegistry
from .types import Headers, PublishResult, QueueConfig, TopicInfo


@dataclass(frozen=True, slots=True)
class SharedGroupsHost:
    """What the share coordinator may call: the peers below it, never the facade."""

    state_store: StateStore
    clock: Clock
    rng: random.Random
    topics: TopicRegistry
    # the fetcher's decoded reads
    read_records: Callable[..., Awaitable[list[Record]]]
    # the producer's raw append path, and its topic auto-creation
    publish_records: Callable[..., Awaitable[list[PublishResult]]]
    ensure_topic: Callable[[str], Awaitable[TopicInfo]]
    # the exchanges' routing (dead-lettering through an exchange)
    route: Callable[[str, str, Headers], list[Destination]]
    # the fetcher's committed reads: (records, offset to read on from), skipping control
    # records and aborted transactions, never past the last stable offset (transactions)
    read_visible: Callable[..., Awaitable[tuple[list[Record], int]]] | None = None
    # (topic, partition) -> the last stable offset (the high watermark without transactions)
    stable_offset: Callable[[str, int], int] | None = None


@dataclass
class SharedGroupWindows:
    """One shared group on one topic: its per-partition in-flight windows and cursors.

    (Not to be confused with ``ordered_group.GroupState``, the lifecycle enum of an
    ordered group.)
    """

    group: str
    topic: str
    config: QueueConfig
    is_queue: bool
    # partition -> its window
    partitions: dict[int, SharedPartition] = field(default_factory=dict)
    # partition -> start offset last written to the state store
    saved_start: dict[int, int] = field(default_factory=dict)
    next_partition: int = 0  # round-robin cursor of acquire
    counters: SharedGroupCounters = field(default_factory=SharedGroupCounters)


# per receipt: None (settled) or its error, for callers that answer each receipt
Outcomes = list[Exception | None] | None


def config_to_json(config: QueueConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_mapping(values: Mapping[str, Any]) -> QueueConfig:
    known = {item.name for item in dataclasses.fields(QueueConfig)}
    return QueueConfig(**{key: value for key, value in values.items() if key in known})


def make_receipt(group: str, topic: str, partition: int, offset: int, token: int) -> str:
    return f"{topic}:{partition}:{offset}:{token}:{group}"


def parse_receipt(receipt: str) -> tuple[str, str, int, int, int]:
    """(group, topic, partition, offset, token) or UnknownDeliveryError."""
    parts = receipt.split(":", 4)
    try:
        topic, partition, offset, token, group = parts
        return group, topic, int(partition), int(offset), int(token)
    except ValueError:
        raise UnknownDeliveryError("malformed receipt", receipt=receipt[:80]) from None

