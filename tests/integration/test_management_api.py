"""The RabbitMQ-compatible management API against a real server, with the request shapes
of KEDA's RabbitMQ scaler (HTTP mode) and of rabbitmqadmin-style scripts.

Goal: an autoscaler reads queue depth and publish rate where it expects them; scripts
declare, publish, get, purge and delete through RabbitMQ's routes; unknown vhosts and
queues answer RabbitMQ's 404 shape; live AMQP connections, channels and consumers are
listed with their protocol; rates come from the sampler.
Method: a BrokerThread with the HTTP and AMQP listeners; httpx for the API (Basic auth
as KEDA sends it), pika for a live AMQP consumer; the sampler is stepped by the test
(``sample()`` in the broker's loop) so rates do not depend on timing.
"""

from __future__ import annotations

import base64
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pika
import pytest

from conveyor.testing.server import BrokerThread

NOT_FOUND = {"error": "Object Not Found", "reason": "Not Found"}
AUTH = ("guest", "guest")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    with BrokerThread(tmp_path_factory.mktemp("management"), listeners=("http", "amqp", "kafka"),
                      settings={"http": {"stats_interval_ms": 3_600_000}}) as running:
        yield running


@pytest.fixture()
def api(server: BrokerThread) -> Iterator[httpx.Client]:
    base = f"http://127.0.0.1:{server.ports['http']}"
    with httpx.Client(base_url=base, auth=AUTH, timeout=10) as client:
        yield client


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def sample(server: BrokerThread) -> None:
    """One step of the rate sampler, in the broker's loop."""
    listener: Any = server.server.listener("http")
    server.call_sync(listener.management.sampler.sample)


def test_keda_http_mode_reads_depth_and_publish_rate(server: BrokerThread,
                                                     api: httpx.Client) -> None:
    queue = unique("jobs")
    assert api.put(f"/api/queues/%2F/{queue}", json={"durable": True}).status_code == 201
    sample(server)
    for index in range(7):
        published = api.post("/api/exchanges/%2F/amq.default/publish", json={
            "properties": {}, "routing_key": queue, "payload": f"job {index}",
            "payload_encoding": "string"})
        assert published.json() == {"routed": True}
    sample(server)
    # KEDA: GET {host}/api/queues/{vhost}/{queue} with the Basic header from the URL;
    # credentials are checked (docs/security.md): unknown ones are 401, guest (loopback) works
    url = f"http://127.0.0.1:{server.ports['http']}/api/queues/%2F/{queue}"
    wrong = base64.b64encode(b"user:secret").decode()
    refused = httpx.get(url, headers={"Authorization": f"Basic {wrong}"}, timeout=10)
    assert refused.status_code == 401
    token = base64.b64encode(b"guest:guest").decode()
    response = httpx.get(url, headers={"Authorization": f"Basic {token}"}, timeout=10)
    assert response.status_code == 200
    document = response.json()
    assert document["name"] == queue and document["vhost"] == "/"
    assert document["messages"] == 7 and document["messages_ready"] == 7
    assert document["messages_unacknowledged"] == 0
    assert document["message_stats"]["publish"] == 7
    assert document["message_stats"]["publish_details"]["rate"] > 0
    assert document["message_stats"]["deliver_get_details"]["rate"] == 0
    # KEDA with useRegex: a paged listing filtered by a regex on the name
    paged = api.get("/api/queues/%2F", params={
        "page": "1", "use_regex": "true", "pagination": "false",
        "name": f"^{queue}$", "page_size": "100"}).json()
    assert paged["filtered_count"] == 1 and paged["items"][0]["messages"] == 7
    assert paged["page_count"] == 1
    # older KEDA: no page parameter, a plain list filtered by the regex
    unpaged = api.get("/api/queues", params={
        "use_regex": "true", "pagination": "false", "name": f"^{queue}$"}).json()
    assert [item["name"] for item in unpaged] == [queue]


