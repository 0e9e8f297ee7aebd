"""Definitions export and import (``GET/POST /api/definitions``) against a real server.

Goal: an export in RabbitMQ's format carries queues (with their arguments and full
config), exchanges, bindings and topics; importing it into an empty broker recreates
them; a file with a wrong entry imports nothing and names the entry; users and
permissions are accepted and ignored until a security model exists.
Method: two BrokerThreads (source and target) and httpx.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conveyor.testing.server import BrokerThread


@pytest.fixture()
def source(tmp_path: Path) -> Iterator[httpx.Client]:
    with BrokerThread(tmp_path / "source", listeners=("http",)) as server, \
            httpx.Client(base_url=f"http://127.0.0.1:{server.ports['http']}",
                         timeout=10) as client:
        yield client


@pytest.fixture()
def target(tmp_path: Path) -> Iterator[httpx.Client]:
    with BrokerThread(tmp_path / "target", listeners=("http",)) as server, \
            httpx.Client(base_url=f"http://127.0.0.1:{server.ports['http']}",
                         timeout=10) as client:
        yield client


def _populate(api: httpx.Client) -> None:
    assert api.put("/api/queues/%2F/orders", json={
        "durable": True, "arguments": {"x-max-length": 1000, "x-dead-letter-exchange": "dlx",
                                       "x-delivery-limit": 3}}).status_code == 201
    assert api.put("/api/queues/%2F/audit", json={"durable": True}).status_code == 201
    assert api.put("/api/exchanges/%2F/events", json={"type": "topic"}).status_code == 201
    assert api.put("/api/exchanges/%2F/dlx", json={"type": "fanout"}).status_code == 201
    assert api.post("/api/bindings/%2F/e/events/q/orders",
                    json={"routing_key": "order.#"}).status_code == 201
    assert api.post("/api/bindings/%2F/e/events/q/audit",
                    json={"routing_key": "#"}).status_code == 201
    assert api.post("/topics", json={"name": "clicks", "partitions": 3,
                                     "config": {"retention.ms": "3600000"}}).status_code == 201


def test_export_then_import_recreates_everything(source: httpx.Client,
                                                 target: httpx.Client) -> None:
    _populate(source)
    exported = source.get("/api/definitions").json()
    assert exported["users"] == [] and exported["permissions"] == []
    assert exported["vhosts"] == [{"name": "/"}]
    orders = next(q for q in exported["queues"] if q["name"] == "orders")
    assert orders["arguments"] == {"x-max-length": 1000, "x-overflow": "drop-head",
                                   "x-dead-letter-exchange": "dlx", "x-delivery-limit": 3}
    assert {e["name"] for e in exported["exchanges"]} == {"events", "dlx"}
    assert {(b["source"], b["destination"], b["routing_key"])
            for b in exported["bindings"]} == {("events", "orders", "order.#"),
                                               ("events", "audit", "#")}
    assert exported["topics"][0]["name"] == "clicks"
    assert exported["topics"][0]["partitions"] == 3
    imported = target.post("/api/definitions", json=exported)
    assert imported.status_code == 200, imported.text
    assert imported.json()["imported"] == {"topics": 1, "exchanges": 2, "queues": 2,
                                           "bindings": 2}
    again = target.get("/api/definitions").json()
    for section in ("queues", "exchanges", "bindings", "topics"):
        assert sorted(map(str, again[section])) == sorted(map(str, exported[section])), section
    # importing the same file twice changes nothing and is not an error
    assert target.post("/api/definitions", json=exported).json()["imported"]["queues"] == 0


def test_a_wrong_entry_imports_nothing_and_is_named(target: httpx.Client) -> None:
    document = {
        "users": [{"name": "admin", "password_hash": "x", "tags": "administrator"}],
        "permissions": [{"user": "admin", "vhost": "/", "configure": ".*"}],
        "exchanges": [{"name": "fresh", "vhost": "/", "type": "direct"}],
        "queues": [
            {"name": "fine", "vhost": "/", "durable": True, "arguments": {}},
            {"name": "broken", "vhost": "/", "durable": True,
             "arguments": {"x-message-ttl": "soon"}},
            {"name": "elsewhere", "vhost": "prod", "durable": True, "arguments": {}},
        ],
        "bindings": [{"source": "fresh", "vhost": "/", "destination": "missing",
                      "destination_type": "queue", "routing_key": "", "arguments": {}}],
    }
    response = target.post("/api/definitions", json=document)
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "bad_request"
    assert "queues[1]" in body["reason"] and "x-message-ttl" in body["reason"]
    assert [(e["entry"], e["name"]) for e in body["errors"]] == [
        ("queues[1]", "broken"), ("queues[2]", "elsewhere"), ("bindings[0]", "fresh -> missing")]
    assert target.get("/api/queues/%2F/fine").status_code == 404
    assert target.get("/api/exchanges/%2F/fresh").status_code == 404
    # the same file with its wrong entries removed: users and permissions are ignored
    document["queues"] = document["queues"][:1]
    document["bindings"][0]["destination"] = "fine"
    accepted = target.post("/api/definitions", json=document).json()
    assert accepted["ignored"] == {"users": 1, "permissions": 1}
    assert accepted["imported"]["queues"] == 1
    assert target.get("/api/queues/%2F/fine").status_code == 200


def test_not_a_definitions_document(target: httpx.Client) -> None:
    assert target.post("/api/definitions", json=[1, 2]).status_code == 400
    assert target.post("/api/definitions", json={"queues": "all"}).status_code == 400
