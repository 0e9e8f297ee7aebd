"""Server-side assignors of KIP-848 consumer groups: ``uniform`` and ``range``. Pure.

An assignor maps members (with the topics each subscribes to), the partition count
of each topic and the current assignment to a target assignment. Both give every
partition of a subscribed topic to exactly one member subscribed to it.

- ``uniform`` (Kafka's default): balanced over all partitions a member may take,
  and sticky: a partition stays with its current owner while the owner stays
  under its share, so a rebalance moves as few partitions as it can.
- ``range``: per topic, the members subscribed to it, sorted by member id, take
  contiguous ranges; the first ones take one more when it does not divide.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Final

Assignment = dict[str, dict[str, tuple[int, ...]]]  # member -> topic -> partitions
Assignor = Callable[
    [Mapping[str, frozenset[str]], Mapping[str, int], Mapping[str, Mapping[str, tuple[int, ...]]]],
    Assignment,
]


def _subscribers(subscriptions: Mapping[str, frozenset[str]],
                 partitions: Mapping[str, int]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for member in sorted(subscriptions):
        for topic in subscriptions[member]:
            if partitions.get(topic, 0) > 0:
                found.setdefault(topic, []).append(member)
    return found


def _pack(chosen: Mapping[str, Mapping[str, list[int]]],
          members: Mapping[str, frozenset[str]]) -> Assignment:
    return {member: {topic: tuple(sorted(parts)) for topic, parts in chosen.get(member, {}).items()
                     if parts}
            for member in members}


def uniform(subscriptions: Mapping[str, frozenset[str]], partitions: Mapping[str, int],
            current: Mapping[str, Mapping[str, tuple[int, ...]]]) -> Assignment:
    subscribers = _subscribers(subscriptions, partitions)
    # each member's fair share of the partitions it may take
    share = {member: 0.0 for member in subscriptions}
    for topic, members in subscribers.items():
        for member in members:
            share[member] += partitions[topic] / len(members)
    # a member keeps up to the floor of its share; as many members as the floors leave
    # partitions over may keep one more (4 partitions, 3 members: 2 + 1 + 1, not 2 + 2 + 0)
    floor = {member: math.floor(value + 1e-9) for member, value in share.items()}
    ceiling = {member: math.ceil(value - 1e-9) for member, value in share.items()}
    spare = sum(partitions[topic] for topic in subscribers) - sum(floor.values())
    load = dict.fromkeys(subscriptions, 0)
    chosen: dict[str, dict[str, list[int]]] = {}
    owner: dict[tuple[str, int], str] = {}
    for extra in (False, True):  # keep what current owners may keep
        for member in sorted(current):
            if member not in subscriptions:
                continue
            for topic, owned in sorted(current[member].items()):
                if member not in subscribers.get(topic, ()):
                    continue
                for partition in owned:
                    key = (topic, partition)
                    if partition >= partitions[topic] or key in owner:
                        continue
                    if load[member] < floor[member]:
                        pass
                    elif extra and spare > 0 and load[member] < ceiling[member]:
                        spare -= 1
                    else:
                        continue
                    owner[key] = member
                    load[member] += 1
                    chosen.setdefault(member, {}).setdefault(topic, []).append(partition)
    for topic in sorted(subscribers):
        for partition in range(partitions[topic]):
            if (topic, partition) in owner:
                continue
            member = min(subscribers[topic], key=lambda name: (load[name], name))
            owner[(topic, partition)] = member
            load[member] += 1
            chosen.setdefault(member, {}).setdefault(topic, []).append(partition)
    return _pack(chosen, subscriptions)


def range_(subscriptions: Mapping[str, frozenset[str]], partitions: Mapping[str, int],
           current: Mapping[str, Mapping[str, tuple[int, ...]]]) -> Assignment:
    del current  # range is not sticky: the same members always get the same ranges
    chosen: dict[str, dict[str, list[int]]] = {}
    for topic, members in _subscribers(subscriptions, partitions).items():
        count = partitions[topic]
        base, extra = divmod(count, len(members))
        start = 0
        for index, member in enumerate(members):
            size = base + (1 if index < extra else 0)
            chosen.setdefault(member, {})[topic] = list(range(start, start + size))
            start += size
    return _pack(chosen, subscriptions)


ASSIGNORS: Final[dict[str, Assignor]] = {"uniform": uniform, "range": range_}
DEFAULT_ASSIGNOR: Final = "uniform"
