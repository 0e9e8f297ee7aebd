"""Client against a real server (BrokerThread, HTTP listener on a free port).

Goal: the issue's promises hold end to end — publish -> consume -> ack; release ->
redelivery; lock expiry -> redelivery; dead-lettering after max_deliveries and
redrive; replay from offset 0 and from a timestamp; request/response through a
reply queue; typed errors. Method: blocking ``Client`` calls; waits are server-side
long polls (an acquire wakes on the lock deadline), never sleeps.
"""

from __future__ import annotations

import threading
import uuid

import httpx
import pytest

from conveyor import Client
from conveyor.client import Message, encode_message
from conveyor.errors import (
    InvalidRequestError,
    LockExpiredError,
    TopicExistsError,
    UnknownDeliveryError,
    UnknownQueueError,
    UnknownTopicError,
)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_publish_consume_ack_is_not_redelivered(client: Client) -> None:
    topic = unique("emails")
    result = client.publish(topic, b'{"to": "ada@example.com"}', key="ada")
    assert result.offset == 0 and result.topic == topic

    received = list(client.consume(topic, group="mailers", wait_s=0.2))
    assert [m.value for m in received] == [b'{"to": "ada@example.com"}']
    assert received[0].key == b"ada" and received[0].delivery_count == 1
    assert received[0].json() == {"to": "ada@example.com"}
    received[0].ack()

    assert list(client.consume(topic, group="mailers", wait_s=0.2)) == []
    with pytest.raises(UnknownDeliveryError):
        received[0].ack()  # acked already: a clear 409, not a silent success


def test_release_redelivers_with_a_higher_delivery_count(client: Client) -> None:
    queue = unique("jobs")
    client.create_queue(queue)
    client.publish(queue, "job-1")
    first = client.acquire(queue, wait_s=1)
    assert [m.text for m in first] == ["job-1"]
    first[0].release()
    again = client.acquire(queue, wait_s=1)
    assert [m.text for m in again] == ["job-1"]
    assert again[0].delivery_count == 2
    again[0].ack()
    assert client.describe_queue(queue)["ready"] == 0


def test_an_acquire_carries_the_acks_of_the_last_batch(client: Client) -> None:
    """One request per cycle: ``acquire(ack=...)`` acknowledges first; a receipt that
    fails (a stale one, a tampered seal) is named with its typed error, and the new
    messages come either way."""
    queue = unique("cycle")
    client.create_queue(queue)
    client.publish_batch(queue, [encode_message(f"job-{i}") for i in range(4)])
    first = client.acquire(queue, limit=2)
    assert first.acked == 0 and first.ack_failures == []
    tampered = first[1].receipt[:-1] + ("0" if first[1].receipt[-1] != "0" else "1")
    second = client.acquire(queue, limit=2, ack=[first[0].receipt, tampered])
    assert [m.text for m in second] == ["job-2", "job-3"]
    assert second.acked == 1
    [failure] = second.ack_failures
    assert failure.receipt == tampered and isinstance(failure.error, UnknownDeliveryError)
    third = client.acquire(queue, limit=2, ack=[m.receipt for m in (first[1], *second)])
    assert third == [] and third.acked == 3 and third.ack_failures == []
    assert client.describe_queue(queue)["in_flight"] == 0
    with pytest.raises(UnknownDeliveryError):
        first[0].ack()  # acked by the acquire already


def test_lock_expiry_redelivers_and_the_stale_receipt_fails(client: Client) -> None:
    queue = unique("expiring")
    client.create_queue(queue)
    client.publish(queue, "slow")
    held = client.acquire(queue, lock_s=0.2)
    assert len(held) == 1
    # The long poll wakes when the lock deadline passes.
    redelivered = client.acquire(queue, wait_s=5)
    assert [m.text for m in redelivered] == ["slow"]
    assert redelivered[0].delivery_count == 2
    with pytest.raises((LockExpiredError, UnknownDeliveryError)):
        held[0].ack()
    redelivered[0].ack()


