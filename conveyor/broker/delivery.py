"""Delivery rules of queues: delays, TTL, priorities, FIFO groups, dedup, dead-lettering.

Owns: reading the reserved ``conveyor.*`` headers of a record together with its
QueueConfig into a ``RecordPolicy`` (when it may be delivered, when it expires,
its priority and FIFO group), the dead-letter decision after a lock ends, the
shape of a dead-lettered message, and the dedup window.

Must not know: storage, asyncio, protocols. Every function is pure; time comes
in as ``now_ms`` (wall ms, the same clock as record timestamps and headers), except
``RecordPolicy``, whose times ``record_policy`` shifts onto the monotonic clock.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from typing import Literal

from conveyor.storage.record_batch import Record

from .types import (
    HEADER_DEAD_REASON,
    HEADER_DEATHS,
    HEADER_DEDUP_ID,
    HEADER_DELIVER_AT,
    HEADER_EXCHANGE,
    HEADER_EXPIRATION,
    HEADER_EXPIRES_AT,
    HEADER_GROUP,
    HEADER_PRIORITY,
    HEADER_ROUTING_KEY,
    HEADER_SOURCE,
    Message,
    QueueConfig,
)

DeadReason = Literal["max-deliveries", "rejected", "expired", "maxlen"]
PRIORITY_MAX = 9  # conveyor.priority is one digit, 0..9 (RabbitMQ advises <= 10 levels)
NEVER_MS = 1 << 62  # "no deadline": later than any wall clock
# dedup ids one queue remembers at once (SQS bounds its window by time only, 5 min);
# past it the ids closest to leaving the window go first (~100 bytes each: ~10 MiB)
DEDUP_IDS_MAX = 100_000
# a lazily-cleaned heap is rebuilt once its stale items outnumber the live ones
HEAP_SLACK_ITEMS = 64


@dataclass(frozen=True, slots=True)
class RecordPolicy:
    """What the queue rules say about one record."""

    priority: int  # 0..9, 0 when the queue ignores priorities
    available_at_ms: int  # monotonic ms (see record_policy); not acquirable before
    expires_at_ms: int  # monotonic ms; NEVER_MS when it does not expire
    message_group: str | None  # FIFO group (only meaningful for FIFO queues)


# the policy of a record no queue rule or reserved header touches (shared: frozen)
PLAIN_POLICY = RecordPolicy(0, 0, NEVER_MS, None)
_TIMED_HEADERS = frozenset({HEADER_DELIVER_AT, HEADER_EXPIRES_AT})


def header(record: Record, name: str) -> bytes | None:
    """The last value of header ``name`` (a later header overrides an earlier one)."""
    found: bytes | None = None
    for key, value in record.headers:
        if key == name:
            found = value
    return found


def _int_header(record: Record, name: str) -> int | None:
    value = header(record, name)
    if value is None:
        return None
    try:
        return int(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None  # a malformed reserved header is ignored, not fatal


def record_policy(record: Record, config: QueueConfig, wall_skew_ms: int = 0) -> RecordPolicy:
    """Combine the record's reserved headers with the queue defaults. Times are wall ms
    minus ``wall_skew_ms`` (wall - monotonic now: the window runs on the monotonic clock,
    so a wall-clock step after loading moves no deadline)."""
    if (config.max_priority is None and not config.delay_ms
            and config.message_ttl_ms is None and not config.fifo):
        for name, _ in record.headers:
            if name in _TIMED_HEADERS:
                break
        else:  # the common case (one pass over the headers, no new object)
            return PLAIN_POLICY
    priority = 0
    if config.max_priority is not None:
        requested = _int_header(record, HEADER_PRIORITY) or 0
        priority = max(0, min(requested, config.max_priority, PRIORITY_MAX))
    deliver_at_ms = _int_header(record, HEADER_DELIVER_AT)
    if deliver_at_ms is None:
        deliver_at_ms = record.timestamp_ms + config.delay_ms if config.delay_ms else 0
    expires_at_ms = _int_header(record, HEADER_EXPIRES_AT)
    if config.message_ttl_ms is not None:
        queue_expiry_ms = record.timestamp_ms + config.message_ttl_ms
        expires_at_ms = queue_expiry_ms if expires_at_ms is None else min(
            expires_at_ms, queue_expiry_ms)
    group_bytes = header(record, HEADER_GROUP) if config.fifo else None
    message_group = group_bytes.decode("utf-8", "replace") if group_bytes is not None else None
    return RecordPolicy(
        priority, max(0, deliver_at_ms - wall_skew_ms) if deliver_at_ms else 0,
        NEVER_MS if expires_at_ms is None else expires_at_ms - wall_skew_ms,
        message_group,
    )


def dedup_id_of(record_headers: tuple[tuple[str, bytes | None], ...]) -> str | None:
    for key, value in record_headers:
        if key == HEADER_DEDUP_ID and value is not None:
            return value.decode("utf-8", "replace")
    return None


def exhausted(delivery_count: int, config: QueueConfig) -> bool:
    """True when a record whose lock just ended must be dead-lettered, not redelivered."""
    return config.max_deliveries > 0 and delivery_count >= config.max_deliveries


def dead_letter_topic(queue: str, config: QueueConfig) -> str | None:
    """Where dead records go: the configured topic, "<queue>.dlq" when max_deliveries is
    set, else nowhere (expired or rejected records are then dropped)."""
    if config.dead_letter_topic is not None:
        return config.dead_letter_topic or None
    if config.max_deliveries > 0:
        return f"{queue}.dlq"
    return None


# Reserved headers that would change the dead record's own fate in the DLQ: a DLQ
# record must neither expire again nor wait for the delay it already served.
_DROPPED_ON_DEAD_LETTER = frozenset({
    HEADER_DEAD_REASON, HEADER_SOURCE, HEADER_EXPIRES_AT, HEADER_DELIVER_AT,
})


def dead_letter_message(
    record: Record, topic: str, partition: int, reason: DeadReason
) -> Message:
    """The record as a DLQ message: original key/value/headers + reason + source."""
    kept = [(key, value) for key, value in record.headers
            if key not in _DROPPED_ON_DEAD_LETTER]
    headers = (
        *kept,
        (HEADER_DEAD_REASON, reason.encode()),
        (HEADER_SOURCE, f"{topic}/{partition}/{record.offset}".encode()),
    )
    return Message(record.value, record.key, headers, timestamp_ms=record.timestamp_ms)


def dead_letter_routing_key(record: Record, queue: str, config: QueueConfig) -> str:
    """The configured dead-letter routing key, else the record's own, else the queue."""
    if config.dead_letter_routing_key is not None:
        return config.dead_letter_routing_key
    own = header(record, HEADER_ROUTING_KEY)
    return own.decode("utf-8", "replace") if own is not None else queue


