"""The offsets admin of Kafka share groups: DeleteShareGroupOffsets and
AlterShareGroupOffsets over a ShareCoordinator's groups and the broker's shared groups.

Owns: the rules of those two requests (no members in the group; a queue's own group is
purged, not altered; a partition still held by someone is NON_EMPTY_GROUP).
Must not know: the wire format (share_handlers.py), files, real time.
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
    UnknownTopicError,
)

from .share_coordinator import SHARE_GROUPS_MAX
from .share_group_state import ShareGroup

if TYPE_CHECKING:
    from .share_coordinator import ShareCoordinator


async def delete_offsets(shares: ShareCoordinator, group_id: str, topic: str) -> None:
    """Forget the group's state on ``topic`` (DeleteShareGroupOffsets): next time it
    starts where share.auto.offset.reset says."""
    group = shares.groups.get(group_id)
    if group is not None and group.members:
        raise NonEmptyGroupError("share group has members", group=group_id)
    await shares.broker.delete_shared_group(topic, group_id)
    if group is not None:
        group.topics.discard(topic)

async def alter_offsets(shares: ShareCoordinator, group_id: str,
                        offsets: Sequence[tuple[str, int, int]]) -> list[OperatingError | None]:
    """AlterShareGroupOffsets: per (topic, partition, start offset), move the group's
    start there, forgetting the partition's record states (records from the offset
    on are delivered afresh). The group must have no members (NonEmptyGroupError);
    a group id never seen becomes an empty share group. One outcome per item."""
    if not group_id:
        raise InvalidRequestError("group id must not be empty")
    group = shares.groups.get(group_id)
    if group is not None and group.members:
        raise NonEmptyGroupError("share group has members", group=group_id)
    if group is None:
        if len(shares.groups) >= SHARE_GROUPS_MAX:
            raise GroupLimitError("too many share groups", limit=SHARE_GROUPS_MAX)
        group = shares.groups[group_id] = ShareGroup(group_id)
    outcome: list[OperatingError | None] = []
    for topic, partition, offset in offsets:
        try:
            if shares.broker.topics.find(topic) is None:
                raise UnknownTopicError("no such topic", topic=topic)
            if topic == group_id and shares.broker.queue_exists(topic):
                raise InvalidRequestError("a queue's own group: purge the queue instead",
                                          queue=topic)
            await shares.ensure_shared_group(group, topic)
            await shares.broker.reset_shared_partition(topic, group_id, partition, offset)
            outcome.append(None)
        except PreconditionFailedError as error:  # held by a departed member, or by
            # a consumer of another protocol on the same shared group
            outcome.append(NonEmptyGroupError(error.message, topic=topic,
                                              partition=partition))
        except OperatingError as error:
            outcome.append(error)
    return outcome