def test_extend_keeps_the_lock(client: Client) -> None:
    queue = unique("extend")
    client.create_queue(queue)
    client.publish(queue, "long job")
    [message] = client.acquire(queue, lock_s=1.0)
    message.extend(30)
    assert client.acquire(queue, wait_s=1.5) == []  # would have expired without extend
    message.ack()


def test_dead_letter_after_max_deliveries_then_redrive(client: Client) -> None:
    queue = unique("fragile")
    client.create_queue(queue, max_deliveries=2)
    client.publish(queue, "poison")
    for _ in range(2):
        [message] = client.acquire(queue, wait_s=1)
        message.release()
    assert client.acquire(queue) == []
    dead = client.dlq(queue)
    assert [m.value for m in dead] == [b"poison"]
    assert dead[0].headers["conveyor.dead-reason"] == b"max-deliveries"

    assert client.redrive(queue) == 1
    [back] = client.acquire(queue, wait_s=1)
    assert back.value == b"poison"
    back.ack()


def test_shared_group_on_a_topic_with_its_own_dead_letter_queue(client: Client) -> None:
    topic = unique("orders")
    client.create_topic(topic, partitions=2)
    client.create_group(topic, "billing", max_deliveries=1)
    client.publish(topic, "bad order")
    [message] = client.acquire(topic, "billing", wait_s=1)
    message.release()  # its only delivery: dead-lettered to billing.dlq
    assert [m.text for m in client.dlq(topic, "billing")] == ["bad order"]
    assert client.redrive(topic, "billing") == 1
    [again] = client.acquire(topic, "billing", wait_s=1)
    assert again.text == "bad order"
    again.ack()


def test_replay_from_offset_zero_and_from_a_timestamp(client: Client) -> None:
    topic = unique("events")
    client.create_topic(topic, partitions=1)
    base_ms = 1_700_000_000_000
    client.publish_batch(topic, [
        encode_message(f"event-{index}", timestamp_ms=base_ms + index * 1000)
        for index in range(5)
    ])
    everything = list(client.consume(topic, from_beginning=True, wait_s=0))
    assert [m.text for m in everything] == [f"event-{i}" for i in range(5)]
    assert [m.offset for m in everything] == list(range(5))

    from_third = list(client.consume(topic, from_timestamp_ms=base_ms + 2000, wait_s=0))
    assert [m.text for m in from_third] == ["event-2", "event-3", "event-4"]

    replay = client.fetch(topic, offsets={0: 0}, limit=2)
    assert [m.offset for m in replay.messages] == [0, 1]
    assert replay.next_offsets == {0: 2}


def test_ordered_group_commits_on_ack_and_resumes(client: Client) -> None:
    topic = unique("ledger")
    client.create_topic(topic, partitions=2)
    client.publish_batch(topic, [encode_message(str(i), key=str(i)) for i in range(6)])
    seen = []
    for message in client.consume(topic, group="auditors", mode="ordered", wait_s=0, limit=4):
        seen.append(message.text)
        message.ack()
        if len(seen) == 3:
            break
    rest = [m.text for m in client.consume(topic, group="auditors", mode="ordered", wait_s=0)]
    assert sorted(seen + rest) == [str(i) for i in range(6)]
    assert len(rest) == 3
    lag = client.describe_group("auditors")
    assert lag["total_lag"] == 3  # the second pass did not ack


def test_binary_values_and_headers_round_trip(client: Client) -> None:
    topic = unique("binary")
    payload = bytes(range(256))
    client.publish(topic, payload, key=b"\xff\x00", headers={"trace": "abc"})
    [message] = client.consume(topic, from_beginning=True, wait_s=0)
    assert message.value == payload and message.key == b"\xff\x00"
    assert message.headers["trace"] == b"abc"


