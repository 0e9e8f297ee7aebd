"""Handlers for the data path: Produce, Fetch, ListOffsets.

Owns: turning these typed requests into broker calls and writing the answers
with the hand-written encoders (Produce, Fetch) or kio (ListOffsets).

Rules:
- Record batches stay opaque: ``Broker.append_batch`` validates CRC32C and
  lengths, checks idempotence and assigns the base offset; nothing is appended
  from a batch that fails, and the partition answers CORRUPT_MESSAGE,
  MESSAGE_TOO_LARGE, OUT_OF_ORDER_SEQUENCE_NUMBER... A duplicate idempotent
  retry answers the original base offset with no error.
- acks=0: append, answer nothing (the client expects no response).
- Fetch: every partition is read at once; when fewer than min_bytes arrived
  and max_wait allows, wait for an append to any of them (no polling), then
  read again. Record bytes come back as file ranges for ``os.sendfile``;
  max_bytes caps the response but the first batch is always whole (KIP-74).
Must not know: sockets, files (a file range is three ints passed through).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from conveyor.broker.txn_index import batches_below
from conveyor.errors import OperatingError
from conveyor.protocols.kafka import error_codes
from conveyor.protocols.kafka.codec import Request
from conveyor.protocols.kafka.encoders import (
    FetchPartitionResult,
    ProducePartitionResult,
    RecordPiece,
    encode_fetch_response,
    encode_produce_response,
)
from conveyor.protocols.kafka.messages import response_class
from conveyor.protocols.kafka.responses import build, millis, nested
from conveyor.protocols.kafka.settings import KafkaSettings

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker
    from conveyor.protocols.kafka.authorization import Access

DENIED_TOPIC = "Not authorized to access topics: [Topic authorization failed.]"

# Produce v12+ is sent by transaction.version 2 clients only: a transactional batch adds
# its partition to the transaction (KIP-890 part 2; no AddPartitionsToTxn before it)
IMPLICIT_ADD_VERSION = 12

# Several nodes (cluster_routing.py): may this node serve the partition? None: a single node.
PartitionGate = Callable[[str, int], Awaitable[bool]] | None


async def handle_produce(broker: Broker, request: Request,
                         on_error: Callable[[int], None] | None = None,
                         access: Access | None = None,
                         gate: PartitionGate = None) -> bytes | None:
    body = request.body
    header = request.header
    refusal = _refusal(body)
    denied = _denied(body.topic_data, access, "write", "name")
    if refusal is not None:
        outcomes = [
            (topic.name, ProducePartitionResult(partition.index, refusal[0],
                                                error_message=refusal[1]))
            for topic in body.topic_data for partition in topic.partition_data
        ]
    else:  # as Kafka: partitions of topics the principal may not write are refused alone
        appends = [
            _append(broker, topic.name, partition.index, partition.records, gate,
                    header.api_version >= IMPLICIT_ADD_VERSION)
            if topic.name not in denied else _refused(topic.name, partition.index)
            for topic in body.topic_data for partition in topic.partition_data
        ]
        if len(appends) == 1:  # the common case: no task per partition
            outcomes = [await appends[0]]
        else:
            # gather starts the appends in request order; each appends before it suspends.
            outcomes = list(await asyncio.gather(*appends))
    if on_error is not None:
        for _, result in outcomes:
            if result.error_code:
                on_error(result.error_code)
    if body.acks == 0:
        return None
    topics: dict[str, list[ProducePartitionResult]] = {}
    for (name, result) in outcomes:
        topics.setdefault(name, []).append(result)
    return encode_produce_response(header.correlation_id, header.api_version, list(topics.items()))


def _denied(topics: Any, access: Access | None, action: Any, field: str) -> frozenset[str]:
    """The topics of a request the principal may not ``action``."""
    if access is None:
        return frozenset()
    names = {getattr(topic, field) for topic in topics}
    return frozenset(name for name in names if not access.topic(action, name))


def _refusal(body: Any) -> tuple[int, str] | None:
    """A reason to refuse the whole request, answered per partition."""
    if body.acks not in (0, 1, -1):
        return error_codes.INVALID_REQUIRED_ACKS, "acks must be 0, 1 or -1"
    return None


async def _refused(topic: str, partition: int) -> tuple[str, ProducePartitionResult]:
    return topic, ProducePartitionResult(partition, error_codes.TOPIC_AUTHORIZATION_FAILED,
                                         error_message=DENIED_TOPIC)


async def _append(
    broker: Broker, topic: str, partition: int, records: bytes | None,
    gate: PartitionGate = None, implicit_transaction: bool = False,
) -> tuple[str, ProducePartitionResult]:
    if gate is not None and not await gate(topic, partition):
        return topic, ProducePartitionResult(
            partition, error_codes.NOT_LEADER_OR_FOLLOWER,
            error_message="this node does not lead the partition")
    if not records:
        return topic, ProducePartitionResult(
            partition, error_codes.CORRUPT_MESSAGE, error_message="empty records"
        )
    try:
        result = await broker.append_batch(topic, partition, records, implicit_transaction)
    except OperatingError as error:
        return topic, ProducePartitionResult(
            partition, error_codes.error_code_for(error), error_message=error.message
        )
    return topic, ProducePartitionResult(
        partition, error_codes.NONE, result.base_offset, -1, result.log_start_offset
    )


def _record_pieces(data: Any) -> list[RecordPiece]:
    """File ranges for sendfile when every part has an OS descriptor, else the bytes
    (a store that keeps batches elsewhere, PostgreSQL, returns them in memory)."""
    parts: Sequence[tuple[int, int, int]] = data.parts
    if not parts:
        return [data.read_bytes()] if data.size_bytes else []
    if all(fileno >= 0 for fileno, _, _ in parts):
        return list(parts)
    return [data.read_bytes()]


READ_COMMITTED = 1  # Fetch / ListOffsets isolation_level


class _FetchPlan:
    """One fetch request's partitions, in request order."""

    def __init__(self, body: Any) -> None:
        self.committed = body.isolation_level == READ_COMMITTED
        self.refused: set[tuple[str, int]] = set()  # led by another node
        self.entries: list[tuple[str, int, int, int]] = [
            (topic.topic, partition.partition, partition.fetch_offset,
             partition.partition_max_bytes)
            for topic in body.topics
            for partition in topic.partitions
        ]