def dead_letter_cycle(message: Message, destination: str) -> bool:
    """RabbitMQ's cycle rule for a dead letter about to reach ``destination``: walk its
    deaths from the most recent; reaching ``destination`` before any client rejection
    means it would loop with nobody deciding, so it is dropped."""
    document = next((value for key, value in message.headers if key == HEADER_DEATHS), None)
    if document is None:
        return False
    try:
        deaths = json.loads(document)["deaths"]
    except (ValueError, KeyError, TypeError):
        return False
    for death in deaths:
        if not isinstance(death, dict):
            continue
        if death.get("reason") == "rejected":
            return False
        if death.get("queue") == destination:
            return True
    return False


def dead_letter_exchange_message(
    record: Record, queue: str, reason: DeadReason, now_ms: int,
    dead_letter_exchange: str, dead_letter_routing_key: str,
) -> Message:
    """The record re-published through a dead-letter exchange: a death entry is added
    to ``conveyor.deaths`` (same queue and reason: its count grows and it moves first),
    the expiry it died of is dropped, the rest is kept."""
    deaths: list[dict[str, object]] = []
    first: dict[str, object] | None = None
    previous = header(record, HEADER_DEATHS)
    if previous is not None:
        try:
            document = json.loads(previous)
            deaths = [death for death in document["deaths"] if isinstance(death, dict)]
            first = document.get("first")
        except (ValueError, KeyError, TypeError):
            deaths, first = [], None
    exchange = header(record, HEADER_EXCHANGE)
    routing_key = header(record, HEADER_ROUTING_KEY)
    expiration = header(record, HEADER_EXPIRATION)
    entry: dict[str, object] = {
        "queue": queue, "reason": reason, "count": 1, "time": now_ms // 1000,
        "exchange": exchange.decode("utf-8", "replace") if exchange is not None else "",
        "routing-keys": [routing_key.decode("utf-8", "replace")] if routing_key else [queue],
    }
    if expiration is not None:
        entry["original-expiration"] = expiration.decode("utf-8", "replace")
    for index, death in enumerate(deaths):
        if death.get("queue") == queue and death.get("reason") == reason:
            entry["count"] = int(str(death.get("count", 0))) + 1
            del deaths[index]
            break
    deaths.insert(0, entry)
    if first is None:
        first = {"queue": queue, "reason": reason, "exchange": entry["exchange"]}
    dropped = _DROPPED_ON_DEAD_LETTER | {HEADER_DEATHS, HEADER_EXPIRATION, HEADER_EXCHANGE,
                                         HEADER_ROUTING_KEY}
    kept = [(key, value) for key, value in record.headers if key not in dropped]
    document_bytes = json.dumps({"deaths": deaths, "first": first},
                                separators=(",", ":")).encode()
    # it is now published to the dead-letter exchange with the dead-letter routing key
    # (what a consumer of the dead letters sees); x-death keeps where it came from
    headers = (*kept, (HEADER_DEATHS, document_bytes), (HEADER_DEAD_REASON, reason.encode()),
               (HEADER_EXCHANGE, dead_letter_exchange.encode()),
               (HEADER_ROUTING_KEY, dead_letter_routing_key.encode()))
    return Message(record.value, record.key, headers, timestamp_ms=now_ms)


