"""Ordered groups: the Kafka classic consumer-group coordinator as a state machine.

Owns: one group's membership, generations, rebalances, assignments relayed from
the leader, and committed offsets (``OrderedGroup``); the server-side assignors
(range, round-robin) for clients that do not assign partitions themselves.

Rules (every transition lives in ``TRANSITIONS``; this file does not know which
protocol asked and does no I/O; time comes in as ``now_ms`` and ``tick``
returns the next deadline):
- Empty --join--> PreparingRebalance --all joined or rebalance timeout-->
  CompletingRebalance --leader's sync--> Stable; a join with new metadata, a
  leave or an expired session in Stable/CompletingRebalance starts a rebalance.
  When the last member leaves, the group goes back to Empty. Delete: Empty -> Dead.
- Join with an empty member id on join v4+ (``require_known_member_id``) is
  answered ``MemberIdRequired(member_id)``; the member must rejoin with that id
  within its session timeout.
- Static members (group.instance.id) keep their member id across restarts and
  rejoins; a Stable static member rejoining with unchanged protocols gets the
  current generation without a rebalance.
- Protocol: the one every member supports that gets most first-choice votes.
  Leader: the current leader if it rejoined, else the first member to join.
- A join or sync waits on a future resolved when the rebalance step completes.
- Commits: generation -1 with an empty member id is a simple commit, allowed
  only while the group is Empty; otherwise the member must exist and the
  generation match; during CompletingRebalance commits are refused.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from conveyor.errors import (
    FencedInstanceIdError,
    IllegalGenerationError,
    IllegalStateError,
    InconsistentGroupProtocolError,
    NonEmptyGroupError,
    RebalanceInProgressError,
    UnknownMemberError,
)

SERVER_ASSIGNED_PROTOCOL_TYPE = "conveyor"  # protocol names: "range", "roundrobin"
NO_GENERATION = -1


class GroupState(enum.Enum):
    EMPTY = "Empty"
    PREPARING_REBALANCE = "PreparingRebalance"
    COMPLETING_REBALANCE = "CompletingRebalance"
    STABLE = "Stable"
    DEAD = "Dead"


class GroupEvent(enum.Enum):
    REBALANCE = "rebalance"  # a member joined, changed, left or expired
    JOIN_COMPLETE = "join_complete"  # every member rejoined, or the rebalance timed out
    JOIN_COMPLETE_EMPTY = "join_complete_empty"  # ... and no member is left
    SYNC_COMPLETE = "sync_complete"  # the leader's assignments arrived
    ALL_LEFT = "all_left"
    DELETE = "delete"
    ADOPT = "adopt"  # classic members handed back by a KIP-848 group (online downgrade)


_S = GroupState
_E = GroupEvent
TRANSITIONS: dict[tuple[GroupState, GroupEvent], GroupState] = {
    (_S.EMPTY, _E.REBALANCE): _S.PREPARING_REBALANCE,
    (_S.PREPARING_REBALANCE, _E.REBALANCE): _S.PREPARING_REBALANCE,
    (_S.COMPLETING_REBALANCE, _E.REBALANCE): _S.PREPARING_REBALANCE,
    (_S.STABLE, _E.REBALANCE): _S.PREPARING_REBALANCE,
    (_S.PREPARING_REBALANCE, _E.JOIN_COMPLETE): _S.COMPLETING_REBALANCE,
    (_S.PREPARING_REBALANCE, _E.JOIN_COMPLETE_EMPTY): _S.EMPTY,
    (_S.COMPLETING_REBALANCE, _E.SYNC_COMPLETE): _S.STABLE,
    # a server-assigned group skips the leader's sync
    (_S.PREPARING_REBALANCE, _E.SYNC_COMPLETE): _S.STABLE,
    (_S.PREPARING_REBALANCE, _E.ALL_LEFT): _S.EMPTY,
    (_S.COMPLETING_REBALANCE, _E.ALL_LEFT): _S.EMPTY,
    (_S.STABLE, _E.ALL_LEFT): _S.EMPTY,
    (_S.EMPTY, _E.ALL_LEFT): _S.EMPTY,
    (_S.EMPTY, _E.DELETE): _S.DEAD,
    (_S.EMPTY, _E.ADOPT): _S.STABLE,
}


# --- results ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MemberIdRequired:
    """Join v4+ with an empty member id: rejoin with this id."""

    member_id: str


@dataclass(frozen=True, slots=True)
class JoinedMember:
    member_id: str
    group_instance_id: str | None
    metadata: bytes


@dataclass(frozen=True, slots=True)
class JoinResult:
    generation: int
    protocol_type: str
    protocol_name: str
    leader_id: str
    member_id: str
    members: tuple[JoinedMember, ...]  # only for the leader, else ()
    # server-assigned groups: this member's assignment (JSON [[topic, partition], ...])
    assignment: bytes | None = None


@dataclass(frozen=True, slots=True)
class SyncResult:
    protocol_type: str
    protocol_name: str
    assignment: bytes


@dataclass(frozen=True, slots=True)
class CommittedOffset:
    offset: int
    metadata: str | None = None
    leader_epoch: int = -1
    commit_ms: int = 0


@dataclass(frozen=True, slots=True)
class MemberDescription:
    member_id: str
    group_instance_id: str | None
    client_id: str
    client_host: str
    metadata: bytes
    assignment: bytes


@dataclass(frozen=True, slots=True)
class GroupDescription:
    group_id: str
    state: GroupState
    protocol_type: str
    protocol_name: str
    generation: int
    leader_id: str
    members: tuple[MemberDescription, ...]


@dataclass(frozen=True, slots=True)
class GroupListing:
    group_id: str
    protocol_type: str
    state: GroupState


@dataclass(slots=True)
class Member:
    member_id: str
    group_instance_id: str | None
    client_id: str
    client_host: str
    protocols: tuple[tuple[str, bytes], ...]  # (name, metadata) in preference order
    session_timeout_ms: int
    rebalance_timeout_ms: int
    last_heartbeat_ms: int
    assignment: bytes = b""
    join_waiter: asyncio.Future[JoinResult] | None = None  # waiting in PreparingRebalance
    sync_waiter: asyncio.Future[SyncResult] | None = None  # waiting in CompletingRebalance

    def metadata_for(self, protocol_name: str) -> bytes:
        for name, metadata in self.protocols:
            if name == protocol_name:
                return metadata
        return b""


def _resolve(future: asyncio.Future[Any] | None, value: Any) -> None:
    if future is not None and not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any] | None, error: BaseException) -> None:
    if future is not None and not future.done():
        future.set_exception(error)


@dataclass(slots=True)
class OrderedGroup:
    """One consumer group. Mutated only through its methods."""

    group_id: str
    new_member_suffix: Callable[[], str]  # unique member-id suffixes (from the broker's rng)
    state: GroupState = GroupState.EMPTY
    generation: int = 0
    protocol_type: str = ""
    protocol_name: str = ""
    leader_id: str = ""
    # member id -> member, in join order (the first is the leader candidate)
    members: dict[str, Member] = field(default_factory=dict)
    # member id -> deadline_ms: ids handed out by MemberIdRequired, not yet rejoined
    pending_members: dict[str, int] = field(default_factory=dict)
    # group.instance.id -> member id (static membership; survives restarts)
    static_members: dict[str, str] = field(default_factory=dict)
    rebalance_deadline_ms: int | None = None
    # (topic, partition) -> committed offset
    offsets: dict[tuple[str, int], CommittedOffset] = field(default_factory=dict)

    # --- transitions ------------------------------------------------------------------
    def _apply(self, event: GroupEvent) -> None:
        target = TRANSITIONS.get((self.state, event))
        if target is None:
            raise IllegalStateError(
                "illegal group transition", group_id=self.group_id, state=self.state.value,
                event=event.value,
            )
        self.state = target

    def _new_member_id(self, client_id: str) -> str:
        return f"{client_id or 'member'}-{self.new_member_suffix()}"

    # --- join ---------------------------------------------------------------------------
    def join(
        self,
        now_ms: int,
        member_id: str,
        group_instance_id: str | None,
        protocol_type: str,
        protocols: Sequence[tuple[str, bytes]],
        session_timeout_ms: int,
        rebalance_timeout_ms: int,
        client_id: str = "",
        client_host: str = "",
        require_known_member_id: bool = True,
        assign: Any = None,
    ) -> JoinResult | MemberIdRequired | asyncio.Future[JoinResult]:
        if self.state is GroupState.DEAD:
            raise UnknownMemberError("group is dead", group_id=self.group_id)
        self._check_protocols(protocol_type, protocols)
        protocols = tuple((name, bytes(metadata)) for name, metadata in protocols)
        if not self.members:
            self.protocol_type = protocol_type
        if member_id == "" and group_instance_id is not None:
            member_id = self.static_members.get(group_instance_id, "")
            if member_id and member_id not in self.members:
                # known instance after a restart: keep its id, join as new
                return self._add_member(
                    now_ms, member_id, group_instance_id, client_id, client_host, protocols,
                    session_timeout_ms, rebalance_timeout_ms, assign,
                )
        if member_id == "":
            new_id = self._new_member_id(client_id)
            if group_instance_id is not None:
                self.static_members[group_instance_id] = new_id
            elif require_known_member_id:
                self.pending_members[new_id] = now_ms + session_timeout_ms
                return MemberIdRequired(new_id)
            return self._add_member(
                now_ms, new_id, group_instance_id, client_id, client_host, protocols,
                session_timeout_ms, rebalance_timeout_ms, assign,
            )
        if member_id in self.pending_members:
            del self.pending_members[member_id]
            return self._add_member(
                now_ms, member_id, group_instance_id, client_id, client_host, protocols,
                session_timeout_ms, rebalance_timeout_ms, assign,
            )
        if group_instance_id is not None and self.static_members.get(group_instance_id) not in (
            None, member_id
        ):
            raise FencedInstanceIdError(
                "group.instance.id belongs to another member", group_id=self.group_id,
                group_instance_id=group_instance_id,
            )
        member = self.members.get(member_id)
        if member is None:
            raise UnknownMemberError("unknown member", group_id=self.group_id, member_id=member_id)
        return self._rejoin(now_ms, member, protocols, session_timeout_ms, rebalance_timeout_ms,
                            assign)

    def _check_protocols(self, protocol_type: str, protocols: Sequence[tuple[str, bytes]]) -> None:
        if not protocol_type or not protocols:
            raise InconsistentGroupProtocolError(
                "join without protocol type or protocols", group_id=self.group_id
            )
        if not self.members:
            return
        if protocol_type != self.protocol_type:
            raise InconsistentGroupProtocolError(
                "protocol type differs from the group's", group_id=self.group_id,
                group_protocol_type=self.protocol_type, protocol_type=protocol_type,
            )
        names = {name for name, _ in protocols}
        shared = set.intersection(*({n for n, _ in m.protocols} for m in self.members.values()))
        if not names & shared:
            raise InconsistentGroupProtocolError(
                "no protocol in common with the group", group_id=self.group_id,
                protocols=sorted(names), group_protocols=sorted(shared),
            )

    def _add_member(
        self,
        now_ms: int,
        member_id: str,
        group_instance_id: str | None,
        client_id: str,
        client_host: str,
        protocols: tuple[tuple[str, bytes], ...],
        session_timeout_ms: int,
        rebalance_timeout_ms: int,
        assign: Any,
    ) -> asyncio.Future[JoinResult]:
        member = Member(
            member_id, group_instance_id, client_id, client_host, protocols,
            session_timeout_ms, rebalance_timeout_ms, now_ms,
        )
        self.members[member_id] = member
        waiter = self._wait_join(member)
        self._prepare_rebalance(now_ms)
        self._maybe_complete_join(now_ms, assign)
        return waiter

    def _rejoin(
        self,
        now_ms: int,
        member: Member,
        protocols: tuple[tuple[str, bytes], ...],
        session_timeout_ms: int,
        rebalance_timeout_ms: int,
        assign: Any,
    ) -> JoinResult | asyncio.Future[JoinResult]:
        member.last_heartbeat_ms = now_ms
        member.session_timeout_ms = session_timeout_ms
        member.rebalance_timeout_ms = rebalance_timeout_ms
        unchanged = member.protocols == protocols
        member.protocols = protocols
        if self.state is GroupState.PREPARING_REBALANCE:
            waiter = self._wait_join(member)
            self._maybe_complete_join(now_ms, assign)
            return waiter
        if unchanged and self.state is GroupState.COMPLETING_REBALANCE:
            return self._join_result(member)
        if unchanged and self.state is GroupState.STABLE and (
            member.member_id != self.leader_id or member.group_instance_id is not None
        ):
            return self._join_result(member)
        waiter = self._wait_join(member)
        self._prepare_rebalance(now_ms)
        self._maybe_complete_join(now_ms, assign)
        return waiter

    def _wait_join(self, member: Member) -> asyncio.Future[JoinResult]:
        _fail(member.join_waiter, RebalanceInProgressError("superseded by a newer join"))
        member.join_waiter = asyncio.get_running_loop().create_future()
        return member.join_waiter

    def _prepare_rebalance(self, now_ms: int) -> None:
        if self.state is not GroupState.PREPARING_REBALANCE:
            for member in self.members.values():
                _fail(member.sync_waiter, RebalanceInProgressError(
                    "group is rebalancing", group_id=self.group_id))
                member.sync_waiter = None
            self._apply(GroupEvent.REBALANCE)
        timeout_ms = max((m.rebalance_timeout_ms for m in self.members.values()), default=0)
        deadline_ms = now_ms + timeout_ms
        if self.rebalance_deadline_ms is None or self.rebalance_deadline_ms < now_ms:
            self.rebalance_deadline_ms = deadline_ms

    def _maybe_complete_join(self, now_ms: int, assign: Any, timed_out: bool = False) -> None:
        if self.state is not GroupState.PREPARING_REBALANCE:
            return
        waiting = all(m.join_waiter is not None for m in self.members.values())
        if not timed_out and (not waiting or self.pending_members):
            return
        for member_id in [m for m, member in self.members.items() if member.join_waiter is None]:
            del self.members[member_id]
        self.rebalance_deadline_ms = None
        self.generation += 1
        if not self.members:
            self.protocol_type = ""
            self.protocol_name = ""
            self.leader_id = ""
            self._apply(GroupEvent.JOIN_COMPLETE_EMPTY)
            return
        first = next(iter(self.members.values()))
        self.protocol_name = self._select_protocol()
        if self.leader_id not in self.members:
            self.leader_id = first.member_id
        for member in self.members.values():
            member.last_heartbeat_ms = now_ms
            member.assignment = b""
        if self.protocol_type == SERVER_ASSIGNED_PROTOCOL_TYPE and assign is not None:
            assignments = assign(self.protocol_name, {
                member_id: member.metadata_for(self.protocol_name)
                for member_id, member in self.members.items()
            })
            for member_id, member in self.members.items():
                member.assignment = assignments.get(member_id, b"[]")
            self._apply(GroupEvent.SYNC_COMPLETE)
        else:
            self._apply(GroupEvent.JOIN_COMPLETE)
            self.rebalance_deadline_ms = now_ms + max(
                m.rebalance_timeout_ms for m in self.members.values()
            )
        for member in self.members.values():
            waiter, member.join_waiter = member.join_waiter, None
            _resolve(waiter, self._join_result(member))

    def _select_protocol(self) -> str:
        members = list(self.members.values())
        shared = set.intersection(*({name for name, _ in m.protocols} for m in members))
        votes: dict[str, int] = {}
        for member in members:
            for name, _ in member.protocols:
                if name in shared:
                    votes[name] = votes.get(name, 0) + 1
                    break
        first_choices = [name for name, _ in members[0].protocols if name in shared]
        return max(first_choices, key=lambda name: votes.get(name, 0))

    def _join_result(self, member: Member) -> JoinResult:
        members: tuple[JoinedMember, ...] = ()
        if member.member_id == self.leader_id:
            members = tuple(
                JoinedMember(m.member_id, m.group_instance_id, m.metadata_for(self.protocol_name))
                for m in self.members.values()
            )
        server_assigned = self.protocol_type == SERVER_ASSIGNED_PROTOCOL_TYPE
        return JoinResult(
            generation=self.generation, protocol_type=self.protocol_type,
            protocol_name=self.protocol_name, leader_id=self.leader_id,
            member_id=member.member_id, members=members,
            assignment=member.assignment if server_assigned else None,
        )

    # --- sync, heartbeat, leave ------------------------------------------------------------
    def _member(self, member_id: str, generation: int | None = None) -> Member:
        member = self.members.get(member_id)
        if member is None:
            raise UnknownMemberError("unknown member", group_id=self.group_id, member_id=member_id)
        if generation is not None and generation != self.generation:
            raise IllegalGenerationError(
                "stale generation", group_id=self.group_id, member_id=member_id,
                generation=generation, current_generation=self.generation,
            )
        return member

    def sync(
        self, now_ms: int, member_id: str, generation: int, assignments: Mapping[str, bytes]
    ) -> SyncResult | asyncio.Future[SyncResult]:
        member = self._member(member_id, generation)
        member.last_heartbeat_ms = now_ms
        if self.state is GroupState.PREPARING_REBALANCE:
            raise RebalanceInProgressError("group is rebalancing", group_id=self.group_id)
        if self.state is GroupState.STABLE:
            return SyncResult(self.protocol_type, self.protocol_name, member.assignment)
        assert self.state is GroupState.COMPLETING_REBALANCE, self.state
        _fail(member.sync_waiter, RebalanceInProgressError("superseded by a newer sync"))
        member.sync_waiter = asyncio.get_running_loop().create_future()
        waiter = member.sync_waiter
        if member_id == self.leader_id:
            for target_id, target in self.members.items():
                target.assignment = bytes(assignments.get(target_id, b""))
            self._apply(GroupEvent.SYNC_COMPLETE)
            self.rebalance_deadline_ms = None
            for target in self.members.values():
                sync_waiter, target.sync_waiter = target.sync_waiter, None
                _resolve(sync_waiter, SyncResult(
                    self.protocol_type, self.protocol_name, target.assignment))
        return waiter

    def heartbeat(self, now_ms: int, member_id: str, generation: int) -> None:
        member = self._member(member_id)
        member.last_heartbeat_ms = now_ms
        # as Kafka: a rebalance is reported before a generation mismatch
        if self.state is GroupState.PREPARING_REBALANCE:
            raise RebalanceInProgressError("group is rebalancing", group_id=self.group_id)
        if generation != self.generation:
            raise IllegalGenerationError(
                "stale generation", group_id=self.group_id, member_id=member_id,
                generation=generation, current_generation=self.generation,
            )

    def leave(self, now_ms: int, member_id: str, assign: Any = None) -> None:
        if member_id in self.pending_members:
            del self.pending_members[member_id]
            self._maybe_complete_join(now_ms, assign)
            return
        member = self._member(member_id)
        self._remove(now_ms, member, UnknownMemberError("member left", member_id=member_id),
                     assign)

    def leave_instance(self, now_ms: int, group_instance_id: str, assign: Any = None) -> None:
        member_id = self.static_members.get(group_instance_id)
        if member_id is None or member_id not in self.members:
            raise UnknownMemberError(
                "unknown group.instance.id", group_id=self.group_id,
                group_instance_id=group_instance_id,
            )
        del self.static_members[group_instance_id]
        self.leave(now_ms, member_id, assign)

    def _remove(self, now_ms: int, member: Member, reason: BaseException, assign: Any) -> None:
        del self.members[member.member_id]
        _fail(member.join_waiter, reason)
        _fail(member.sync_waiter, reason)
        if not self.members and not self.pending_members:
            self.generation += 1 if self.state is not GroupState.EMPTY else 0
            self.protocol_type = ""
            self.protocol_name = ""
            self.leader_id = ""
            self.rebalance_deadline_ms = None
            self._apply(GroupEvent.ALL_LEFT)
            return
        if self.state is GroupState.PREPARING_REBALANCE:
            self._maybe_complete_join(now_ms, assign)
        else:
            self._prepare_rebalance(now_ms)
            self._maybe_complete_join(now_ms, assign)

    # --- time -------------------------------------------------------------------------------
    def tick(self, now_ms: int, assign: Any = None) -> int | None:
        """Expire sessions, pending ids and rebalance timeouts; return the next deadline."""
        for member_id, deadline_ms in list(self.pending_members.items()):
            if deadline_ms <= now_ms:
                del self.pending_members[member_id]
                self._maybe_complete_join(now_ms, assign)
        for member in list(self.members.values()):
            if member.member_id not in self.members:
                continue
            if member.join_waiter is not None:
                continue  # waiting for the rebalance; its timeout applies instead
            if member.last_heartbeat_ms + member.session_timeout_ms <= now_ms:
                self._remove(now_ms, member, UnknownMemberError(
                    "session expired", member_id=member.member_id), assign)
        if self.rebalance_deadline_ms is not None and self.rebalance_deadline_ms <= now_ms:
            if self.state is GroupState.PREPARING_REBALANCE:
                self._maybe_complete_join(now_ms, assign, timed_out=True)
            elif self.state is GroupState.COMPLETING_REBALANCE:
                # the leader never synced: members not waiting in sync are dropped
                for member in [m for m in self.members.values() if m.sync_waiter is None]:
                    self._remove(now_ms, member, UnknownMemberError(
                        "no sync before the rebalance timeout", member_id=member.member_id),
                        assign)
                if self.state is GroupState.COMPLETING_REBALANCE:
                    self.rebalance_deadline_ms = None
                    self._prepare_rebalance(now_ms)
        return self.next_deadline_ms()

    def next_deadline_ms(self) -> int | None:
        deadlines = list(self.pending_members.values())
        deadlines += [
            m.last_heartbeat_ms + m.session_timeout_ms
            for m in self.members.values() if m.join_waiter is None
        ]
        if self.rebalance_deadline_ms is not None:
            deadlines.append(self.rebalance_deadline_ms)
        return min(deadlines) if deadlines else None

    # --- online migration to and from KIP-848 groups -------------------------------------
    def release_members(self) -> tuple[int, str, list[Member]]:
        """Hand every member over (the group goes Empty, offsets stay)."""
        released = (self.generation, self.protocol_name, list(self.members.values()))
        for member in released[2]:
            rejoin = RebalanceInProgressError("group is now a consumer group",
                                              group_id=self.group_id)
            _fail(member.join_waiter, rejoin)
            _fail(member.sync_waiter, rejoin)
            member.join_waiter = member.sync_waiter = None
        self.members = {}
        self.pending_members = {}
        self.static_members = {}
        self.protocol_type = self.protocol_name = self.leader_id = ""
        self.rebalance_deadline_ms = None
        self._apply(GroupEvent.ALL_LEFT)
        return released

    def adopt_members(self, now_ms: int, generation: int, protocol_type: str,
                      members: Sequence[Member]) -> None:
        """Take these members in as if Stable at ``generation``, then rebalance."""
        if self.members or self.state is not GroupState.EMPTY:
            raise IllegalStateError("only an empty group adopts members", group_id=self.group_id)
        for member in members:
            member.last_heartbeat_ms = now_ms
            self.members[member.member_id] = member
            if member.group_instance_id is not None:
                self.static_members[member.group_instance_id] = member.member_id
        if not self.members:
            return
        self.generation = max(self.generation, generation)
        self.protocol_type = protocol_type
        shared = set.intersection(*({n for n, _ in m.protocols} for m in self.members.values()))
        first = next(iter(self.members.values()))
        self.protocol_name = (self._select_protocol() if shared
                              else first.protocols[0][0] if first.protocols else "")
        self.leader_id = first.member_id
        self._apply(GroupEvent.ADOPT)
        self._prepare_rebalance(now_ms)

    # --- offsets ----------------------------------------------------------------------------
    def check_commit(self, member_id: str, generation: int) -> None:
        """Raise unless a commit by (member, generation) is allowed now."""
        if generation < 0 and member_id == "":
            if self.members or self.state is not GroupState.EMPTY:
                raise UnknownMemberError(
                    "simple commit to a group with members", group_id=self.group_id
                )
            return
        self._member(member_id, generation)
        if self.state is GroupState.COMPLETING_REBALANCE:
            raise RebalanceInProgressError("group is rebalancing", group_id=self.group_id)

    def commit(self, offsets: Mapping[tuple[str, int], CommittedOffset]) -> None:
        self.offsets.update(offsets)

    def delete(self) -> None:
        if self.members or self.pending_members:
            raise NonEmptyGroupError("group has members", group_id=self.group_id)
        self._apply(GroupEvent.DELETE)

    def describe(self) -> GroupDescription:
        return GroupDescription(
            group_id=self.group_id, state=self.state, protocol_type=self.protocol_type,
            protocol_name=self.protocol_name, generation=self.generation,
            leader_id=self.leader_id,
            members=tuple(
                MemberDescription(
                    m.member_id, m.group_instance_id, m.client_id, m.client_host,
                    m.metadata_for(self.protocol_name), m.assignment,
                )
                for m in self.members.values()
            ),
        )

    # --- persistence --------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "protocol_type": self.protocol_type,
            "static_members": dict(self.static_members),
        }

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        self.generation = int(snapshot.get("generation", 0))
        self.static_members = {str(k): str(v) for k, v in snapshot.get("static_members", {})
                               .items()}


# --- server-side assignors ---------------------------------------------------------------------
def parse_subscription(metadata: bytes) -> list[str]:
    """Server-assigned groups: member metadata is comma-separated topic names (utf-8)."""
    return [name for name in metadata.decode().split(",") if name]


def encode_assignment(partitions: Iterable[tuple[str, int]]) -> bytes:
    return json.dumps([[topic, partition] for topic, partition in partitions]).encode()


def decode_assignment(assignment: bytes) -> list[tuple[str, int]]:
    if not assignment:
        return []
    return [(str(topic), int(partition)) for topic, partition in json.loads(assignment)]


def range_assign(
    subscriptions: Mapping[str, Sequence[str]], partition_counts: Mapping[str, int]
) -> dict[str, list[tuple[str, int]]]:
    """Kafka's range assignor: per topic, consecutive ranges to members sorted by id."""
    result: dict[str, list[tuple[str, int]]] = {member: [] for member in subscriptions}
    topics = sorted({topic for topics in subscriptions.values() for topic in topics})
    for topic in topics:
        count = partition_counts.get(topic, 0)
        members = sorted(m for m, topics in subscriptions.items() if topic in topics)
        if not members or count <= 0:
            continue
        share, extra = divmod(count, len(members))
        start = 0
        for index, member in enumerate(members):
            length = share + (1 if index < extra else 0)
            result[member].extend((topic, p) for p in range(start, start + length))
            start += length
    return result


def round_robin_assign(
    subscriptions: Mapping[str, Sequence[str]], partition_counts: Mapping[str, int]
) -> dict[str, list[tuple[str, int]]]:
    """Kafka's round-robin assignor: all partitions sorted, dealt to subscribed members."""
    result: dict[str, list[tuple[str, int]]] = {member: [] for member in subscriptions}
    members = sorted(subscriptions)
    if not members:
        return result
    cycle = itertools.cycle(members)
    topics = sorted({topic for topics in subscriptions.values() for topic in topics})
    for topic in topics:
        for partition in range(partition_counts.get(topic, 0)):
            for _ in range(len(members)):
                member = next(cycle)
                if topic in subscriptions[member]:
                    result[member].append((topic, partition))
                    break
    return result


ASSIGNORS = {"range": range_assign, "roundrobin": round_robin_assign}