def test_unknown_vhost_and_queue_answer_rabbitmq_404(api: httpx.Client) -> None:
    for path in ("/api/queues/%2F/no-such-queue", "/api/queues/other/anything",
                 "/api/exchanges/%2F/no-such-exchange", "/api/queues/other",
                 "/api/bindings/%2F/e/no-such/q/nothing", "/api/vhosts/other",
                 "/api/connections/nobody", "/api/no-such-route"):
        response = api.get(path)
        assert response.status_code == 404, path
        assert response.json() == NOT_FOUND, path
    assert api.delete("/api/queues/%2F/no-such-queue").json() == NOT_FOUND
    assert api.post("/api/queues/%2F/no-such-queue/get",
                    json={"count": 1, "ackmode": "ack_requeue_true",
                          "encoding": "auto"}).status_code == 404
    # Conveyor's own extensions keep Conveyor's error shape
    extension = api.get("/api/conveyor/queues/no-such-queue/browse")
    assert extension.status_code == 404
    assert extension.json()["error"]["code"] == "unknown_queue"


def test_rabbitmqadmin_style_declare_publish_get_purge_delete(server: BrokerThread,
                                                               api: httpx.Client) -> None:
    queue, exchange = unique("work"), unique("events")
    arguments = {"x-max-length": 100, "x-message-ttl": 60_000}
    assert api.put(f"/api/queues/%2F/{queue}",
                   json={"durable": True, "arguments": arguments}).status_code == 201
    assert api.put(f"/api/queues/%2F/{queue}",
                   json={"durable": True, "arguments": arguments}).status_code == 204
    conflict = api.put(f"/api/queues/%2F/{queue}", json={"durable": True,
                                                          "arguments": {"x-max-length": 5}})
    assert conflict.status_code == 400 and "error" in conflict.json()
    assert api.put(f"/api/exchanges/%2F/{exchange}",
                   json={"type": "topic", "durable": "true"}).status_code == 201
    bound = api.post(f"/api/bindings/%2F/e/{exchange}/q/{queue}",
                     json={"routing_key": "order.*", "arguments": {}})
    assert bound.status_code == 201 and bound.headers["location"] == "order.*"
    for key, payload in (("order.created", "first"), ("order.paid", "second"),
                         ("invoice.sent", "nowhere")):
        routed = api.post(f"/api/exchanges/%2F/{exchange}/publish", json={
            "properties": {"headers": {"source": "test"}}, "routing_key": key,
            "payload": payload, "payload_encoding": "string"}).json()
        assert routed == {"routed": key.startswith("order.")}
    binary = api.post("/api/exchanges/%2F/amq.default/publish", json={
        "properties": {}, "routing_key": queue,
        "payload": base64.b64encode(b"\x00\xff\x10").decode(), "payload_encoding": "base64"})
    assert binary.json() == {"routed": True}
    # rabbitmqadmin list queues name messages
    listed = api.get("/api/queues", params={"columns": "name,messages"}).json()
    row = next(item for item in listed if item["name"] == queue)
    assert row == {"name": queue, "messages": 3}
    # get with ackmode ack_requeue_true: read, then back in the queue
    got = api.post(f"/api/queues/%2F/{queue}/get", json={
        "count": 5, "ackmode": "ack_requeue_true", "encoding": "auto", "truncate": 50000})
    assert got.status_code == 200
    messages = got.json()
    assert [m["payload"] for m in messages[:2]] == ["first", "second"]
    assert messages[0]["exchange"] == exchange and messages[0]["routing_key"] == "order.created"
    assert messages[0]["properties"]["headers"]["source"] == "test"
    assert messages[2]["payload_encoding"] == "base64"
    assert base64.b64decode(messages[2]["payload"]) == b"\x00\xff\x10"
    assert api.get(f"/api/queues/%2F/{queue}").json()["messages_ready"] == 3
    again = api.post(f"/api/queues/%2F/{queue}/get", json={
        "count": 1, "ackmode": "ack_requeue_true", "encoding": "auto"}).json()
    assert again[0]["redelivered"] is True
    # get with ack_requeue_false consumes
    taken = api.post(f"/api/queues/%2F/{queue}/get", json={
        "count": 1, "ackmode": "ack_requeue_false", "encoding": "auto"}).json()
    assert taken[0]["payload"] == "first" and taken[0]["message_count"] == 2
    # the pre-3.7 shape: "requeue" instead of "ackmode", flags as text
    old_style = api.post(f"/api/queues/%2F/{queue}/get", json={
        "count": 1, "requeue": "true", "encoding": "auto"}).json()
    assert old_style[0]["payload"] == "second"
    assert api.get(f"/api/queues/%2F/{queue}").json()["messages_ready"] == 2
    bindings = api.get(f"/api/queues/%2F/{queue}/bindings").json()
    assert {b["source"] for b in bindings} == {"", exchange}
    assert api.delete(f"/api/queues/%2F/{queue}/contents").status_code == 204
    assert api.get(f"/api/queues/%2F/{queue}").json()["messages"] == 0
    assert api.delete(f"/api/bindings/%2F/e/{exchange}/q/{queue}/order.*").status_code == 204
    assert api.get(f"/api/bindings/%2F/e/{exchange}/q/{queue}").json() == []
    assert api.delete(f"/api/queues/%2F/{queue}").status_code == 204
    assert api.get(f"/api/queues/%2F/{queue}").status_code == 404
    assert api.delete(f"/api/exchanges/%2F/{exchange}").status_code == 204


