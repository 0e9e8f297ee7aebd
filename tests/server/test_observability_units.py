"""ListenerCounters, readiness checks and the metrics limits, without a server.

Goal: the bounds hold (request types and error codes past KINDS_MAX fold into
"other"; a connection closed is uncounted), readiness names what is wrong (an
unwritable data directory, a listener not listening, shutdown), and the limits read
from settings ignore values that are not non-negative integers.
Method: the objects directly, a temporary directory for the storage probe.
"""

from __future__ import annotations

from pathlib import Path

from conveyor.server.counters import KINDS_MAX, OTHER, ListenerCounters
from conveyor.server.health import readiness_checks
from conveyor.server.metrics import MetricsLimits


def test_request_types_and_error_codes_are_bounded() -> None:
    counters = ListenerCounters("sqs")
    for index in range(KINDS_MAX + 10):
        counters.request(f"Action{index}")
        counters.error(f"Code{index}", 2)
    counters.request("Action0", 5)
    assert len(counters.requests) == KINDS_MAX + 1
    assert counters.requests[OTHER] == 10
    assert counters.requests["Action0"] == 6
    assert counters.errors[OTHER] == 20


def test_connections_open_and_total() -> None:
    counters = ListenerCounters("kafka")
    counters.opened()
    counters.opened()
    counters.closed()
    assert (counters.connections_open, counters.connections_total) == (1, 2)


def test_ready_when_storage_writable_and_listeners_listening(tmp_path: Path) -> None:
    checks = readiness_checks(None, tmp_path, ["kafka", "http"], {"kafka", "http"}, False)
    assert checks["storage"] == "ok"
    assert checks["listeners"] == "ok"
    assert checks["broker"] == "stopping"  # no broker: not open


def test_not_ready_names_what_is_wrong(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    checks = readiness_checks(None, missing, ["kafka", "amqp", "http"], {"http"}, False)
    assert checks["storage"].startswith("data directory not writable")
    assert checks["listeners"] == "not listening: amqp, kafka"
    stopping = readiness_checks(None, tmp_path, ["http"], {"http"}, True)
    assert stopping["listeners"] == "stopping" and stopping["broker"] == "stopping"


def test_metrics_limits_from_settings() -> None:
    limits = MetricsLimits.from_settings({"queues_max": 5, "partitions_max": -1,
                                          "group_partitions_max": "many"})
    assert limits == MetricsLimits(queues_max=5)
