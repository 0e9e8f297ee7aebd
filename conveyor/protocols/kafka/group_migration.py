"""Online migration between the classic and the KIP-848 consumer group protocol.

Owns: ``group.consumer.migration.policy`` (``disabled``, ``upgrade``, ``downgrade``,
``bidirectional``: Kafka's default), the upgrade of a classic group with members when a
consumer-protocol member joins it, the downgrade of a consumer group whose last
consumer-protocol member left while classic members remain, and the classic APIs
(JoinGroup, SyncGroup, Heartbeat, LeaveGroup) of members inside a consumer group:
typed request -> ``ClassicMembers`` call -> kio response, with the embedded consumer
protocol (consumer_protocol.py) read and written here.

Rules:
- Upgrade (policy ``upgrade``/``bidirectional``): the classic group's members, with
  the partitions their leader assigned them, become classic members of a new consumer
  group at the classic generation; committed offsets stay where they are (one store).
  A join or sync still waiting is told REBALANCE_IN_PROGRESS and rejoins. Otherwise
  (or a protocol type other than "consumer") the consumer-protocol join is refused with
  GROUP_ID_NOT_FOUND, as Kafka refuses it.
- A classic JoinGroup to a consumer group with members joins it as a classic member
  unless the policy is ``disabled`` (then INCONSISTENT_GROUP_PROTOCOL).
- Downgrade (policy ``downgrade``/``bidirectional``): checked whenever the group is
  touched; the classic members go back to a classic group that rebalances at once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from conveyor.broker.classic_members import (
    CLASSIC_PROTOCOL_TYPE,
    AdoptedMember,
    ClassicMembers,
)
from conveyor.broker.ordered_group import Member
from conveyor.errors import (
    InconsistentGroupProtocolError,
    InvalidConfigError,
    NotCoordinatorError,
    OperatingError,
    UnknownGroupError,
)
from conveyor.protocols.kafka import error_codes
from conveyor.protocols.kafka.codec import Request
from conveyor.protocols.kafka.consumer_protocol import (
    encode_assignment,
    parse_assignment,
    parse_subscription,
)
from conveyor.protocols.kafka.messages import response_class
from conveyor.protocols.kafka.responses import build, millis, nested
from conveyor.protocols.kafka.settings import MIGRATION_POLICIES

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker
    from conveyor.broker.consumer_coordinator import ConsumerCoordinator


logger = logging.getLogger("conveyor.kafka")


def check_policy(value: str) -> str:
    if value not in MIGRATION_POLICIES:
        raise InvalidConfigError("kafka.consumer_migration_policy must be one of "
                                 + ", ".join(MIGRATION_POLICIES), value=value)
    return value


class GroupMigration:
    def __init__(self, broker: Broker, consumers: ConsumerCoordinator, policy: str) -> None:
        self.broker = broker
        self.consumers = consumers
        self.classic = ClassicMembers(consumers)
        self.policy = check_policy(policy)

    async def persist(self, group_id: str, answer: Any) -> Any:
        """Write what a classic request changed in the consumer group, then hand back
        its answer. A node that lost the group (NOT_COORDINATOR) writes nothing: the
        client learns it at its next request, refused by the owner check, and the group's
        next owner reads what was written before."""
        try:
            await self.consumers.persist(group_id)
        except NotCoordinatorError:
            logger.info("classic request on a consumer group this node lost",
                        extra={"group_id": group_id})
        return answer

    # --- conversions -----------------------------------------------------------------------
    def upgrade(self, group_id: str) -> None:
        """A consumer-protocol member joins ``group_id``: if a classic group with members
        holds that id, convert it (or refuse the join, as the policy says)."""
        description = self.broker.describe_group(group_id)
        if not description.members:
            return
        if self.policy not in ("upgrade", "bidirectional") or (
                description.protocol_type != CLASSIC_PROTOCOL_TYPE):
            raise UnknownGroupError(f"Group {group_id} is not a consumer group", group=group_id)
        self.classic.check_room(group_id, len(description.members))
        released = self.broker.release_classic_members(group_id)
        if released is None:
            return
        generation, protocol_name, members = released
        adopted = []
        for member in members:
            metadata = member.metadata_for(protocol_name) or (
                member.protocols[0][1] if member.protocols else b"")
            subscription = parse_subscription(metadata)
            adopted.append(AdoptedMember(
                member.member_id, member.group_instance_id, member.client_id,
                member.client_host, member.protocols, member.session_timeout_ms,
                member.rebalance_timeout_ms, subscription.topics,
                parse_assignment(member.assignment), subscription.version))
        self.classic.adopt(group_id, generation, adopted)

    def downgrade_if_due(self, group_id: str) -> None:
        if self.policy not in ("downgrade", "bidirectional"):
            return
        members = self.classic.classic_only(group_id)
        if not members:
            return
        now_ms = self.broker.clock.monotonic_ms()
        classic = [Member(
            member.member_id, member.instance_id, member.client_id, member.client_host,
            member.classic.protocols, member.classic.session_timeout_ms,
            member.rebalance_timeout_ms or member.classic.session_timeout_ms, now_ms,
            encode_assignment(member.assigned, member.classic.subscription_version))
            for member in members if member.classic is not None]
        generation = max(member.epoch for member in members)
        self.broker.adopt_classic_members(group_id, generation, CLASSIC_PROTOCOL_TYPE, classic)

    def hosts(self, group_id: str) -> bool:
        """Does a consumer group with members answer this id's classic requests?"""
        self.downgrade_if_due(group_id)
        return self.consumers.has_members(group_id)

    # --- the classic APIs of members in a consumer group ---------------------------------
    def join(self, request: Request, client_host: str) -> Any:
        body = request.body
        version = request.header.api_version
        response_type = response_class(11, version)
        member_id = body.member_id
        instance_id = getattr(body, "group_instance_id", None)

        def answer(code: int, generation: int = -1, name: str | None = None,
                   member: str = member_id) -> Any:
            return build(response_type, error_code=code, generation_id=generation,
                         protocol_type=CLASSIC_PROTOCOL_TYPE if name is not None else None,
                         protocol_name=name if name is not None or version >= 7 else "",
                         leader="", skip_assignment=False, member_id=member, members=())

        try:
            if self.policy == "disabled":
                raise InconsistentGroupProtocolError(
                    "a KIP-848 consumer group with members uses this group id "
                    "(group.consumer.migration.policy=disabled)", group=body.group_id)
            if body.protocol_type != CLASSIC_PROTOCOL_TYPE:
                raise InconsistentGroupProtocolError(
                    "a consumer group takes classic members of protocol type consumer",
                    group=body.group_id)
            if not member_id and instance_id is not None:
                group = self.consumers.groups.get(body.group_id)
                member_id = group.static.get(instance_id, "") if group is not None else ""
            if not member_id:
                member_id = (f"{request.header.client_id or 'member'}-"
                             f"{self.broker.rng.getrandbits(128):032x}")
                if version >= 4 and instance_id is None:
                    return answer(error_codes.MEMBER_ID_REQUIRED, member=member_id)
            protocols = [(protocol.name, bytes(protocol.metadata)) for protocol in body.protocols]
            subscription = parse_subscription(protocols[0][1] if protocols else b"")
            session_ms = millis(body.session_timeout)
            joined = self.classic.join(
                body.group_id, member_id, instance_id, protocols, subscription.topics,
                subscription.owned, subscription.version, session_ms,
                millis(body.rebalance_timeout) if version >= 1 else session_ms,
                request.header.client_id or "", client_host)
        except OperatingError as error:
            return answer(error_codes.error_code_for(error))
        return answer(error_codes.NONE, joined.generation, joined.protocol_name,
                      joined.member_id)

    def sync(self, request: Request) -> Any:
        body = request.body
        response_type = response_class(14, request.header.api_version)
        try:
            result = self.classic.sync(body.group_id, body.member_id, body.generation_id)
        except OperatingError as error:
            return build(response_type, error_code=error_codes.error_code_for(error),
                         protocol_type=None, protocol_name=None, assignment=b"")
        return build(response_type, error_code=error_codes.NONE,
                     protocol_type=CLASSIC_PROTOCOL_TYPE, protocol_name=result.protocol_name,
                     assignment=encode_assignment(result.assigned, result.version))

    def heartbeat(self, request: Request) -> Any:
        body = request.body
        response_type = response_class(12, request.header.api_version)
        try:
            self.classic.heartbeat(body.group_id, body.member_id, body.generation_id)
        except OperatingError as error:
            return build(response_type, error_code=error_codes.error_code_for(error))
        return build(response_type, error_code=error_codes.NONE)

    def leave(self, request: Request) -> Any:
        body = request.body
        version = request.header.api_version
        response_type = response_class(13, version)
        if version < 3:
            code = self._leave_one(body.group_id, body.member_id, None)
            return build(response_type, error_code=code, members=())
        member_type = nested(response_type, "MemberResponse")
        members = tuple(
            build(member_type, member_id=member.member_id,
                  group_instance_id=member.group_instance_id,
                  error_code=self._leave_one(body.group_id, member.member_id,
                                             member.group_instance_id))
            for member in body.members)
        return build(response_type, error_code=error_codes.NONE, members=members)

    def _leave_one(self, group_id: str, member_id: str, instance_id: str | None) -> int:
        try:
            self.classic.leave(group_id, member_id, instance_id)
        except OperatingError as error:
            return error_codes.error_code_for(error)
        self.downgrade_if_due(group_id)
        return error_codes.NONE
