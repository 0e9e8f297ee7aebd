"""cluster/lag.py's arithmetic on rows as PostgreSQL returns them (the process-level
test is test_cluster_lag.py)."""

from __future__ import annotations

from conveyor.cluster.lag import group_lag


def test_group_lag_sums_partitions_and_counts_from_the_log_start() -> None:
    rows = [("g", "t", 0, 3, 10, 0),   # 7 behind
            ("g", "t", 1, 2, 10, 6),   # committed below the log start: 4 behind
            ("g", "t", 2, 12, 10, 0),  # past the head (a truncated log): not behind
            ("h", "t", 0, 10, 10, 0)]
    groups = group_lag(rows, {("group", "g"): 2})
    assert [(g["group"], g["owner"], g["lag"]) for g in groups] == [("g", 2, 11),
                                                                    ("h", None, 0)]
    assert [p["lag"] for p in groups[0]["partitions"]] == [7, 4, 0]
