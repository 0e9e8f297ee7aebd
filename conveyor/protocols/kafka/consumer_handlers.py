"""Handlers for KIP-848 consumer groups: ConsumerGroupHeartbeat (68) and
ConsumerGroupDescribe (69), and the member-epoch check of their offset commits.

Owns: typed request -> ``ConsumerCoordinator`` call -> kio response, topic ids to
names and back. Membership, assignors and reconciliation live in
conveyor/broker/consumer_coordinator.py.

Rules: member and epoch errors (UNKNOWN_MEMBER_ID, FENCED_MEMBER_EPOCH,
UNRELEASED_INSTANCE_ID, UNSUPPORTED_ASSIGNOR, INVALID_REGULAR_EXPRESSION,
INVALID_REQUEST) are the response's error code; the connection stays open.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Final

from conveyor.broker.consumer_coordinator import ConsumerCoordinator, owned_partitions
from conveyor.errors import OperatingError, UnknownGroupError
from conveyor.protocols.kafka import error_codes
from conveyor.protocols.kafka.adapter import ConnectionState
from conveyor.protocols.kafka.admin_handlers import topic_id
from conveyor.protocols.kafka.codec import Request
from conveyor.protocols.kafka.messages import response_class
from conveyor.protocols.kafka.responses import build, millis, nested

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker
    from conveyor.protocols.kafka.group_migration import GroupMigration

AUTHORIZED_OPERATIONS_OMITTED: Final = -(2**31)
MEMBER_TYPE_CONSUMER: Final = 1  # ConsumerGroupDescribe v1: joined with the new protocol
MEMBER_TYPE_CLASSIC: Final = 0  # a classic member of the group (online migration)


def _names(broker: Broker) -> dict[uuid.UUID, str]:
    return {topic_id(info.name): info.name for info in broker.list_topics()}


async def handle_heartbeat(coordinator: ConsumerCoordinator, broker: Broker,
                           request: Request, state: ConnectionState,
                           migration: GroupMigration | None = None) -> Any:
    body = request.body
    response_type = response_class(68, request.header.api_version)
    owned = None
    if body.topic_partitions is not None:
        names = _names(broker)
        owned = owned_partitions({
            names[item.topic_id]: item.partitions for item in body.topic_partitions
            if item.topic_id in names})
    try:
        if body.member_epoch == 0:
            if migration is not None:
                migration.upgrade(body.group_id)  # a classic group with members converts
            elif broker.describe_group(body.group_id).members:
                raise UnknownGroupError("a classic group with members uses this group id",
                                        group=body.group_id)
        result = await coordinator.heartbeat(
            body.group_id, body.member_id, body.member_epoch,
            instance_id=body.instance_id, rack=body.rack_id,
            rebalance_timeout_ms=millis(body.rebalance_timeout),
            topic_names=body.subscribed_topic_names,
            topic_regex=getattr(body, "subscribed_topic_regex", None),
            assignor=body.server_assignor, owned=owned,
            client_id=request.header.client_id or "", client_host=state.peer_host)
    except OperatingError as error:
        return build(response_type, error_code=error_codes.error_code_for(error),
                     error_message=error.message, member_id=body.member_id or None,
                     member_epoch=-1, heartbeat_interval=0, assignment=None)
    finally:
        if migration is not None:  # the last consumer-protocol member may have gone
            migration.downgrade_if_due(body.group_id)
    assignment = None
    if result.assignment is not None:
        assignment_type = nested(response_type, "Assignment")
        partitions_type = nested(response_type, "TopicPartitions")
        assignment = build(assignment_type, topic_partitions=tuple(
            build(partitions_type, topic_id=topic_id(name), partitions=tuple(sorted(parts)))
            for name, parts in sorted(result.assignment.items())))
    return build(response_type, error_code=error_codes.NONE, error_message=None,
                 member_id=result.member_id, member_epoch=result.member_epoch,
                 heartbeat_interval=result.heartbeat_interval_ms, assignment=assignment)


def handle_describe(coordinator: ConsumerCoordinator, request: Request) -> Any:
    response_type = response_class(69, request.header.api_version)
    group_type = nested(response_type, "DescribedGroup")
    member_type = nested(response_type, "Member")
    assignment_type = nested(response_type, "Assignment")
    partitions_type = nested(response_type, "TopicPartitions")

    def assignment(parts_by_topic: dict[str, frozenset[int]]) -> Any:
        return build(assignment_type, topic_partitions=tuple(
            build(partitions_type, topic_id=topic_id(name), topic_name=name,
                  partitions=tuple(sorted(parts)))
            for name, parts in sorted(parts_by_topic.items()) if parts))

    groups = []
    for group_id in request.body.group_ids:
        try:
            group = coordinator.describe(group_id)
        except OperatingError as error:
            groups.append(build(group_type, error_code=error_codes.error_code_for(error),
                                error_message=error.message, group_id=group_id,
                                group_state="Dead", group_epoch=-1, assignment_epoch=-1,
                                assignor_name="", members=(),
                                authorized_operations=AUTHORIZED_OPERATIONS_OMITTED))
            continue
        members = tuple(
            build(member_type, member_id=member.member_id, instance_id=member.instance_id,
                  rack_id=member.rack, member_epoch=member.epoch, client_id=member.client_id,
                  client_host=member.client_host, subscribed_topic_names=member.topic_names,
                  subscribed_topic_regex=member.regex, assignment=assignment(member.assigned),
                  target_assignment=assignment(group.target.get(member.member_id, {})),
                  member_type=MEMBER_TYPE_CONSUMER if member.classic is None
                  else MEMBER_TYPE_CLASSIC)
            for member in group.members.values())
        groups.append(build(group_type, error_code=error_codes.NONE, error_message=None,
                            group_id=group_id, group_state=coordinator.state(group),
                            group_epoch=group.epoch, assignment_epoch=group.assignment_epoch,
                            assignor_name=group.assignor, members=members,
                            authorized_operations=AUTHORIZED_OPERATIONS_OMITTED))
    return build(response_type, groups=tuple(groups))
