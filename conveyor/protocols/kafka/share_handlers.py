"""Handlers for Kafka share groups (KIP-932): ShareGroupHeartbeat (76),
ShareGroupDescribe (77), ShareFetch (78), ShareAcknowledge (79) and the share-group
offset admin APIs (90, 91, 92).

Owns: typed request -> ``ShareCoordinator`` call -> kio response, topic ids to
names and back, and the mapping of the coordinator's errors to Kafka's codes.
Membership, sessions and record states live in conveyor/broker/share_coordinator.py
and the shared groups under it.

Rules:
- Errors about the member or the session (UNKNOWN_MEMBER_ID, FENCED_MEMBER_EPOCH,
  SHARE_SESSION_NOT_FOUND, INVALID_SHARE_SESSION_EPOCH, INVALID_REQUEST) are
  top-level; acknowledgement errors (INVALID_RECORD_STATE, INVALID_REQUEST for
  batches that overlap or run backwards) belong to their partition. The
  connection stays open either way.
- ShareFetch applies piggy-backed acknowledgements before it acquires, so a
  released record can come straight back in the same response.
- Epoch 0 carries no acknowledgements (nothing can be held in a new session);
  epoch -1 closes the session after its acknowledgements and fetches nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from conveyor.broker.share_coordinator import ShareCoordinator
from conveyor.broker.share_state import Acknowledgement, ShareSession
from conveyor.broker.types import Delivery
from conveyor.errors import (
    InvalidRequestError,
    InvalidShareSessionEpochError,
    OperatingError,
    UnknownGroupError,
)
from conveyor.protocols.kafka import error_codes
from conveyor.protocols.kafka.adapter import ConnectionState
from conveyor.protocols.kafka.admin_handlers import Node, topic_id
from conveyor.protocols.kafka.codec import Request
from conveyor.protocols.kafka.messages import response_class
from conveyor.protocols.kafka.responses import build, millis, nested
from conveyor.protocols.kafka.settings import KafkaSettings
from conveyor.protocols.kafka.share_records import acquired_ranges, encode_batch

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker

AUTHORIZED_OPERATIONS_OMITTED: Final = -(2**31)
# several nodes: does this node lead (topic, partition)? (cluster_routing.KafkaCluster)
Lead = Callable[[str, int], Awaitable[bool]]
# ShareFetch max_records above this is capped (the shared group hands out at most 1000).
RECORDS_PER_FETCH_MAX: Final = 1_000


def _code(error: OperatingError) -> int:
    return error_codes.error_code_for(error)


def topic_names(broker: Broker) -> dict[uuid.UUID, str]:
    return {topic_id(info.name): info.name for info in broker.list_topics()}


# --- ShareGroupHeartbeat --------------------------------------------------------------
async def handle_heartbeat(coordinator: ShareCoordinator, request: Request,
                           state: ConnectionState) -> Any:
    body = request.body
    response_type = response_class(76, request.header.api_version)
    try:
        result = await coordinator.heartbeat(
            body.group_id, body.member_id, body.member_epoch, body.subscribed_topic_names,
            request.header.client_id or "", state.peer_host, body.rack_id)
    except OperatingError as error:
        return build(response_type, error_code=_code(error), error_message=error.message,
                     member_id=body.member_id or None, member_epoch=-1,
                     heartbeat_interval=0, assignment=None)
    assignment = None
    if result.assignment is not None:
        assignment_type = nested(response_type, "Assignment")
        partitions_type = nested(response_type, "TopicPartitions")
        assignment = build(assignment_type, topic_partitions=tuple(
            build(partitions_type, topic_id=topic_id(name), partitions=partitions)
            for name, partitions in sorted(result.assignment.items())))
    return build(response_type, error_code=error_codes.NONE, error_message=None,
                 member_id=body.member_id, member_epoch=result.member_epoch,
                 heartbeat_interval=result.heartbeat_interval_ms, assignment=assignment)


# --- ShareGroupDescribe ---------------------------------------------------------------
def handle_describe(coordinator: ShareCoordinator, request: Request) -> Any:
    response_type = response_class(77, request.header.api_version)
    group_type = nested(response_type, "DescribedGroup")
    member_type = nested(response_type, "Member")
    assignment_type = nested(response_type, "Assignment")
    partitions_type = nested(response_type, "TopicPartitions")
    groups = []
    for group_id in request.body.group_ids:
        try:
            group = coordinator.describe(group_id)
        except OperatingError as error:
            groups.append(build(group_type, error_code=_code(error),
                                error_message=error.message, group_id=group_id,
                                group_state="Dead", group_epoch=-1, assignment_epoch=-1,
                                assignor_name="", members=(),
                                authorized_operations=AUTHORIZED_OPERATIONS_OMITTED))
            continue
        members = tuple(
            build(member_type, member_id=member.member_id, rack_id=member.rack,
                  member_epoch=member.epoch, client_id=member.client_id,
                  client_host=member.client_host, subscribed_topic_names=member.topics,
                  assignment=build(assignment_type, topic_partitions=tuple(
                      build(partitions_type, topic_id=topic_id(name), topic_name=name,
                            partitions=partitions)
                      for name, partitions in sorted(member.assignment.items()))))
            for member in group.members.values()
        )
        groups.append(build(group_type, error_code=error_codes.NONE, error_message=None,
                            group_id=group_id,
                            group_state="Stable" if members else "Empty",
                            group_epoch=group.epoch, assignment_epoch=group.epoch,
                            assignor_name="simple", members=members,
                            authorized_operations=AUTHORIZED_OPERATIONS_OMITTED))
    return build(response_type, groups=tuple(groups))


# --- acknowledgements shared by ShareFetch and ShareAcknowledge -----------------------
def _acknowledgements(topics: Any, names: dict[uuid.UUID, str],
                      ) -> tuple[list[Acknowledgement], dict[tuple[uuid.UUID, int], int]]:
    """The request's acknowledgement batches, and UNKNOWN_TOPIC_ID for unknown topic ids."""
    batches: list[Acknowledgement] = []
    unknown: dict[tuple[uuid.UUID, int], int] = {}
    for topic in topics:
        name = names.get(topic.topic_id) if topic.topic_id is not None else None
        for partition in topic.partitions:
            if name is None:
                unknown[(topic.topic_id or uuid.UUID(int=0), partition.partition_index)] = (
                    error_codes.UNKNOWN_TOPIC_ID)
                continue
            batches.extend(
                Acknowledgement(name, partition.partition_index, batch.first_offset,
                                batch.last_offset, tuple(batch.acknowledge_types))
                for batch in partition.acknowledgement_batches)
    return batches, unknown


