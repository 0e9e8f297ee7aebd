"""The admin side of Kafka share groups (KIP-932): describe, list, and the
share-group offset APIs (Describe-, Alter-, DeleteShareGroupOffsets), and deleting a
group.

Owns: nothing of its own; a part of ``ShareCoordinator`` (which inherits it) kept in a
module of its own for size. Works on the coordinator's groups and configs and the
broker's shared groups under them.
Must not know: the wire format.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from conveyor.errors import (
    GroupLimitError,
    InvalidRequestError,
    NonEmptyGroupError,
    OperatingError,
    PreconditionFailedError,
    UnknownGroupError,
    UnknownTopicError,
)
from conveyor.storage.member_state import SHARE

from .group_configs import GroupConfigs
from .group_members import GroupMembers
from .share_state import SHARE_GROUPS_MAX, ShareGroup

if TYPE_CHECKING:
    from .broker import Broker


class ShareGroupAdmin:
    broker: Broker
    configs: GroupConfigs
    groups: dict[str, ShareGroup]
    members: GroupMembers

    async def _ensure_shared_group(self, group: ShareGroup, topic: str) -> None:
        raise NotImplementedError  # ShareCoordinator's

    def describe(self, group_id: str) -> ShareGroup:
        group = self.groups.get(group_id)
        if group is None:
            if self.is_share_group(group_id):  # configured, or read before a restart
                return ShareGroup(group_id)
            raise UnknownGroupError("no such share group", group=group_id)
        return group

    def list_groups(self) -> list[tuple[str, str]]:
        """(group id, state) of every share group: "Stable" with members, else "Empty"."""
        names = {name for name in [*self.groups, *self.configs.explicit]
                 if self.is_share_group(name)}
        return [(name, "Stable" if self.groups.get(name) and self.groups[name].members
                 else "Empty") for name in sorted(names)]

    def is_share_group(self, group_id: str) -> bool:
        return group_id in self.groups or any(
            name.startswith("share.") for name in self.configs.set_on(group_id))

    def topics_read(self, group_id: str) -> list[str]:
        """The topics this group has a shared group on (persisted: known after a restart)."""
        return [info.name for info in self.broker.list_topics()
                if self.broker.shared_group_start_offsets(info.name, group_id) is not None]

    async def delete_offsets(self, group_id: str, topic: str) -> None:
        """Forget the group's state on ``topic`` (DeleteShareGroupOffsets): next time it
        starts where share.auto.offset.reset says."""
        group = self.groups.get(group_id)
        if group is not None and group.members:
            raise NonEmptyGroupError("share group has members", group=group_id)
        await self.broker.delete_shared_group(topic, group_id)
        if group is not None:
            group.topics.discard(topic)

    async def alter_offsets(self, group_id: str,
                            offsets: Sequence[tuple[str, int, int]]) -> list[OperatingError | None]:
        """AlterShareGroupOffsets: per (topic, partition, start offset), move the group's
        start there, forgetting the partition's record states (records from the offset
        on are delivered afresh). The group must have no members (NonEmptyGroupError);
        a group id never seen becomes an empty share group. One outcome per item."""
        if not group_id:
            raise InvalidRequestError("group id must not be empty")
        group = self.groups.get(group_id)
        if group is not None and group.members:
            raise NonEmptyGroupError("share group has members", group=group_id)
        if group is None:
            if len(self.groups) >= SHARE_GROUPS_MAX:
                raise GroupLimitError("too many share groups", limit=SHARE_GROUPS_MAX)
            group = self.groups[group_id] = ShareGroup(group_id)
        outcome: list[OperatingError | None] = []
        for topic, partition, offset in offsets:
            try:
                if self.broker.topics.find(topic) is None:
                    raise UnknownTopicError("no such topic", topic=topic)
                if topic == group_id and self.broker.queue_exists(topic):
                    raise InvalidRequestError("a queue's own group: purge the queue instead",
                                              queue=topic)
                await self._ensure_shared_group(group, topic)
                await self.broker.reset_shared_partition(topic, group_id, partition, offset)
                outcome.append(None)
            except PreconditionFailedError as error:  # held by a departed member, or by
                # a consumer of another protocol on the same shared group
                outcome.append(NonEmptyGroupError(error.message, topic=topic,
                                                  partition=partition))
            except OperatingError as error:
                outcome.append(error)
        return outcome

    async def delete_group(self, group_id: str) -> None:
        """The group, its configs and its shared groups on plain topics (a queue's own
        group stays with the queue)."""
        group = self.groups.get(group_id)
        if group is not None and group.members:
            raise NonEmptyGroupError("share group has members", group=group_id)
        for topic in self.topics_read(group_id):
            try:
                await self.broker.delete_shared_group(topic, group_id)
            except PreconditionFailedError:
                continue
        self.groups.pop(group_id, None)
        self.members.delete(SHARE, group_id)
        await self.configs.forget(group_id)
