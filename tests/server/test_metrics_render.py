"""The exposition with reused lines equals the library's own rendering of the same state.

Goal: reusing a sample's formatted line from the last scrape never serves a stale value
or a malformed document, in both formats. Method: a broker in the test's loop; render,
change state (publish, create a topic), render again with the cache, then render with
an empty cache and with prometheus_client's generate functions over the same families,
and compare (the lines that move on their own — process, disk, timing — left out).
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client.exposition import choose_encoder

from conveyor.broker.types import Message
from conveyor.server.metrics import FamiliesCollector, Metrics
from conveyor.testing.server import run_broker

MOVING = (b"process_", b"disk_free", b"collect_seconds", b"loop_lag", b"fsync_seconds",
          b"group_commit")


def steady(text: bytes) -> list[bytes]:
    return [line for line in text.split(b"\n") if not any(word in line for word in MOVING)]


def library_rendering(metrics: Metrics, accept: str) -> bytes:
    encoder, _ = choose_encoder(accept)
    families = [*metrics.registry.collect(), *metrics.collector.collect()]
    return encoder(FamiliesCollector(families))


async def test_reused_lines_match_a_fresh_rendering(tmp_path: Path) -> None:
    async with run_broker(tmp_path, listeners=("http",)) as server:
        metrics = server.metrics
        await server.broker.declare_queue("jobs")
        for accept in ("", "application/openmetrics-text"):
            metrics.render(accept)
            await server.broker.publish("jobs", [Message(b"one"), Message(b"two")])
            await server.broker.create_topic(f"new-{len(accept)}", 2)
            cached, content_type = metrics.render(accept)
            assert b'conveyor_queue_messages_ready{queue="jobs"}' in cached
            assert steady(cached) == steady(library_rendering(metrics, accept))
            if accept:
                assert content_type.startswith("application/openmetrics-text")
                assert cached.endswith(b"# EOF\n") and cached.count(b"# EOF") == 1
