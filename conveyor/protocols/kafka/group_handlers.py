"""Handlers for the classic consumer-group protocol.

Owns: JoinGroup, SyncGroup, Heartbeat, LeaveGroup, OffsetCommit, OffsetFetch,
DescribeGroups, ListGroups, DeleteGroups: typed request -> ``Broker`` group
call -> kio response. The coordinator's rules (generations, rebalances, static
membership, timeouts) live in conveyor/broker/ordered_group.py; the partition
assignment is the client's (Kafka's client-side assignors), relayed as bytes.

Rules: a broker error answers the protocol's own code (UNKNOWN_MEMBER_ID,
ILLEGAL_GENERATION, REBALANCE_IN_PROGRESS, MEMBER_ID_REQUIRED...); the
connection stays open.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from conveyor.broker.ordered_group import CommittedOffset, MemberIdRequired
from conveyor.errors import InconsistentGroupProtocolError, OperatingError, UnknownGroupError
from conveyor.protocols.kafka import error_codes
from conveyor.protocols.kafka.adapter import ConnectionState
from conveyor.protocols.kafka.admin_handlers import topic_id
from conveyor.protocols.kafka.codec import Request
from conveyor.protocols.kafka.messages import response_class
from conveyor.protocols.kafka.responses import build, millis, nested

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker
    from conveyor.broker.consumer_coordinator import ConsumerCoordinator
    from conveyor.broker.share_coordinator import ShareCoordinator
    from conveyor.protocols.kafka.group_migration import GroupMigration


def _code(error: OperatingError) -> int:
    return error_codes.error_code_for(error)


async def handle_join_group(broker: Broker, request: Request, state: ConnectionState,
                            consumers: ConsumerCoordinator | None = None,
                            migration: GroupMigration | None = None) -> Any:
    body = request.body
    version = request.header.api_version
    response_type = response_class(11, version)
    session_timeout_ms = millis(body.session_timeout)
    rebalance_timeout_ms = millis(body.rebalance_timeout) if version >= 1 else session_timeout_ms
    if migration is not None and migration.hosts(body.group_id):
        # a classic member of a KIP-848 group
        return await migration.persist(body.group_id, migration.join(request, state.peer_host))
    try:
        if consumers is not None and consumers.is_consumer_group(body.group_id):
            if consumers.has_members(body.group_id):
                raise InconsistentGroupProtocolError(
                    "a KIP-848 consumer group with members uses this group id",
                    group=body.group_id)
            consumers.delete_group(body.group_id)  # empty: the classic protocol takes over
        outcome = await broker.join_group(
            body.group_id, body.member_id, body.protocol_type,
            [(protocol.name, protocol.metadata) for protocol in body.protocols],
            session_timeout_ms, rebalance_timeout_ms,
            getattr(body, "group_instance_id", None),
            request.header.client_id or "", state.peer_host,
            require_known_member_id=version >= 4,
        )
    except OperatingError as error:
        return build(response_type, error_code=_code(error), generation_id=-1,
                     protocol_type=None, protocol_name=None if version >= 7 else "",
                     leader="", member_id=body.member_id, members=())
    if isinstance(outcome, MemberIdRequired):
        return build(response_type, error_code=error_codes.MEMBER_ID_REQUIRED, generation_id=-1,
                     protocol_type=None, protocol_name=None if version >= 7 else "",
                     leader="", member_id=outcome.member_id, members=())
    member_type = nested(response_type, "JoinGroupResponseMember")
    members = tuple(
        build(member_type, member_id=member.member_id,
              group_instance_id=member.group_instance_id, metadata=member.metadata)
        for member in outcome.members
    )
    return build(response_type, error_code=error_codes.NONE, generation_id=outcome.generation,
                 protocol_type=outcome.protocol_type, protocol_name=outcome.protocol_name,
                 leader=outcome.leader_id, skip_assignment=False, member_id=outcome.member_id,
                 members=members)


async def handle_sync_group(broker: Broker, request: Request,
                            migration: GroupMigration | None = None) -> Any:
    body = request.body
    if migration is not None and migration.hosts(body.group_id):
        return await migration.persist(body.group_id, migration.sync(request))
    response_type = response_class(14, request.header.api_version)
    assignments = {item.member_id: item.assignment for item in body.assignments}
    try:
        result = await broker.sync_group(
            body.group_id, body.member_id, body.generation_id, assignments
        )
    except OperatingError as error:
        return build(response_type, error_code=_code(error), protocol_type=None,
                     protocol_name=None, assignment=b"")
    return build(response_type, error_code=error_codes.NONE, protocol_type=result.protocol_type,
                 protocol_name=result.protocol_name, assignment=result.assignment)


async def handle_heartbeat(broker: Broker, request: Request,
                           migration: GroupMigration | None = None) -> Any:
    body = request.body
    if migration is not None and migration.hosts(body.group_id):
        return await migration.persist(body.group_id, migration.heartbeat(request))
    response_type = response_class(12, request.header.api_version)
    try:
        await broker.heartbeat(body.group_id, body.member_id, body.generation_id)
    except OperatingError as error:
        return build(response_type, error_code=_code(error))
    return build(response_type, error_code=error_codes.NONE)


async def handle_leave_group(broker: Broker, request: Request,
                             migration: GroupMigration | None = None) -> Any:
    body = request.body
    if migration is not None and migration.hosts(body.group_id):
        return await migration.persist(body.group_id, migration.leave(request))
    version = request.header.api_version
    response_type = response_class(13, version)
    if version < 3:
        try:
            await broker.leave_group(body.group_id, body.member_id)
        except OperatingError as error:
            return build(response_type, error_code=_code(error), members=())
        return build(response_type, error_code=error_codes.NONE, members=())
    member_type = nested(response_type, "MemberResponse")
    members = []
    for member in body.members:
        code = error_codes.NONE
        try:
            await broker.leave_group(body.group_id, member.member_id, member.group_instance_id)
        except OperatingError as error:
            code = _code(error)
        members.append(build(member_type, member_id=member.member_id,
                             group_instance_id=member.group_instance_id, error_code=code))
    return build(response_type, error_code=error_codes.NONE, members=tuple(members))


async def handle_offset_commit(broker: Broker, request: Request,
                               consumers: ConsumerCoordinator | None = None) -> Any:
    body = request.body
    response_type = response_class(8, request.header.api_version)
    topic_type = nested(response_type, "OffsetCommitResponseTopic")
    partition_type = nested(response_type, "OffsetCommitResponsePartition")
    offsets = {
        (topic.name, partition.partition_index): CommittedOffset(
            partition.committed_offset, partition.committed_metadata,
            getattr(partition, "committed_leader_epoch", -1),
        )
        for topic in body.topics
        for partition in topic.partitions
    }
    code = error_codes.NONE
    try:
        if consumers is not None and consumers.is_consumer_group(body.group_id):
            # a KIP-848 group: the coordinator checks member and epoch; the offsets are
            # stored as a simple commit (the classic side of the group id has no members)
            consumers.check_commit(body.group_id, body.member_id,
                                   body.generation_id_or_member_epoch)
            await broker.commit_offsets(body.group_id, offsets)
        else:
            await broker.commit_offsets(
                body.group_id, offsets, body.member_id, body.generation_id_or_member_epoch
            )
    except OperatingError as error:
        code = _code(error)
    topics = tuple(
        build(topic_type, name=topic.name, partitions=tuple(
            build(partition_type, partition_index=partition.partition_index, error_code=code)
            for partition in topic.partitions
        ))
        for topic in body.topics
    )
    return build(response_type, topics=topics)


def handle_offset_fetch(broker: Broker, request: Request,
                        consumers: ConsumerCoordinator | None = None) -> Any:
    if request.header.api_version >= 8:
        return _offset_fetch_groups(broker, request, consumers)
    body = request.body
    response_type = response_class(9, request.header.api_version)
    topic_type = nested(response_type, "OffsetFetchResponseTopic")
    partition_type = nested(response_type, "OffsetFetchResponsePartition")
    wanted = None
    if body.topics is not None:
        wanted = [(topic.name, index) for topic in body.topics for index in topic.partition_indexes]
    found = broker.fetch_offsets(body.group_id, wanted)
    unstable = _unstable(broker, body, body.group_id)
    by_topic: dict[str, list[Any]] = {}
    for (topic, partition), committed in found.items():
        by_topic.setdefault(topic, []).append(build(
            partition_type, partition_index=partition,
            committed_offset=committed.offset if committed is not None else -1,
            committed_leader_epoch=committed.leader_epoch if committed is not None else -1,
            metadata=(committed.metadata or "") if committed is not None else "",
            error_code=error_codes.UNSTABLE_OFFSET_COMMIT if (topic, partition) in unstable
            else error_codes.NONE,
        ))
    topics = tuple(
        build(topic_type, name=name, partitions=tuple(partitions))
        for name, partitions in by_topic.items()
    )
    return build(response_type, topics=topics, error_code=error_codes.NONE)


def _unstable(broker: Broker, body: Any, group_id: str) -> set[tuple[str, int]]:
    """KIP-447: with ``require_stable`` (v7+), partitions whose offsets an open transaction
    holds answer UNSTABLE_OFFSET_COMMIT (the client retries) instead of older offsets."""
    if not getattr(body, "require_stable", False):
        return set()
    return broker.pending_txn_offsets(group_id)


def _offset_fetch_groups(broker: Broker, request: Request,
                         consumers: ConsumerCoordinator | None) -> Any:
    """OffsetFetch v8+: several groups per request, each answered (and failing) on its own;
    v9+ names the KIP-848 member asking (checked like a commit), v10 names topics by id."""
    version = request.header.api_version
    response_type = response_class(9, version)
    group_type = nested(response_type, "OffsetFetchResponseGroup")
    topic_type = nested(response_type, "OffsetFetchResponseTopics")
    partition_type = nested(response_type, "OffsetFetchResponsePartitions")
    names = ({topic_id(info.name): info.name for info in broker.list_topics()}
             if version >= 10 else {})
    groups = []
    for item in request.body.groups:
        member_id = getattr(item, "member_id", None)
        try:
            if consumers is not None and consumers.is_consumer_group(item.group_id):
                consumers.check_fetch(item.group_id, member_id or "",
                                      getattr(item, "member_epoch", -1))
        except OperatingError as error:
            groups.append(build(group_type, group_id=item.group_id, topics=(),
                                error_code=_code(error)))
            continue
        wanted: list[tuple[str, int]] | None = None
        unknown: list[Any] = []  # v10: topic ids naming no topic
        if item.topics is not None:
            wanted = []
            for topic in item.topics:
                name = topic.name if version < 10 else names.get(topic.topic_id)
                if name is None:
                    unknown.append(build(topic_type, topic_id=topic.topic_id, partitions=tuple(
                        build(partition_type, partition_index=index, committed_offset=-1,
                              committed_leader_epoch=-1, metadata="",
                              error_code=error_codes.UNKNOWN_TOPIC_ID)
                        for index in topic.partition_indexes)))
                    continue
                wanted += [(name, index) for index in topic.partition_indexes]
        by_topic: dict[str, list[Any]] = {}
        unstable = _unstable(broker, request.body, item.group_id)
        for (name, partition), committed in broker.fetch_offsets(item.group_id, wanted).items():
            by_topic.setdefault(name, []).append(build(
                partition_type, partition_index=partition,
                committed_offset=committed.offset if committed is not None else -1,
                committed_leader_epoch=committed.leader_epoch if committed is not None else -1,
                metadata=(committed.metadata or "") if committed is not None else "",
                error_code=error_codes.UNSTABLE_OFFSET_COMMIT if (name, partition) in unstable
                else error_codes.NONE))
        topics = [build(topic_type, name=name, topic_id=topic_id(name),
                        partitions=tuple(partitions)) for name, partitions in by_topic.items()]
        groups.append(build(group_type, group_id=item.group_id,
                            topics=tuple(topics + unknown), error_code=error_codes.NONE))
    return build(response_type, groups=tuple(groups))


def handle_describe_groups(broker: Broker, request: Request,
                           kafka4_groups: Callable[[str], bool] | None = None) -> Any:
    """DescribeGroups: classic groups. A KIP-848 consumer group or a share group
    (``kafka4_groups`` says which ids are) describes as Kafka 4 does: Dead with no
    members, and from v6 GROUP_ID_NOT_FOUND "not a classic group"; an unknown id is
    Dead, and from v6 GROUP_ID_NOT_FOUND "not found" (KIP-1043)."""
    version = request.header.api_version
    response_type = response_class(15, version)
    group_type = nested(response_type, "DescribedGroup")
    member_type = nested(response_type, "DescribedGroupMember")
    groups = []
    for group_id in request.body.groups:
        description = broker.describe_group(group_id)
        other = kafka4_groups is not None and kafka4_groups(group_id)
        if other or description.state.value == "Dead":
            message = (f"Group {group_id} is not a classic group." if other
                       else f"Group {group_id} not found.")
            groups.append(build(
                group_type, error_code=error_codes.GROUP_ID_NOT_FOUND if version >= 6 else
                error_codes.NONE, error_message=message if version >= 6 else None,
                group_id=group_id, group_state="Dead", protocol_type="", protocol_data="",
                members=(), authorized_operations=-2147483648))
            continue
        members = tuple(
            build(member_type, member_id=member.member_id,
                  group_instance_id=member.group_instance_id, client_id=member.client_id,
                  client_host=member.client_host, member_metadata=member.metadata,
                  member_assignment=member.assignment)
            for member in description.members
        )
        groups.append(build(
            group_type, error_code=error_codes.NONE, group_id=group_id,
            group_state=description.state.value, protocol_type=description.protocol_type,
            protocol_data=description.protocol_name, members=members,
            authorized_operations=-2147483648,
        ))
    return build(response_type, groups=tuple(groups))


def handle_list_groups(broker: Broker, request: Request,
                       shares: ShareCoordinator | None = None,
                       consumers: ConsumerCoordinator | None = None) -> Any:
    """Classic groups (type "classic", or "consumer" for protocol type "consumer") and
    share groups (type "share"), filtered by state and (v5) type, case-insensitively."""
    response_type = response_class(16, request.header.api_version)
    group_type = nested(response_type, "ListedGroup")
    states = {state.lower() for state in getattr(request.body, "states_filter", ()) or ()}
    types = {kind.lower() for kind in getattr(request.body, "types_filter", ()) or ()}
    modern = {name for name, _ in consumers.list_groups()} if consumers is not None else set()
    listed = [(listing.group_id, listing.protocol_type, listing.state.value, "classic")
              for listing in broker.list_groups() if listing.group_id not in modern]
    if consumers is not None:
        listed += [(name, "consumer", state, "consumer")
                   for name, state in consumers.list_groups()]
    if shares is not None:
        listed += [(name, "share", state, "share") for name, state in shares.list_groups()]
    groups = tuple(
        build(group_type, group_id=group_id, protocol_type=protocol_type,
              group_state=state, group_type=kind)
        for group_id, protocol_type, state, kind in listed
        if (not states or state.lower() in states) and (not types or kind in types)
    )
    return build(response_type, error_code=error_codes.NONE, groups=groups)


async def handle_delete_groups(broker: Broker, request: Request,
                               shares: ShareCoordinator | None = None,
                               consumers: ConsumerCoordinator | None = None) -> Any:
    response_type = response_class(42, request.header.api_version)
    result_type = nested(response_type, "DeletableGroupResult")
    names = list(request.body.groups_names)
    share_outcome: dict[str, Exception | None] = {}
    if shares is not None:
        for name in names:
            if shares.is_share_group(name):
                try:
                    await shares.delete_group(name)
                    share_outcome[name] = None
                except OperatingError as error:
                    share_outcome[name] = error
    modern: set[str] = set()
    if consumers is not None:
        for name in names:
            if consumers.is_consumer_group(name) and name not in share_outcome:
                try:
                    consumers.delete_group(name)  # its offsets go with the classic side
                    modern.add(name)
                except OperatingError as error:
                    share_outcome[name] = error
    outcome = await broker.delete_groups([name for name in names if name not in share_outcome])
    for name in modern:  # a consumer group that never committed has no classic side
        if isinstance(outcome.get(name), UnknownGroupError):
            outcome[name] = None
    outcome.update(share_outcome)
    results = tuple(
        build(result_type, group_id=group_id,
              error_code=error_codes.NONE if error is None else (
                  _code(error) if isinstance(error, OperatingError)
                  else error_codes.UNKNOWN_SERVER_ERROR))
        for group_id, error in outcome.items()
    )
    return build(response_type, results=results)


def subscribed_topics(broker: Broker, consumers: ConsumerCoordinator | None,
                      group_id: str) -> set[str]:
    """Topics the group's current members consume (OffsetDelete keeps their offsets)."""
    topics: set[str] = set()
    if consumers is not None and consumers.is_consumer_group(group_id):
        group = consumers.describe(group_id)
        for parts in group.target.values():
            topics.update(parts)
        for member in group.members.values():
            topics.update(member.topic_names)
    description = broker.describe_group(group_id)
    if description.protocol_type == "consumer":
        for described in description.members:
            topics.update(subscription_topics(described.metadata))
    return topics


def subscription_topics(metadata: bytes) -> list[str]:
    """The topics of a classic consumer's ConsumerProtocolSubscription (version int16,
    then an array of int16-length strings); what does not parse names none."""
    view = memoryview(metadata)
    if len(view) < 6:
        return []
    (count,) = struct.unpack_from(">i", view, 2)
    position, topics = 6, []
    if count < 0 or count * 2 > len(view) - position:
        return []
    for _ in range(count):
        if position + 2 > len(view):
            return []
        (length,) = struct.unpack_from(">h", view, position)
        position += 2
        if length < 0 or position + length > len(view):
            return []
        try:
            topics.append(bytes(view[position:position + length]).decode())
        except UnicodeDecodeError:
            return []
        position += length
    return topics