def redrive_message(record: Record) -> tuple[str, Message] | None:
    """(source topic, message without the dead-letter headers), None if no source."""
    source = header(record, HEADER_SOURCE)
    if source is None:
        return None
    topic = source.decode("utf-8", "replace").rsplit("/", 2)[0]
    headers = tuple(
        (key, value) for key, value in record.headers
        if key not in (HEADER_DEAD_REASON, HEADER_SOURCE)
    )
    return topic, Message(record.value, record.key, headers, timestamp_ms=record.timestamp_ms)


class DedupWindow:
    """Dedup ids seen by one queue, each remembered until ``expires_ms`` (wall)."""

    def __init__(self, ids_max: int = DEDUP_IDS_MAX) -> None:
        self.ids_max = ids_max
        # dedup id -> wall ms after which a publish with this id is accepted again
        self.expiry_ms_by_id: dict[str, int] = {}
        # (expires_ms, dedup id): the same ids by expiry; stale items skipped lazily
        self._by_expiry: list[tuple[int, str]] = []

    def seen(self, dedup_id: str, now_ms: int) -> bool:
        expires_ms = self.expiry_ms_by_id.get(dedup_id)
        return expires_ms is not None and expires_ms > now_ms

    def remember(self, dedup_id: str, expires_ms: int) -> None:
        self.expiry_ms_by_id[dedup_id] = expires_ms
        heapq.heappush(self._by_expiry, (expires_ms, dedup_id))
        while len(self.expiry_ms_by_id) > self.ids_max:  # bounded: the soonest to go, first
            oldest_ms, oldest = heapq.heappop(self._by_expiry)
            if self.expiry_ms_by_id.get(oldest) == oldest_ms:
                del self.expiry_ms_by_id[oldest]
        if len(self._by_expiry) > 2 * len(self.expiry_ms_by_id) + HEAP_SLACK_ITEMS:
            self._by_expiry = [(ms, key) for key, ms in self.expiry_ms_by_id.items()]
            heapq.heapify(self._by_expiry)

    def forget_expired(self, now_ms: int) -> int:
        """Drop ids whose window has passed; returns how many went."""
        forgotten = 0
        while self._by_expiry and self._by_expiry[0][0] <= now_ms:
            expires_ms, dedup_id = heapq.heappop(self._by_expiry)
            if self.expiry_ms_by_id.get(dedup_id) == expires_ms:
                del self.expiry_ms_by_id[dedup_id]
                forgotten += 1
        return forgotten
