"""The real ``conveyor`` command (a subprocess) against a server thread on a free port.

Goal: admin listings in tables and --json, publish from arguments, stdin lines and
files, consume in ordered and shared modes, DLQ listing and redrive, and the
documented exit codes (3 not found, 4 conflict, 5 unreachable, 2 bad request).
Method: run the installed console script (or ``python -m conveyor.cli``) with
CONVEYOR_URL pointing at a BrokerThread; check stdout, stderr and the exit code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor.cli import main
from conveyor.testing.server import BrokerProcess, BrokerThread, free_port

SCRIPT = Path(sys.executable).parent / "conveyor"
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "conveyor.cli"]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with BrokerThread(tmp_path_factory.mktemp("cli"), listeners=("http",)) as server:
        yield f"http://127.0.0.1:{server.ports['http']}"


def run(url: str, *arguments: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    environment = {**os.environ, "CONVEYOR_URL": url, "COLUMNS": "200"}
    return subprocess.run([*COMMAND, *arguments], input=stdin, capture_output=True,
                          env=environment, timeout=60, check=False)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_topics_create_list_describe_delete(url: str) -> None:
    topic = unique("orders")
    created = run(url, "topics", "create", topic, "--partitions", "3",
                  "--config", "retention.ms=3600000", "--json")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["partitions"] == 3

    table = run(url, "topics", "list")
    assert table.returncode == 0 and topic.encode() in table.stdout
    listed = json.loads(run(url, "topics", "list", "--json").stdout)
    assert topic in [t["name"] for t in listed]
    described = json.loads(run(url, "topics", "describe", topic, "--json").stdout)
    assert described["config"]["retention.ms"] == "3600000"

    assert run(url, "topics", "create", topic).returncode == 4  # conflict
    assert run(url, "topics", "delete", topic).returncode == 0
    missing = run(url, "topics", "describe", topic)
    assert missing.returncode == 3 and b"unknown_topic" in missing.stderr


def test_publish_arguments_stdin_and_files_then_consume_ordered(
    url: str, tmp_path: Path
) -> None:
    topic = unique("lines")
    assert run(url, "publish", topic, "one", "two").returncode == 0
    piped = run(url, "publish", topic, "--batch-size", "2", stdin=b"three\nfour\nfive\n")
    assert piped.returncode == 0 and b"published 3" in piped.stderr
    payload = tmp_path / "blob.bin"
    payload.write_bytes(b"six")
    assert run(url, "publish", topic, "--file", str(payload)).returncode == 0

    consumed = run(url, "consume", topic, "--from-beginning", "--wait-s", "0")
    assert consumed.returncode == 0, consumed.stderr
    assert consumed.stdout.split(b"\n")[:-1] == [b"one", b"two", b"three", b"four", b"five",
                                                 b"six"]
    as_json = run(url, "consume", topic, "--from-beginning", "--wait-s", "0", "--json",
                  "-n", "2")
    documents = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [(d["offset"], d["value"]) for d in documents] == [(0, "one"), (1, "two")]


def test_ordered_group_consume_commits_and_shows_lag(url: str) -> None:
    topic, group = unique("ledger"), unique("auditors")
    assert run(url, "publish", topic, "a", "b", "c").returncode == 0
    first = run(url, "consume", topic, "--group", group, "--mode", "ordered",
                "--wait-s", "0", "-n", "2")
    assert first.stdout.split() == [b"a", b"b"]
    lag = json.loads(run(url, "groups", "describe", group, "--json").stdout)
    assert lag["total_lag"] == 1
    rest = run(url, "consume", topic, "--group", group, "--mode", "ordered", "--wait-s", "0")
    assert rest.stdout.split() == [b"c"]


def test_groups_create_ordered_at_latest_skips_history(url: str) -> None:
    topic, group = unique("history"), unique("fresh")
    assert run(url, "publish", topic, "old").returncode == 0
    created = run(url, "groups", "create", group, "--topic", topic, "--kind", "ordered",
                  "--start", "latest", "--json")
    assert created.returncode == 0 and json.loads(created.stdout)["offsets"] == {"0": 1}
    assert run(url, "publish", topic, "new").returncode == 0
    consumed = run(url, "consume", topic, "--group", group, "--mode", "ordered",
                   "--wait-s", "0")
    assert consumed.stdout.split() == [b"new"]


def test_shared_consume_acks_and_dlq_redrive(url: str) -> None:
    queue = unique("jobs")
    assert run(url, "queues", "create", queue, "--max-deliveries", "1").returncode == 0
    assert run(url, "publish", queue, "job").returncode == 0
    peek = run(url, "consume", queue, "--group", queue, "--no-ack", "--wait-s", "0")
    assert peek.stdout.split() == [b"job"]  # released after one delivery: dead-lettered
    dead = json.loads(run(url, "dlq", "list", queue, "--json").stdout)
    assert [d["value"] for d in dead] == ["job"]
    assert run(url, "dlq", "redrive", queue).stdout.strip() == b"redrove 1 message(s)"
    taken = run(url, "consume", queue, "--group", queue, "--wait-s", "0")
    assert taken.stdout.split() == [b"job"]
    queues = json.loads(run(url, "queues", "list", "--json").stdout)
    assert [q["ready"] for q in queues if q["name"] == queue] == [0]


def test_exchanges_bind_and_describe(url: str) -> None:
    exchange, queue = unique("events"), unique("audit")
    assert run(url, "queues", "create", queue).returncode == 0
    assert run(url, "exchanges", "create", exchange, "--type", "fanout").returncode == 0
    assert run(url, "exchanges", "bind", exchange, queue).returncode == 0
    described = json.loads(run(url, "exchanges", "describe", exchange, "--json").stdout)
    assert [b["destination"] for b in described["bindings"]] == [queue]


def test_exit_codes_for_bad_input_and_unreachable_server(url: str) -> None:
    bad = run(url, "topics", "create", "bad name!")
    assert bad.returncode == 2 and b"invalid_name" in bad.stderr
    dead_url = f"http://127.0.0.1:{free_port()}"
    unreachable = run(dead_url, "topics", "list")
    assert unreachable.returncode == 5 and b"cannot reach" in unreachable.stderr


def test_usage_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as raised:
        main(["topics"])
    assert raised.value.code == 2


def test_conveyor_serve_child_serves_the_http_api(tmp_path: Path) -> None:
    """``conveyor serve`` (what ``make serve`` runs) exposes the HTTP listener."""
    with BrokerProcess(tmp_path / "data", listeners=("http",)) as broker:
        url = f"http://127.0.0.1:{broker.ports['http']}"
        assert run(url, "publish", "greetings", "hello").returncode == 0
        consumed = run(url, "consume", "greetings", "--group", "readers", "--wait-s", "0")
        assert consumed.returncode == 0 and consumed.stdout == b"hello\n"


def test_publish_many_lines_with_a_progress_bar(url: str) -> None:
    topic = unique("bulk")
    lines = b"".join(b"line-%d\n" % index for index in range(1500))
    published = run(url, "publish", topic, "--progress", "always", "--json", stdin=lines)
    assert published.returncode == 0, published.stderr
    assert json.loads(published.stdout)["published"] == 1500
    assert b"publishing to" in published.stderr and b"1500/" in published.stderr
    described = json.loads(run(url, "topics", "describe", topic, "--json").stdout)
    assert described["messages"] == 1500


def test_consume_follow_waits_for_new_messages(url: str) -> None:
    topic = unique("live")
    assert run(url, "topics", "create", topic).returncode == 0
    environment = {**os.environ, "CONVEYOR_URL": url}
    follower = subprocess.Popen(
        [*COMMAND, "consume", topic, "--follow", "-n", "1", "--wait-s", "0.2"],
        stdout=subprocess.PIPE, env=environment,
    )
    try:
        assert run(url, "publish", topic, "late").returncode == 0
        output, _ = follower.communicate(timeout=30)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == 0 and output == b"late\n"