def _top_level(response_type: type[Any], error: OperatingError, lock_ms: int = 0) -> Any:
    return build(response_type, error_code=_code(error), error_message=error.message,
                 acquisition_lock_timeout=lock_ms, responses=(), node_endpoints=())


# --- ShareFetch -----------------------------------------------------------------------
def _end_with_connection(coordinator: ShareCoordinator, state: ConnectionState,
                         group_id: str, member_id: str, session: ShareSession) -> None:
    """KIP-932: a share session ends with the connection it was opened on."""
    def lost() -> None:
        state.tasks.start(coordinator.session_lost(group_id, member_id, session),
                          name="kafka-share-session-lost")

    state.on_close.append(lost)


async def handle_fetch(coordinator: ShareCoordinator, broker: Broker, settings: KafkaSettings,
                       node: Node, request: Request, state: ConnectionState,
                       leads: Lead | None = None) -> Any:
    """``leads``: several nodes, does this node lead the partition (records are acquired
    only from the session's partitions it leads); None: one node, it leads them all."""
    body = request.body
    version = request.header.api_version
    response_type = response_class(78, version)
    names = topic_names(broker)
    requested = [(names.get(topic.topic_id), topic.topic_id, partition.partition_index)
                 for topic in body.topics for partition in topic.partitions]
    forgotten = [(names[topic.topic_id], index) for topic in body.forgotten_topics_data
                 if topic.topic_id in names for index in topic.partitions]
    batches, ack_errors = _acknowledgements(body.topics, names)
    group_id, member_id = body.group_id or "", body.member_id or ""
    epoch = body.share_session_epoch
    try:
        if epoch == 0 and batches:
            raise InvalidRequestError("acknowledgements in a request that opens a session")
        session, closing = await coordinator.open_session(
            group_id, member_id, epoch,
            [(name, index) for name, _, index in requested if name is not None], forgotten)
        if epoch == 0 and session is not None:
            _end_with_connection(coordinator, state, group_id, member_id, session)
        outcome = await coordinator.acknowledge(group_id, member_id, batches,
                                                getattr(body, "is_renew_ack", False))
        deliveries: list[Delivery] = []
        lock_ms = coordinator.config(group_id)["share.record.lock.duration.ms"]
        if closing:
            await coordinator.close_session(group_id, member_id)
        elif session is not None and session.partitions:
            partitions = await _led(session.partitions, leads)
            records_max = max(1, min(body.max_records, RECORDS_PER_FETCH_MAX))
            wait_ms = min(millis(body.max_wait), settings.fetch_wait_ms_max)
            bytes_max = max(1, min(body.max_bytes, settings.fetch_bytes_max))
            deliveries, _ = await coordinator.acquire(group_id, member_id, sorted(partitions),
                                                      records_max, wait_ms, bytes_max,
                                                      partitions)
    except OperatingError as error:
        return _top_level(response_type, error)
    return _fetch_response(response_type, node, names, requested, outcome, ack_errors,
                           deliveries, int(lock_ms))


