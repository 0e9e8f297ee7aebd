"""Goal: IdleExpiry returns exactly the keys idle for the whole period, keeps one heap
entry per key however often it is used, re-arms a used key from its last use, and
drops keys forgotten meanwhile.

Method: a dict of last-use times standing for the owner; ``due`` at chosen instants.
"""

from __future__ import annotations

from conveyor.broker.idle_expiry import IdleExpiry


def test_idle_keys_expire_used_ones_are_rearmed() -> None:
    last_used: dict[str, int] = {}
    expiry: IdleExpiry[str] = IdleExpiry(100)

    def use(key: str, now_ms: int) -> None:
        last_used[key] = now_ms
        expiry.arm(key, now_ms)

    use("a", 0)
    use("b", 0)
    use("gone", 0)
    for now_ms in range(10, 100, 10):
        use("b", now_ms)  # used often: still one entry
    assert len(expiry) == 3
    del last_used["gone"]
    assert expiry.due(99, last_used.get) == []
    assert expiry.due(100, last_used.get) == ["a"]  # b re-armed at 90 + 100, gone dropped
    assert len(expiry) == 1 and expiry.next_deadline_ms() == 190
    assert expiry.due(189, last_used.get) == []
    assert expiry.due(190, last_used.get) == ["b"]
    assert expiry.next_deadline_ms() is None