def test_bad_requests_answer_rabbitmq_errors(api: httpx.Client) -> None:
    queue = unique("bad")
    bad_argument = api.put(f"/api/queues/%2F/{queue}",
                           json={"arguments": {"x-max-length": "lots"}})
    assert bad_argument.status_code == 400
    assert bad_argument.json()["error"] == "bad_request"
    assert "x-max-length" in bad_argument.json()["reason"]
    not_json = api.put(f"/api/queues/%2F/{queue}", content=b"{nope",
                       headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["error"] == "bad_request"
    assert api.put(f"/api/exchanges/%2F/{queue}", json={"type": "nonsense"}).status_code == 400
    assert api.post("/api/overview").status_code == 405


def test_overview_connections_channels_consumers_with_protocol(server: BrokerThread,
                                                               api: httpx.Client) -> None:
    queue = unique("live")
    parameters = pika.ConnectionParameters(
        "127.0.0.1", server.ports["amqp"],
        client_properties={"connection_name": "<script>alert(1)</script>"})
    connection = pika.BlockingConnection(parameters)
    try:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True)
        channel.basic_qos(prefetch_count=10)
        channel.basic_consume(queue, lambda *args: None, consumer_tag="worker-1")
        connections = [c for c in api.get("/api/connections").json()
                       if c["protocol"] == "AMQP 0-9-1"]
        assert len(connections) == 1
        assert connections[0]["client_properties"]["connection_name"] == \
            "<script>alert(1)</script>"
        assert connections[0]["channels"] == 1 and connections[0]["vhost"] == "/"
        assert any(c["protocol"] == "HTTP" for c in api.get("/api/connections").json())
        channels = api.get("/api/channels").json()
        amqp_channel = next(c for c in channels if c["protocol"] == "AMQP 0-9-1")
        assert amqp_channel["consumer_count"] == 1 and amqp_channel["prefetch_count"] == 10
        consumers = api.get("/api/consumers").json()
        assert [(c["consumer_tag"], c["queue"]["name"]) for c in consumers] == [
            ("worker-1", queue)]
        assert api.get(f"/api/queues/%2F/{queue}").json()["consumers"] == 1
        overview = api.get("/api/overview").json()
        assert overview["object_totals"]["consumers"] == 1
        assert {listener["protocol"] for listener in overview["listeners"]} == {
            "http", "amqp", "kafka"}
        assert overview["product_name"] == "Conveyor"
    finally:
        connection.close()
    for _ in range(50):  # the server drops it when the socket closes, around our request
        remaining = [c for c in api.get("/api/connections").json()
                     if c["protocol"] == "AMQP 0-9-1"]
        if not remaining:
            break
    assert remaining == []