async def _led(session: set[tuple[str, int]], leads: Lead | None) -> dict[str, list[int]]:
    """Per topic, the session's partitions this node leads (a partition that moved to
    another node since the session named it is fetched there)."""
    partitions: dict[str, list[int]] = {}
    for name, index in sorted(session):
        if leads is None or await leads(name, index):
            partitions.setdefault(name, []).append(index)
    return partitions


def _fetch_response(response_type: type[Any], node: Node, names: dict[uuid.UUID, str],
                    requested: list[tuple[str | None, uuid.UUID | None, int]],
                    outcome: dict[tuple[str, int], OperatingError | None],
                    ack_errors: dict[tuple[uuid.UUID, int], int],
                    deliveries: list[Delivery], lock_ms: int) -> Any:
    topic_type = nested(response_type, "ShareFetchableTopicResponse")
    partition_type = nested(response_type, "PartitionData")
    leader_type = nested(response_type, "LeaderIdAndEpoch")
    acquired_type = nested(response_type, "AcquiredRecords")
    by_partition: dict[tuple[str, int], list[Delivery]] = {}
    for delivery in deliveries:
        by_partition.setdefault((delivery.topic, delivery.partition), []).append(delivery)
    ids = {name: topic_id(name) for name in names.values()}
    keys: dict[uuid.UUID, set[int]] = {}
    for _, requested_id, index in requested:
        keys.setdefault(requested_id or uuid.UUID(int=0), set()).add(index)
    for name, index in [*outcome, *by_partition]:
        keys.setdefault(ids.get(name, topic_id(name)), set()).add(index)
    for unknown_id, index in ack_errors:
        keys.setdefault(unknown_id, set()).add(index)
    topics = []
    for identifier, indexes in keys.items():
        known = names.get(identifier)
        partitions = []
        for index in sorted(indexes):
            held = by_partition.get((known, index), []) if known is not None else []
            error = outcome.get((known, index)) if known is not None else None
            ack_code = ack_errors.get((identifier, index),
                                      _code(error) if error is not None else 0)
            fetch_code = error_codes.NONE if known is not None else error_codes.UNKNOWN_TOPIC_ID
            partitions.append(build(
                partition_type, partition_index=index, error_code=fetch_code,
                error_message=None, acknowledge_error_code=ack_code,
                acknowledge_error_message=error.message if error is not None else None,
                current_leader=build(leader_type, leader_id=node.node_id, leader_epoch=0),
                records=encode_batch(held),
                acquired_records=tuple(
                    build(acquired_type, first_offset=first, last_offset=last,
                          delivery_count=count)
                    for first, last, count in acquired_ranges(held))))
        topics.append(build(topic_type, topic_id=identifier, partitions=tuple(partitions)))
    return build(response_type, error_code=error_codes.NONE, error_message=None,
                 acquisition_lock_timeout=lock_ms, responses=tuple(topics), node_endpoints=())


# --- ShareAcknowledge -----------------------------------------------------------------
async def handle_acknowledge(coordinator: ShareCoordinator, broker: Broker, node: Node,
                             request: Request) -> Any:
    body = request.body
    response_type = response_class(79, request.header.api_version)
    topic_type = nested(response_type, "ShareAcknowledgeTopicResponse")
    partition_type = nested(response_type, "PartitionData")
    leader_type = nested(response_type, "LeaderIdAndEpoch")
    names = topic_names(broker)
    batches, ack_errors = _acknowledgements(body.topics, names)
    group_id, member_id = body.group_id or "", body.member_id or ""
    lock_ms = int(coordinator.config(group_id)["share.record.lock.duration.ms"])
    try:
        if body.share_session_epoch == 0:  # as Kafka: only a ShareFetch opens one
            raise InvalidShareSessionEpochError("ShareAcknowledge cannot open a share session")
        _, closing = await coordinator.open_session(group_id, member_id,
                                                    body.share_session_epoch, (), ())
        outcome = await coordinator.acknowledge(group_id, member_id, batches,
                                                getattr(body, "is_renew_ack", False))
        if closing:
            await coordinator.close_session(group_id, member_id)
    except OperatingError as error:
        return _top_level(response_type, error, lock_ms)
    topics = []
    for topic in body.topics:
        name = names.get(topic.topic_id) if topic.topic_id is not None else None
        partitions = []
        for partition in topic.partitions:
            index = partition.partition_index
            failure = outcome.get((name, index)) if name is not None else None
            code = ack_errors.get((topic.topic_id or uuid.UUID(int=0), index),
                                  _code(failure) if failure is not None else 0)
            partitions.append(build(
                partition_type, partition_index=index, error_code=code,
                error_message=failure.message if failure is not None else None,
                current_leader=build(leader_type, leader_id=node.node_id, leader_epoch=0)))
        topics.append(build(topic_type, topic_id=topic.topic_id, partitions=tuple(partitions)))
    return build(response_type, error_code=error_codes.NONE, error_message=None,
                 acquisition_lock_timeout=lock_ms, responses=tuple(topics), node_endpoints=())