async def _read_all(
    broker: Broker, plan: _FetchPlan, max_bytes: int
) -> tuple[list[tuple[str, FetchPartitionResult]], int]:
    """Read every partition now. ``Broker.fetch`` with wait_ms=0 never suspends, so no
    other task runs between the reads and the send: file ranges stay valid."""
    results: list[tuple[str, FetchPartitionResult]] = []
    total = 0
    for topic, partition, offset, partition_max_bytes in plan.entries:
        budget = min(partition_max_bytes, max(max_bytes - total, 0))
        if (topic, partition) in plan.refused:
            results.append((topic, FetchPartitionResult(
                partition, error_codes.NOT_LEADER_OR_FOLLOWER)))
            continue
        try:
            if budget <= 0 and total > 0:
                offsets = broker.offsets(topic, partition)
                pieces: list[RecordPiece] = []
                data = None
            else:
                data, offsets = await broker.fetch(
                    topic, partition, offset, max(budget, 1), wait_ms=0, bytes_min=0
                )
                pieces = _record_pieces(data)
            stable = broker.last_stable_offset(topic, partition)
            aborted: list[tuple[int, int]] = []
            if plan.committed:
                pieces, aborted = _committed(broker, topic, partition, offset, stable,
                                             data, pieces, offsets.high_watermark)
        except OperatingError as error:
            results.append((topic, FetchPartitionResult(
                partition, error_codes.error_code_for(error)
            )))
            continue
        total += sum(piece[2] if isinstance(piece, tuple) else len(piece) for piece in pieces)
        results.append((topic, FetchPartitionResult(
            partition, error_codes.NONE, offsets.high_watermark, stable,
            offsets.log_start_offset, pieces, aborted,
        )))
    return results, total


def _committed(broker: Broker, topic: str, partition: int, offset: int, stable: int,
               data: Any, pieces: list[RecordPiece], high_watermark: int,
               ) -> tuple[list[RecordPiece], list[tuple[int, int]]]:
    """read_committed: nothing at or past the last stable offset (whole batches below it;
    read and cut only while a transaction is open), and the aborted transactions the
    client must drop from what it gets."""
    if not pieces:
        return [], []
    if stable < high_watermark:
        kept = batches_below(data.read_bytes(), stable)
        pieces = [kept] if kept else []
    if not pieces:
        return [], []
    return pieces, broker.aborted_transactions(topic, partition, offset, stable)


