"""The queue side of the history checker (helpers.check_queue) on made-up histories:
each rule it enforces fails on a history that breaks it."""

from __future__ import annotations

import pytest

from tests.cluster.helpers import check_queue, tally_queue


def test_a_clean_history_with_a_redelivery_passes() -> None:
    # a1 held (not acked) at t=1, delivered again at t=5 and acked at t=6;
    # h2's publish got no answer but it was in the queue: fine too
    deliveries = [("a1", 1.0), ("h1", 1.0), ("a1", 5.0), ("h2", 5.0)]
    acked = {"h1": 2.0, "a1": 6.0, "h2": 6.0}
    found = check_queue(["a1", "h1"], ["h2"], deliveries, acked)
    assert (found["redelivered"], found["unknown_delivered"], found["lost"]) == (1, 1, 0)


@pytest.mark.parametrize(("published", "deliveries", "acked", "broken"), [
    (["a1", "a2"], [("a1", 1.0)], {"a1": 2.0}, "lost"),
    (["a1"], [("a1", 1.0), ("a1", 3.0)], {"a1": 2.0}, "redelivered_after_confirmed_ack"),
    (["a1"], [("a1", 1.0), ("x9", 1.0)], {"a1": 2.0, "x9": 2.0}, "never_published"),
    (["a1", "a2"], [("a1", 1.0), ("a2", 1.0)], {"a1": 2.0}, "never_acked"),
])
def test_each_rule_fails_on_a_history_that_breaks_it(
        published: list[str], deliveries: list[tuple[str, float]], acked: dict[str, float],
        broken: str) -> None:
    assert tally_queue(published, [], deliveries, acked)[broken] == 1
    with pytest.raises(AssertionError):
        check_queue(published, [], deliveries, acked)
