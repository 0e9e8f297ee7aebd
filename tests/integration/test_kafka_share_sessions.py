"""Goal: share sessions are bounded and their epochs checked as KIP-932 says, a ShareFetch
over several topics long-polls all of them, and share.auto.offset.reset=by_duration
starts a share group at records at most that old.

Method: a raw asyncio client (kio-encoded ShareGroupHeartbeat, ShareFetch,
ShareAcknowledge, IncrementalAlterConfigs) against run_broker(); the session bound is
lowered on the running server's share coordinator module so that a few members reach
it; and a confluent-kafka ShareConsumer reading a topic whose records carry old and
recent timestamps (produced by a confluent-kafka Producer).
"""

from __future__ import annotations

import asyncio
import datetime
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer, ShareConsumer
from kio.schema.incremental_alter_configs.v1.request import (
    AlterableConfig,
    AlterConfigsResource,
    IncrementalAlterConfigsRequest,
)
from kio.schema.share_acknowledge.v1 import request as ack_v1
from kio.schema.share_fetch.v1 import request as fetch_v1

from conveyor.broker import share_coordinator
from conveyor.broker.types import Message
from conveyor.protocols.kafka import error_codes
from conveyor.protocols.kafka.admin_handlers import topic_id
from conveyor.server.app import Server
from conveyor.testing.server import BrokerThread, run_broker
from tests.integration.test_kafka_share_groups import set_group_configs
from tests.integration.test_kafka_share_wire import GROUP_RESOURCE, Client, heartbeat

WAIT_S = 30


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with run_broker(tmp_path / "data", listeners=("kafka",)) as running:
        await running.broker.create_topic("a", 1)
        await running.broker.create_topic("b", 2)
        yield running


@pytest.fixture
async def client(server: Server) -> AsyncIterator[Client]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.ports["kafka"])
    yield Client(reader, writer)
    writer.close()


def fetch(member: str, epoch: int, topics: dict[str, tuple[int, ...]],
          wait_ms: int = 0) -> Any:
    return fetch_v1.ShareFetchRequest(
        group_id="g", member_id=member, share_session_epoch=epoch,
        max_wait=datetime.timedelta(milliseconds=wait_ms), min_bytes=1, max_records=100,
        batch_size=100, forgotten_topics_data=(),
        topics=tuple(fetch_v1.FetchTopic(topic_id=topic_id(name), partitions=tuple(
            fetch_v1.FetchPartition(partition_index=index, acknowledgement_batches=())
            for index in indexes)) for name, indexes in topics.items()))


def acquired(answer: Any) -> dict[str, int]:
    names = {topic_id(name): name for name in ("a", "b")}
    counts: dict[str, int] = {}
    for response in answer.responses:
        for partition in response.partitions:
            for ranges in partition.acquired_records:
                counts[names[response.topic_id]] = counts.get(names[response.topic_id], 0) + (
                    ranges.last_offset - ranges.first_offset + 1)
    return counts


async def test_a_multi_topic_fetch_wakes_on_its_second_topic(server: Server,
                                                            client: Client) -> None:
    """The fetch names topics a and b; a record appended to b (not the first topic)
    answers it long before its max wait, and with nothing appended it waits out its
    max wait, no longer."""
    assert (await client.call(heartbeat("m1", 0, topics=("a", "b")))).member_epoch == 1
    opened = await client.call(fetch("m1", 0, {"a": (0,), "b": (0, 1)}))
    assert opened.error_code == error_codes.NONE and acquired(opened) == {}
    started = time.monotonic()
    idle = await client.call(fetch("m1", 1, {}, wait_ms=300))
    assert acquired(idle) == {} and time.monotonic() - started >= 0.25

    async def append_later() -> None:
        await asyncio.sleep(0.2)  # the fetch below must be parked when the record lands
        await server.broker.publish("b", [Message(value=b"late")], partition=1)

    started = time.monotonic()
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(append_later())
        woken = await client.call(fetch("m1", 2, {}, wait_ms=8_000))
    assert acquired(woken) == {"b": 1}
    assert time.monotonic() - started < 4  # woken by the append, not by the max wait