def test_deliver_rate_and_browse_without_consuming(server: BrokerThread,
                                                   api: httpx.Client) -> None:
    queue = unique("browse")
    api.put(f"/api/queues/%2F/{queue}", json={"durable": True})
    for index in range(4):
        api.post("/api/exchanges/%2F/amq.default/publish", json={
            "routing_key": queue, "payload": f"m{index}", "payload_encoding": "string",
            "properties": {}})
    sample(server)
    api.post(f"/api/queues/%2F/{queue}/get", json={"count": 1, "ackmode": "ack_requeue_false",
                                                  "encoding": "auto"})
    sample(server)
    stats = api.get(f"/api/queues/%2F/{queue}").json()["message_stats"]
    assert stats["deliver_get"] == 1 and stats["deliver_get_details"]["rate"] > 0
    browsed = api.get(f"/api/conveyor/queues/{queue}/browse").json()["messages"]
    assert [m["value"]["text"] for m in browsed] == ["m1", "m2", "m3"]
    assert {m["state"] for m in browsed} == {"available"}
    again = api.get(f"/api/conveyor/queues/{queue}/browse").json()["messages"]
    assert [m["value"]["text"] for m in again] == ["m1", "m2", "m3"]  # nothing consumed
    assert api.get(f"/api/queues/%2F/{queue}").json()["messages_ready"] == 3
    history = api.get("/api/conveyor/history").json()
    assert history["series"] and any(point["publish"] > 0 for point in history["series"])


def test_huge_and_binary_bodies_get_a_bounded_preview(api: httpx.Client) -> None:
    queue = unique("big")
    api.put(f"/api/queues/%2F/{queue}", json={"durable": True})
    huge = "x" * 200_000
    api.post("/api/exchanges/%2F/amq.default/publish", json={
        "routing_key": queue, "payload": huge, "payload_encoding": "string", "properties": {}})
    api.post("/api/exchanges/%2F/amq.default/publish", json={
        "routing_key": queue, "payload": base64.b64encode(bytes(range(256)) * 100).decode(),
        "payload_encoding": "base64", "properties": {}})
    response = api.get(f"/api/conveyor/queues/{queue}/browse")
    assert len(response.content) < 20_000
    text_message, binary_message = response.json()["messages"]
    assert text_message["value"]["bytes"] == 200_000 and text_message["value"]["truncated"]
    assert len(text_message["value"]["text"]) == 4096
    assert binary_message["value"]["binary"] and binary_message["value"]["text"] is None
    assert binary_message["value"]["hex"].startswith("00 01 02")