# --- Describe / Alter / DeleteShareGroupOffsets --------------------------------------
def handle_describe_offsets(coordinator: ShareCoordinator, broker: Broker,
                            request: Request) -> Any:
    """Per partition, the share-partition start offset (every record below it is settled)
    and the lag: records from it to the high watermark (an upper bound: acknowledged
    records above the start count too)."""
    response_type = response_class(90, request.header.api_version)
    group_type = nested(response_type, "DescribeShareGroupOffsetsResponseGroup")
    topic_type = nested(response_type, "DescribeShareGroupOffsetsResponseTopic")
    partition_type = nested(response_type, "DescribeShareGroupOffsetsResponsePartition")
    groups = []
    for item in request.body.groups:
        wanted = ([(topic.topic_name, tuple(topic.partitions)) for topic in item.topics]
                  if item.topics is not None
                  else [(name, None) for name in coordinator.topics_read(item.group_id)])
        topics = []
        for name, indexes in wanted:
            starts = coordinator.broker.shared_group_start_offsets(name, item.group_id) or {}
            partitions = []
            for index in (indexes if indexes is not None else tuple(sorted(starts))):
                start = starts.get(index)
                if start is None:
                    partitions.append(build(partition_type, partition_index=index,
                                            start_offset=-1, leader_epoch=-1, lag=-1,
                                            error_code=error_codes.NONE, error_message=None))
                    continue
                high = broker.offsets(name, index).high_watermark
                partitions.append(build(partition_type, partition_index=index,
                                        start_offset=start, leader_epoch=0,
                                        lag=max(0, high - start),
                                        error_code=error_codes.NONE, error_message=None))
            topics.append(build(topic_type, topic_name=name, topic_id=topic_id(name),
                                partitions=tuple(partitions)))
        groups.append(build(group_type, group_id=item.group_id, topics=tuple(topics),
                            error_code=error_codes.NONE, error_message=None))
    return build(response_type, groups=tuple(groups))


async def handle_delete_offsets(coordinator: ShareCoordinator, request: Request) -> Any:
    body = request.body
    response_type = response_class(92, request.header.api_version)
    topic_type = nested(response_type, "DeleteShareGroupOffsetsResponseTopic")
    group = coordinator.groups.get(body.group_id)
    if group is not None and group.members:
        return build(response_type, error_code=error_codes.NON_EMPTY_GROUP,
                     error_message="share group has members", responses=())
    results = []
    for topic in body.topics:
        code, message = error_codes.NONE, None
        try:
            await coordinator.delete_offsets(body.group_id, topic.topic_name)
        except OperatingError as error:
            code, message = _code(error), error.message
        results.append(build(topic_type, topic_name=topic.topic_name,
                             topic_id=topic_id(topic.topic_name), error_code=code,
                             error_message=message))
    return build(response_type, error_code=error_codes.NONE, error_message=None,
                 responses=tuple(results))


async def handle_alter_offsets(coordinator: ShareCoordinator, request: Request,
                               other_group: bool) -> Any:
    """AlterShareGroupOffsets (91): per partition, the share-partition start offset.
    ``other_group``: the id names a classic or consumer group (GROUP_ID_NOT_FOUND)."""
    body = request.body
    response_type = response_class(91, request.header.api_version)
    topic_type = nested(response_type, "AlterShareGroupOffsetsResponseTopic")
    partition_type = nested(response_type, "AlterShareGroupOffsetsResponsePartition")
    wanted = [(topic.topic_name, partition.partition_index, partition.start_offset)
              for topic in body.topics for partition in topic.partitions]
    try:
        if other_group:
            raise UnknownGroupError("the group is not a share group", group=body.group_id)
        if len({(name, index) for name, index, _ in wanted}) != len(wanted):
            raise InvalidRequestError("a partition is named twice")
        outcome = iter(await coordinator.alter_offsets(body.group_id, wanted))
    except OperatingError as error:
        return build(response_type, error_code=_code(error), error_message=error.message,
                     responses=())
    topics = []
    for topic in body.topics:
        partitions = []
        for partition in topic.partitions:
            failure = next(outcome)
            partitions.append(build(
                partition_type, partition_index=partition.partition_index,
                error_code=error_codes.NONE if failure is None else _code(failure),
                error_message=None if failure is None else failure.message))
        topics.append(build(topic_type, topic_name=topic.topic_name,
                            topic_id=topic_id(topic.topic_name), partitions=tuple(partitions)))
    return build(response_type, error_code=error_codes.NONE, error_message=None,
                 responses=tuple(topics))