def test_request_response_through_a_reply_queue(client: Client, server: object) -> None:
    topic = unique("rpc")
    client.create_queue(topic)
    url = client.url
    worker_done = threading.Event()

    def work() -> None:
        with Client(url) as worker:
            worker.serve_requests(topic, lambda m: (m.text or "").upper(), max_messages=1,
                                  wait_s=0.5)
        worker_done.set()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    response = client.call(topic, "hello", timeout_s=10)
    assert response.text == "HELLO"
    thread.join(timeout=10)
    assert worker_done.is_set()


class _AcquireSeen(httpx.HTTPTransport):
    """Sets ``answered`` once an acquire's response came back: the worker has looked."""

    def __init__(self) -> None:
        super().__init__()
        self.answered = threading.Event()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.url.path.endswith("/acquire"):
            self.answered.set()
        return response


def test_a_worker_started_before_any_caller_creates_its_request_queue(client: Client) -> None:
    """docs/http.md's request/response example, worker first: before the fix the
    worker's first acquire failed with UnknownTopicError. The caller starts only after
    the worker's first (empty) acquire has been answered."""
    topic = unique("rpc-first")
    transport = _AcquireSeen()
    handled: list[int] = []

    def work() -> None:
        with Client(client.url, transport=transport) as worker:
            handled.append(worker.serve_requests(topic, lambda m: (m.text or "")[::-1],
                                                 max_messages=1, wait_s=0.2))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    assert transport.answered.wait(timeout=10)
    assert client.describe_queue(topic)["name"] == topic
    assert client.call(topic, "olleh", timeout_s=10).text == "hello"
    thread.join(timeout=10)
    assert handled == [1]


def test_serve_requests_keeps_an_existing_queue_and_its_config(client: Client) -> None:
    topic = unique("rpc-configured")
    client.create_queue(topic, max_deliveries=3)
    with Client(client.url) as worker:
        assert worker.serve_requests(topic, lambda m: m.value, max_messages=1,
                                     wait_s=0, stop=_set_event()) == 0
    assert client.describe_queue(topic)["config"]["max_deliveries"] == 3


def _set_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


def test_an_empty_dead_letter_queue_reads_as_empty(client: Client) -> None:
    """A queue's DLQ is created by its first dead letter; until then it reads as an
    empty list and redrives nothing (docs/http.md). An unknown queue is still 404."""
    queue = unique("healthy")
    client.create_queue(queue, max_deliveries=5)
    assert client.dlq(queue) == []
    assert client.redrive(queue) == 0
    plain = unique("no-dead-letters")
    client.create_queue(plain)  # max_deliveries=0: dead-letters nowhere
    assert client.dlq(plain) == []
    topic = unique("ledger")
    client.create_topic(topic)
    client.create_group(topic, "auditors", max_deliveries=2)
    assert client.dlq(topic, "auditors") == []
    assert client.redrive(topic, "auditors") == 0
    with pytest.raises(UnknownQueueError):
        client.dlq(unique("missing"))


def test_typed_errors(client: Client) -> None:
    topic = unique("typed")
    client.create_topic(topic)
    with pytest.raises(TopicExistsError) as exists:
        client.create_topic(topic)
    assert exists.value.http_status == 409
    with pytest.raises(UnknownTopicError):
        client.describe_topic(unique("missing"))
    with pytest.raises(InvalidRequestError):
        client.create_topic(topic + "-bad", partitions=0)


def test_a_queue_is_consumed_through_its_own_shared_group_by_default(client: Client) -> None:
    queue = unique("inbox")
    client.create_queue(queue)
    client.publish(queue, "hello")
    [message] = client.consume(queue, wait_s=0)
    assert message.receipt is not None and message.group == queue
    message.ack()
    assert client.describe_queue(queue)["ready"] == 0


def test_stopping_early_releases_unseen_messages(client: Client) -> None:
    queue = unique("early")
    client.create_queue(queue)
    client.publish_batch(queue, ["a", "b", "c"])
    taken: list[Message] = []
    for message in client.consume(queue, group=queue, wait_s=0, limit=3):
        taken.append(message)
        break
    taken[0].ack()
    rest = client.acquire(queue, limit=10)
    assert sorted(m.text or "" for m in rest) == ["b", "c"]
