"""``conveyor top`` and ``conveyor definitions`` against a live broker.

Goal: one frame of ``top`` shows the rates, the queues by depth and the groups by lag;
``definitions export`` then ``import`` into another broker recreates the queues,
exchanges and bindings; an import with a wrong entry changes nothing, exits 2 and names
the entry.
Method: BrokerThreads with the HTTP listener; ``top`` renders into a recording rich
Console (one frame, ``--once``); ``definitions`` runs through ``conveyor.cli.main``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from conveyor import cli_management
from conveyor.cli import main
from conveyor.testing.server import BrokerThread


@pytest.fixture()
def broker_url(tmp_path: Path) -> Iterator[str]:
    with BrokerThread(tmp_path / "source", listeners=("http",)) as server:
        yield f"http://127.0.0.1:{server.ports['http']}"


def test_top_renders_one_frame(broker_url: str) -> None:
    with httpx.Client(base_url=broker_url, timeout=10) as api:
        api.put("/api/queues/%2F/deep", json={"durable": True})
        api.put("/api/queues/%2F/shallow", json={"durable": True})
        for index in range(5):
            api.post("/api/exchanges/%2F/amq.default/publish", json={
                "routing_key": "deep", "payload": str(index), "payload_encoding": "string",
                "properties": {}})
        api.post("/topics", json={"name": "events", "partitions": 2})
        api.post("/topics/events/messages", json={"messages": [
            {"value": "e", "partition": p} for p in (0, 0, 1)]})
        api.post("/topics/events/groups/billing/offsets", json={"offsets": {"0": 1}})
    console = Console(record=True, width=140, color_system=None)
    arguments = argparse.Namespace(command="top", once=True, interval=1.0)
    assert cli_management.run(arguments, broker_url, console) == 0
    frame = console.export_text()
    assert "Conveyor" in frame and "publish" in frame and "ready 5" in frame
    lines = frame.splitlines()
    deep = next(line for line in lines if "│ deep" in line)
    shallow = next(line for line in lines if "│ shallow" in line)
    assert lines.index(deep) < lines.index(shallow)  # deepest first
    assert " 5 " in deep
    billing = next(line for line in lines if "billing" in line)
    assert "events" in billing and billing.rstrip(" │").endswith("2")  # lag 1 + 1


def test_definitions_export_import_round_trip(broker_url: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with httpx.Client(base_url=broker_url, timeout=10) as api:
        api.put("/api/queues/%2F/orders", json={"arguments": {"x-max-length": 10}})
        api.put("/api/exchanges/%2F/events", json={"type": "topic"})
        api.post("/api/bindings/%2F/e/events/q/orders", json={"routing_key": "order.#"})
    exported = tmp_path / "definitions.json"
    assert main(["--url", broker_url, "definitions", "export", "--file", str(exported)]) == 0
    document = json.loads(exported.read_text())
    assert [q["name"] for q in document["queues"]] == ["orders"]
    with BrokerThread(tmp_path / "target", listeners=("http",)) as target:
        target_url = f"http://127.0.0.1:{target.ports['http']}"
        assert main(["--url", target_url, "definitions", "import", str(exported)]) == 0
        assert "imported 0 topics, 1 exchanges, 1 queues, 1 bindings" in capsys.readouterr().out
        broken = tmp_path / "broken.json"
        broken.write_text(json.dumps({"queues": [
            {"name": "new-one", "vhost": "/", "arguments": {}},
            {"name": "bad", "vhost": "/", "arguments": {"x-max-priority": 1000}}]}))
        assert main(["--url", target_url, "definitions", "import", str(broken)]) == 2
        errors = capsys.readouterr().err
        assert "queues[1] 'bad'" in errors and "x-max-priority" in errors
        with httpx.Client(base_url=target_url, timeout=10) as api:
            assert api.get("/api/queues/%2F/orders").json()["arguments"] == {
                "x-max-length": 10, "x-overflow": "drop-head"}
            assert api.get("/api/queues/%2F/new-one").status_code == 404


def test_unreachable_broker_exits_5(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--url", "http://127.0.0.1:9", "top", "--once"]) == 5
    assert "cannot reach" in capsys.readouterr().err
