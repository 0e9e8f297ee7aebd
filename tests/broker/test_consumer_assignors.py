"""Goal: the KIP-848 server-side assignors give every partition of a subscribed topic to
exactly one subscribed member, balanced, and ``uniform`` keeps what it can.

Method: pure calls with hand-built subscriptions and a seeded random sweep (seed from
CONVEYOR_SEED, printed on failure) checking the invariants.
"""

from __future__ import annotations

import os
import random

import pytest

from conveyor.broker.consumer_assignors import range_, uniform

SEED = int(os.environ.get("CONVEYOR_SEED", "848"))


def owners(assignment: dict[str, dict[str, tuple[int, ...]]]) -> dict[tuple[str, int], str]:
    found: dict[tuple[str, int], str] = {}
    for member, topics in assignment.items():
        for topic, partitions in topics.items():
            for partition in partitions:
                assert (topic, partition) not in found, "a partition owned twice"
                found[(topic, partition)] = member
    return found


def test_range_gives_contiguous_ranges_in_member_order() -> None:
    members = {"b": frozenset({"t"}), "a": frozenset({"t"})}
    assert range_(members, {"t": 5}, {}) == {"a": {"t": (0, 1, 2)}, "b": {"t": (3, 4)}}


def test_uniform_is_sticky_when_a_member_joins() -> None:
    before = uniform({"a": frozenset({"t"})}, {"t": 4}, {})
    assert before == {"a": {"t": (0, 1, 2, 3)}}
    after = uniform({"a": frozenset({"t"}), "b": frozenset({"t"})}, {"t": 4}, before)
    assert len(after["a"]["t"]) == len(after["b"]["t"]) == 2
    assert set(after["a"]["t"]) <= set(before["a"]["t"])  # a only gives partitions up


def test_only_subscribers_get_a_topic() -> None:
    members = {"a": frozenset({"x"}), "b": frozenset({"y"}), "c": frozenset({"x", "y"})}
    for assign in (uniform, range_):
        result = owners(assign(members, {"x": 3, "y": 3}, {}))
        assert len(result) == 6
        assert all(result[("x", p)] in {"a", "c"} for p in range(3))
        assert all(result[("y", p)] in {"b", "c"} for p in range(3))


@pytest.mark.parametrize("round_", range(30))
def test_random_subscriptions_cover_every_partition_once(round_: int) -> None:
    rng = random.Random(SEED * 1000 + round_)
    topics = {f"t{index}": rng.randint(1, 8) for index in range(rng.randint(1, 4))}
    members = {f"m{index}": frozenset(rng.sample(sorted(topics), rng.randint(1, len(topics))))
               for index in range(rng.randint(1, 6))}
    previous = uniform(members, topics, {})
    dropped = dict(list(members.items())[:-1]) or members
    for assign in (uniform, range_):
        for subscriptions, current in ((members, {}), (dropped, previous)):
            result = owners(assign(subscriptions, topics, current))
            subscribed = {topic for topics_of in subscriptions.values() for topic in topics_of}
            expected = {(topic, p) for topic in subscribed for p in range(topics[topic])}
            assert set(result) == expected, f"CONVEYOR_SEED={SEED}"
            if assign is uniform and len(set(subscriptions.values())) == 1:
                # same subscriptions: uniform balances (range only per topic, as Kafka's)
                loads = [sum(len(parts) for parts in assigned.values())
                         for assigned in assign(subscriptions, topics, current).values()]
                assert max(loads) - min(loads) <= 1, f"CONVEYOR_SEED={SEED}"


def test_uniform_gives_a_third_member_its_share_of_four_partitions() -> None:
    """Sticky, but only up to the floor of a share plus the spare ones: with 4 partitions
    and two owners of 2 each, a third member gets 1 (2 + 1 + 1), not nothing."""
    current = {"a": {"t": (0, 1)}, "b": {"t": (2, 3)}}
    members = {name: frozenset({"t"}) for name in ("a", "b", "c")}
    after = uniform(members, {"t": 4}, current)
    assert sorted(len(after[name].get("t", ())) for name in members) == [1, 1, 2]
    assert set(after["a"].get("t", ())) <= {0, 1} and set(after["b"].get("t", ())) <= {2, 3}
    assert len(owners(after)) == 4
