"""An ordered group's operations as the HTTP API asks them: commit, read the commits,
describe (state, members, lag), delete.

Owns: the seam (``GroupOperations``) through which the HTTP handlers reach an ordered
group, and its single-node form (``LocalGroups``: the broker's group coordinator on
this node). A cluster node routes the same four calls to the group's owner instead
(conveyor/cluster/remote_groups.py): claimed on demand on the owner, forwarded over
the internal channel from any other node, so every answer is the coordinator's.
Must not know: wire formats, which node owns what.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from conveyor.broker.types import PartitionLag

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker

__all__ = ["GroupOperations", "GroupSummary", "LocalGroups"]


@dataclass(frozen=True, slots=True)
class GroupSummary:
    """What ``GET /groups/<g>`` shows of an ordered group."""

    group: str
    state: str  # GroupState's value ("Empty", "Stable", ...; "Dead": unknown)
    members: int
    partitions: tuple[PartitionLag, ...]  # every partition of every topic it committed to


class GroupOperations(Protocol):
    async def commit(self, group: str, offsets: Mapping[tuple[str, int], int]) -> None:
        """A simple commit (no member, no generation) of these offsets."""
        ...

    async def committed(self, group: str, partitions: Sequence[tuple[str, int]]
                        ) -> dict[tuple[str, int], int]:
        """The committed offset of each of ``partitions`` that has one."""
        ...

    async def describe(self, group: str) -> GroupSummary:
        """UnknownGroupError when the group has no commits and no members."""
        ...

    async def delete(self, group: str) -> None:
        """Delete an Empty group and its offsets (UnknownGroupError, NonEmptyGroupError)."""
        ...


class LocalGroups:
    """``GroupOperations`` on this node's coordinator (one node; or the group's owner)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def commit(self, group: str, offsets: Mapping[tuple[str, int], int]) -> None:
        await self.broker.commit_offsets(group, offsets)

    async def committed(self, group: str, partitions: Sequence[tuple[str, int]]
                        ) -> dict[tuple[str, int], int]:
        found = self.broker.fetch_offsets(group, partitions)
        return {key: value.offset for key, value in found.items() if value is not None}

    async def describe(self, group: str) -> GroupSummary:
        lags = self.broker.group_lag(group)  # UnknownGroupError first
        description = self.broker.describe_group(group)
        return GroupSummary(group, description.state.value, len(description.members),
                            tuple(lags))

    async def delete(self, group: str) -> None:
        outcome = await self.broker.delete_groups([group])
        error = outcome.get(group)
        if error is not None:
            raise error