async def test_share_sessions_are_bounded(server: Server, client: Client,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the bound a new session is SHARE_SESSION_LIMIT_REACHED; a member reopening
    its own session is not a new one; closing one makes room."""
    monkeypatch.setattr(share_coordinator, "SESSIONS_MAX", 2)
    for member in ("m1", "m2", "m3"):
        assert (await client.call(heartbeat(member, 0, topics=("a",)))).error_code == 0
    assert (await client.call(fetch("m1", 0, {"a": (0,)}))).error_code == error_codes.NONE
    assert (await client.call(fetch("m2", 0, {"a": (0,)}))).error_code == error_codes.NONE
    full = await client.call(fetch("m3", 0, {"a": (0,)}))
    assert full.error_code == error_codes.SHARE_SESSION_LIMIT_REACHED
    assert (await client.call(fetch("m1", 0, {"a": (0,)}))).error_code == error_codes.NONE
    assert (await client.call(fetch("m1", -1, {}))).error_code == error_codes.NONE
    assert (await client.call(fetch("m3", 0, {"a": (0,)}))).error_code == error_codes.NONE
    # the epochs of the sessions still open are unaffected
    assert (await client.call(fetch("m2", 1, {}))).error_code == error_codes.NONE
    assert (await client.call(fetch("m2", 1, {}))).error_code == (
        error_codes.INVALID_SHARE_SESSION_EPOCH)


async def test_share_acknowledge_cannot_open_a_session(server: Server,
                                                       client: Client) -> None:
    assert (await client.call(heartbeat("m1", 0, topics=("a",)))).error_code == 0
    acknowledge = ack_v1.ShareAcknowledgeRequest(
        group_id="g", member_id="m1", share_session_epoch=0, topics=())
    answer = await client.call(acknowledge)
    assert answer.error_code == error_codes.INVALID_SHARE_SESSION_EPOCH
    closing = await client.call(ack_v1.ShareAcknowledgeRequest(
        group_id="g", member_id="m1", share_session_epoch=-1, topics=()))
    assert closing.error_code == error_codes.SHARE_SESSION_NOT_FOUND


@pytest.mark.parametrize("value", [
    "by_duration:", "by_duration:1H", "by_duration:PT", "by_duration:P", "by_duration:-PT1H",
    "by_duration:P1W", "by_duration:PT1H" + "0" * 80, "by_duration: PT1H", "by_time:PT1H"])
async def test_by_duration_garbage_is_invalid_config(client: Client, value: str) -> None:
    answer = await client.call(IncrementalAlterConfigsRequest(validate_only=False, resources=(
        AlterConfigsResource(resource_type=GROUP_RESOURCE, resource_name="g", configs=(
            AlterableConfig(name="share.auto.offset.reset", config_operation=0,
                            value=value),)),)))
    assert answer.responses[0].error_code == error_codes.INVALID_CONFIG


def test_by_duration_starts_at_records_at_most_that_old(tmp_path: Path) -> None:
    """Records stamped two hours and ten minutes ago; by_duration:PT1H gives the share
    consumer the recent ones only."""
    with BrokerThread(tmp_path / "data", listeners=("kafka",)) as running:
        bootstrap = f"127.0.0.1:{running.ports['kafka']}"
        topic, group = f"timed-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
        running.call(lambda: running.server.broker.create_topic(topic, 1))
        now_ms = int(time.time() * 1000)
        sender = Producer({"bootstrap.servers": bootstrap})
        for index, age_ms in enumerate([7_200_000] * 3 + [600_000] * 2):
            sender.produce(topic, value=b"v%d" % index, timestamp=now_ms - age_ms)
        assert sender.flush(WAIT_S) == 0
        set_group_configs(running, group, share_auto_offset_reset="by_duration:PT1H")
        share = ShareConsumer({"bootstrap.servers": bootstrap, "group.id": group})
        share.subscribe([topic])
        received: list[bytes] = []
        try:
            deadline = time.monotonic() + WAIT_S
            while len(received) < 2 and time.monotonic() < deadline:
                received += [message.value() for message in share.poll(0.5)]
            assert list(share.poll(1.0)) == []
        finally:
            share.close()
        assert sorted(received) == [b"v3", b"v4"]