def test_ui_files_are_served_with_a_content_security_policy(api: httpx.Client) -> None:
    index = api.get("/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in index.headers["content-security-policy"]
    assert index.headers["x-content-type-options"] == "nosniff"
    assert '<script type="module" src="/ui/app.js">' in index.text
    for name, content_type in (("app.js", "text/javascript"), ("style.css", "text/css")):
        response = api.get(f"/ui/{name}")
        assert response.status_code == 200, name
        assert response.headers["content-type"].startswith(content_type)
    for path in ("/ui/../pyproject.toml", "/ui/%2e%2e/cli.py", "/ui/nothing.js"):
        assert api.get(path).status_code == 404, path
    assert api.post("/").status_code == 405
    assert api.get("/topics").status_code == 200  # the HTTP API is untouched beside the UI


def test_kafka_connections_are_listed_with_their_peer(server: BrokerThread,
                                                      api: httpx.Client) -> None:
    with socket.create_connection(("127.0.0.1", server.ports["kafka"])) as client:
        host, port = client.getsockname()[:2]
        kafka: list[dict[str, Any]] = []
        for _ in range(50):  # the broker's loop accepts it around our request: ask again
            kafka = [c for c in api.get("/api/connections").json() if c["protocol"] == "Kafka"]
            if kafka:
                break
        assert [(c["peer_host"], c["peer_port"]) for c in kafka] == [(host, port)]
        assert kafka[0]["port"] == server.ports["kafka"]


def test_kafka_group_members_assignments_and_lag(server: BrokerThread,
                                                 api: httpx.Client) -> None:
    from confluent_kafka import Consumer

    topic, group = unique("clicks"), unique("analytics")
    assert api.post("/topics", json={"name": topic, "partitions": 2}).status_code == 201
    api.post(f"/topics/{topic}/messages", json={"messages": [
        {"value": str(index), "partition": index % 2} for index in range(6)]})
    consumer = Consumer({
        "bootstrap.servers": f"127.0.0.1:{server.ports['kafka']}", "group.id": group,
        "client.id": "dashboard-test", "auto.offset.reset": "earliest",
        "enable.auto.commit": False, "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 300, "fetch.wait.max.ms": 100})
    try:
        consumer.subscribe([topic])
        taken = 0
        for _ in range(200):  # each poll waits for the broker, up to its timeout
            message = consumer.poll(0.2)
            if message is not None and message.error() is None:
                taken += 1
                if message.partition() == 0:
                    consumer.commit(message=message, asynchronous=False)
            if taken == 6:
                break
        assert taken == 6
        group_document = api.get(f"/api/conveyor/groups/{group}").json()
        assert group_document["state"] == "Stable"
        [member] = group_document["members"]
        assert member["client_id"] == "dashboard-test"
        assert member["assignment"] == [{"topic": topic, "partitions": [0, 1]}]
        lags = {p["partition"]: p["lag"] for p in group_document["partitions"]}
        assert lags == {0: 0, 1: 3}  # partition 0 committed as it went, 1 never
        listed = api.get("/api/conveyor/groups").json()["groups"]
        assert any(g["group"] == group and g["members"] == 1 for g in listed)
    finally:
        consumer.close()


HOSTILE_BODIES: list[Any] = [None, [], "text", 7, {"arguments": [1, 2]}, {"arguments": "x"},
                             {"type": ["direct"]}, {"routing_key": 5}, {"payload": {"a": 1}},
                             {"payload": "AA==", "payload_encoding": "base64x"},
                             {"properties": []}, {"properties": {"headers": [1]}},
                             {"properties": {"priority": "high"}}, {"count": -1},
                             {"count": 10**9}, {"ackmode": "maybe"}, {"truncate": "all"},
                             {"queues": [{"name": 1}]}, {"topics": [{"name": "t", "config": {
                                 "retention.ms": [1]}}]}, {"exchanges": [None]},
                             {"bindings": [{"source": "x"}]}, {"vhosts": [{"name": 5}]}]


def test_hostile_bodies_get_a_4xx_never_a_500(api: httpx.Client) -> None:
    queue = unique("hostile")
    api.put(f"/api/queues/%2F/{queue}", json={"durable": True})
    api.put("/api/exchanges/%2F/hostile-x", json={"type": "direct"})
    targets = [("PUT", f"/api/queues/%2F/{unique('q')}"), ("PUT", "/api/exchanges/%2F/h-x"),
               ("POST", "/api/exchanges/%2F/hostile-x/publish"),
               ("POST", f"/api/queues/%2F/{queue}/get"),
               ("POST", f"/api/bindings/%2F/e/hostile-x/q/{queue}"),
               ("POST", "/api/definitions")]
    for method, path in targets:
        for body in HOSTILE_BODIES:
            response = api.request(method, path, json=body)
            assert response.status_code < 500, (method, path, body, response.text)
            assert response.status_code in (200, 201, 204) or "error" in response.json()
    assert api.get(f"/api/queues/%2F/{queue}").json()["messages"] == 0