async def handle_fetch(broker: Broker, settings: KafkaSettings, request: Request,
                       on_error: Callable[[int], None] | None = None,
                       access: Access | None = None,
                       gate: PartitionGate = None) -> list[Any]:
    body = request.body
    header = request.header
    plan = _FetchPlan(body)
    if gate is not None:
        plan.refused = {(topic, partition) for topic, partition, _, _ in plan.entries
                        if not await gate(topic, partition)}
    denied = _denied(body.topics, access, "read", "topic")
    if denied:  # answered at once, each partition with the error
        results = [(topic, FetchPartitionResult(partition, error_codes.TOPIC_AUTHORIZATION_FAILED))
                   for topic, partition, _, _ in plan.entries if topic in denied]
        plan.entries = [entry for entry in plan.entries if entry[0] not in denied]
        if plan.entries:
            allowed, _ = await _read_all(broker, plan, min(body.max_bytes,
                                                           settings.fetch_bytes_max))
            results = allowed + results
        return _fetch_pieces(header, results, on_error)
    max_bytes = min(body.max_bytes, settings.fetch_bytes_max)
    wait_ms = min(millis(body.max_wait), settings.fetch_wait_ms_max)
    deadline_ms = broker.clock.monotonic_ms() + wait_ms
    while True:
        results, total = await _read_all(broker, plan, max_bytes)
        remaining_ms = deadline_ms - broker.clock.monotonic_ms()
        errors = any(result.error_code for _, result in results)
        if total >= body.min_bytes or remaining_ms <= 0 or errors or not plan.entries:
            break
        keys = [(topic, partition) for topic, partition, _, _ in plan.entries]
        await broker.wait_for_append(keys, remaining_ms)
    return _fetch_pieces(header, results, on_error)


def _fetch_pieces(header: Any, results: list[tuple[str, FetchPartitionResult]],
                  on_error: Callable[[int], None] | None) -> list[Any]:
    grouped: dict[str, list[FetchPartitionResult]] = {}
    for topic, result in results:
        grouped.setdefault(topic, []).append(result)
        if result.error_code and on_error is not None:
            on_error(result.error_code)
    pieces: list[Any] = encode_fetch_response(
        header.correlation_id, header.api_version, list(grouped.items())
    )
    return pieces


async def handle_list_offsets(broker: Broker, request: Request) -> Any:
    version = request.header.api_version
    response_type = response_class(2, version)
    topic_type = nested(response_type, "ListOffsetsTopicResponse")
    partition_type = nested(response_type, "ListOffsetsPartitionResponse")
    topics = []
    isolation_level = getattr(request.body, "isolation_level", 0)
    for topic in request.body.topics:
        partitions = [await _list_offset(broker, partition_type, topic.name, partition,
                                         isolation_level)
                      for partition in topic.partitions]
        topics.append(topic_type(name=topic.name, partitions=tuple(partitions)))
    return build(response_type, topics=tuple(topics))


MAX_TIMESTAMP = -3  # ListOffsets v7+: the record with the largest timestamp
EARLIEST_LOCAL = -4  # v8+: everything is local in Conveyor, so the log start
LATEST_TIERED = -5  # v9+: nothing is tiered: no offset
EARLIEST_PENDING_UPLOAD = -6  # v11+: nothing is uploaded: no offset


async def _list_offset(broker: Broker, partition_type: type[Any], topic: str,
                       partition: Any, isolation_level: int) -> Any:
    index = partition.partition_index
    wanted = partition.timestamp
    timestamp = -1  # the found record's own timestamp (-1 for latest/earliest/none)
    try:
        if wanted == MAX_TIMESTAMP:
            wanted = broker.max_timestamp(topic, index)
            wanted = wanted if wanted >= 0 else LATEST_TIERED  # empty: no offset
        if wanted in (LATEST_TIERED, EARLIEST_PENDING_UPLOAD):
            broker.offsets(topic, index)  # unknown partitions answer their error
            found = None
        elif wanted >= 0:
            record = await broker.record_for_timestamp(topic, index, wanted)
            found, timestamp = record if record is not None else (None, -1)
        elif wanted == -1 and isolation_level == READ_COMMITTED:
            found = broker.last_stable_offset(topic, index)  # latest committed: the LSO
        else:
            wanted = -2 if wanted == EARLIEST_LOCAL else wanted
            found = await broker.offset_for_timestamp(topic, index, wanted)
    except OperatingError as error:
        return build(partition_type, partition_index=index,
                     error_code=error_codes.error_code_for(error), timestamp=-1, offset=-1)
    offset = -1 if found is None else found
    return build(partition_type, partition_index=index, error_code=error_codes.NONE,
                 timestamp=timestamp, offset=offset, leader_epoch=0)
