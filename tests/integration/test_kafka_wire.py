"""Goal: the Kafka listener survives bad input and answers it in the protocol's own terms.

Method: raw TCP clients against one broker (run_broker, per test: cheap), frames
written with kio's writer and hand-made bytes; record batches built with the
storage codec. Checks: corrupt batches answer CORRUPT_MESSAGE and append
nothing, oversized frames and garbage close only their own connection,
unsupported versions are answered or closed, idempotent retries append once,
pipelined requests are answered in order, SASL/PLAIN gates a connection.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kio.schema.api_versions.v3.request import ApiVersionsRequest
from kio.schema.metadata.v12.request import MetadataRequest, MetadataRequestTopic
from kio.schema.produce.v9.request import PartitionProduceData, ProduceRequest, TopicProduceData
from kio.schema.sasl_authenticate.v2.request import SaslAuthenticateRequest
from kio.schema.sasl_handshake.v1.request import SaslHandshakeRequest
from kio.serial import entity_reader, entity_writer

from conveyor.protocols.kafka.framing import is_flexible
from conveyor.protocols.kafka.messages import response_class
from conveyor.server.app import Server
from conveyor.storage.record_batch import RecordData, build_batch
from conveyor.testing.server import run_broker

TIMEOUT_S = 10


def request_frame(entity: Any, correlation_id: int) -> bytes:
    api_key, version = int(entity.__api_key__), int(entity.__version__)
    header = struct.pack(">hhih", api_key, version, correlation_id, 4) + b"test"
    if is_flexible(api_key, version):
        header += b"\x00"
    buffer = io.BytesIO()
    entity_writer(type(entity))(buffer, entity)
    payload = header + buffer.getvalue()
    return struct.pack(">i", len(payload)) + payload


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_frame(self) -> bytes:
        size = struct.unpack(">i", await asyncio.wait_for(self.reader.readexactly(4), TIMEOUT_S))[0]
        return await asyncio.wait_for(self.reader.readexactly(size), TIMEOUT_S)

    async def call(self, entity: Any, correlation_id: int = 1) -> Any:
        await self.send(request_frame(entity, correlation_id))
        return parse(await self.read_frame(), entity)

    async def closed_by_peer(self) -> bool:
        try:
            data = await asyncio.wait_for(self.reader.read(1 << 16), TIMEOUT_S)
        except ConnectionResetError:
            return True
        return data == b""

    def close(self) -> None:
        self.writer.close()


def parse(payload: bytes, entity: Any) -> Any:
    api_key, version = int(entity.__api_key__), int(entity.__version__)
    position = 4 + (1 if is_flexible(api_key, version) and api_key != 18 else 0)
    result, _ = entity_reader(response_class(api_key, version))(payload[position:], 0)
    return result


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with run_broker(tmp_path / "data", listeners=("kafka",)) as running:
        yield running


async def connect(server: Server) -> RawClient:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.ports["kafka"])
    return RawClient(reader, writer)


def produce(topic: str, batch: bytes, acks: int = -1) -> ProduceRequest:
    return ProduceRequest(
        transactional_id=None, acks=acks, timeout=datetime.timedelta(seconds=5),
        topic_data=(TopicProduceData(name=topic, partition_data=(
            PartitionProduceData(index=0, records=batch),)),),
    )


def batch_of(count: int, **options: Any) -> bytes:
    return build_batch([RecordData(b"k%d" % i, b"v%d" % i, (), 1000 + i) for i in range(count)],
                       **options)


def partition_result(response: Any) -> Any:
    return response.responses[0].partition_responses[0]


async def test_api_versions_then_metadata(server: Server) -> None:
    client = await connect(server)
    versions = await client.call(ApiVersionsRequest(
        client_software_name="raw", client_software_version="1"))
    advertised = {entry.api_key: (entry.min_version, entry.max_version)
                  for entry in versions.api_keys}
    assert advertised[0] == (3, 12) and advertised[1] == (4, 12)
    metadata = await client.call(MetadataRequest(
        topics=(MetadataRequestTopic(topic_id=None, name="wire-meta"),),
        allow_auto_topic_creation=True, include_topic_authorized_operations=False))
    assert metadata.topics[0].name == "wire-meta" and metadata.topics[0].error_code == 0
    assert metadata.brokers[0].port == server.ports["kafka"]
    client.close()


async def test_corrupt_batch_answers_corrupt_message_and_appends_nothing(server: Server) -> None:
    await server.broker.create_topic("wire-crc", 1)
    client = await connect(server)
    good = bytearray(batch_of(3))
    good[-1] ^= 0xFF  # payload flipped: CRC mismatch
    response = await client.call(produce("wire-crc", bytes(good)))
    assert partition_result(response).error_code == 2  # CORRUPT_MESSAGE
    truncated = batch_of(3)[:-5]  # batch_length promises more than is there
    response = await client.call(produce("wire-crc", truncated), 2)
    assert partition_result(response).error_code == 2
    assert server.broker.offsets("wire-crc", 0).high_watermark == 0
    response = await client.call(produce("wire-crc", batch_of(3)), 3)
    assert partition_result(response).error_code == 0
    assert server.broker.offsets("wire-crc", 0).high_watermark == 3
    client.close()


async def test_idempotent_retry_appends_once(server: Server) -> None:
    await server.broker.create_topic("wire-idem", 1)
    producer_id, epoch = await server.broker.init_producer_id()
    client = await connect(server)
    batch = batch_of(4, producer_id=producer_id, producer_epoch=epoch, base_sequence=0)
    first = partition_result(await client.call(produce("wire-idem", batch)))
    retry = partition_result(await client.call(produce("wire-idem", batch), 2))
    assert first.error_code == retry.error_code == 0
    assert retry.base_offset == first.base_offset == 0
    assert server.broker.offsets("wire-idem", 0).high_watermark == 4
    gap = batch_of(1, producer_id=producer_id, producer_epoch=epoch, base_sequence=9)
    assert partition_result(await client.call(produce("wire-idem", gap), 3)).error_code == 45
    client.close()


async def test_pipelined_requests_answered_in_order_and_acks_zero_silent(server: Server) -> None:
    await server.broker.create_topic("wire-order", 1)
    client = await connect(server)
    frames = b"".join(
        request_frame(produce("wire-order", batch_of(1), acks=0 if index == 2 else 1), index)
        for index in range(6)
    )
    await client.send(frames)
    seen = [struct.unpack(">i", (await client.read_frame())[:4])[0] for _ in range(5)]
    assert seen == [0, 1, 3, 4, 5]
    assert server.broker.offsets("wire-order", 0).high_watermark == 6
    client.close()


async def test_bad_frames_close_only_their_connection(server: Server) -> None:
    healthy = await connect(server)
    cases = [
        struct.pack(">i", 200 * 1024 * 1024),  # above frame_bytes_max
        struct.pack(">i", 3) + b"abc",  # smaller than a header
        struct.pack(">ihhih", 12, 3, 1, 1, 40) + b"ab",  # client_id longer than the frame
        struct.pack(">ihhih", 10, 3, 12, 1, -1) + b"\x00\x99",  # metadata body cut short
        struct.pack(">ihhih", 8, 999, 0, 1, -1),  # unknown api key
        struct.pack(">ihhih", 8, 0, 99, 1, -1),  # produce v99
    ]
    for data in cases:
        client = await connect(server)
        await client.send(data)
        assert await client.closed_by_peer(), data
        client.close()
    versions = await healthy.call(ApiVersionsRequest(
        client_software_name="raw", client_software_version="1"))
    assert versions.error_code == 0
    healthy.close()


async def test_truncated_frame_then_rest_is_served(server: Server) -> None:
    client = await connect(server)
    frame = request_frame(ApiVersionsRequest(client_software_name="x",
                                             client_software_version="1"), 7)
    for index in range(len(frame)):
        client.writer.write(frame[index : index + 1])
        await client.writer.drain()
    payload = await client.read_frame()
    assert struct.unpack(">i", payload[:4])[0] == 7
    client.close()


async def test_unknown_api_versions_version_answered_v0(server: Server) -> None:
    client = await connect(server)
    await client.send(struct.pack(">ihhih", 11, 18, 77, 5, -1) + b"\x00")
    payload = await client.read_frame()
    correlation_id, error_code = struct.unpack(">ih", payload[:6])
    assert (correlation_id, error_code) == (5, 35)  # UNSUPPORTED_VERSION
    client.close()


async def test_oversized_batch_is_message_too_large(server: Server) -> None:
    await server.broker.create_topic("wire-big", 1, {"max.message.bytes": "1024"})
    client = await connect(server)
    big = build_batch([RecordData(None, b"x" * 4096, (), 1)])
    assert partition_result(await client.call(produce("wire-big", big))).error_code == 10
    assert server.broker.offsets("wire-big", 0).high_watermark == 0
    client.close()


async def test_client_that_stops_reading_does_not_block_others(server: Server) -> None:
    await server.broker.create_topic("wire-slow", 1)
    await server.broker.append_batch("wire-slow", 0, build_batch(
        [RecordData(None, b"x" * 100_000, (), 1)]))
    from kio.schema.fetch.v11.request import FetchPartition, FetchRequest, FetchTopic
    fetch = FetchRequest(
        replica_id=-1, max_wait=datetime.timedelta(0), min_bytes=0, max_bytes=1 << 20,
        isolation_level=0, session_id=0, session_epoch=-1, topics=(FetchTopic(
            topic="wire-slow", partitions=(FetchPartition(
                partition=0, current_leader_epoch=-1, fetch_offset=0, log_start_offset=-1,
                partition_max_bytes=1 << 20),)),),
        forgotten_topics_data=(), rack_id="")
    stuck = await connect(server)
    stuck.writer.transport.pause_reading()  # type: ignore[attr-defined]
    for index in range(300):  # ~30 MB of answers nobody reads
        stuck.writer.write(request_frame(fetch, index))
    other = await connect(server)
    versions = await other.call(ApiVersionsRequest(
        client_software_name="raw", client_software_version="1"))
    assert versions.error_code == 0
    other.close()
    stuck.close()


@pytest.mark.parametrize(("password", "accepted"), [("secret", True), ("wrong", False)])
async def test_sasl_plain(tmp_path: Path, password: str, accepted: bool) -> None:
    settings = {"kafka": {"sasl_users": {"alice": "secret"}}}
    async with run_broker(tmp_path / "data", listeners=("kafka",), settings=settings) as server:
        early = await connect(server)
        await early.send(request_frame(MetadataRequest(
            topics=None, allow_auto_topic_creation=False,
            include_topic_authorized_operations=False), 1))
        assert await early.closed_by_peer()  # nothing before authentication
        early.close()
        client = await connect(server)
        handshake = await client.call(SaslHandshakeRequest(mechanism="PLAIN"))
        assert handshake.error_code == 0
        assert handshake.mechanisms == ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
        token = b"\x00alice\x00" + password.encode()
        answer = await client.call(SaslAuthenticateRequest(auth_bytes=token), 2)
        if accepted:
            assert answer.error_code == 0
            metadata = await client.call(MetadataRequest(
                topics=None, allow_auto_topic_creation=False,
                include_topic_authorized_operations=False), 3)
            assert metadata.brokers[0].node_id == 0
        else:
            assert answer.error_code == 58  # SASL_AUTHENTICATION_FAILED
            assert await client.closed_by_peer()
        client.close()


@pytest.mark.file_storage
async def test_fetch_sends_records_with_sendfile(server: Server,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from kio.schema.fetch.v12.request import FetchPartition, FetchRequest, FetchTopic

    import conveyor.protocols.kafka.adapter as adapter_module

    sent: list[int] = []
    real_sendfile = os.sendfile

    def counting_sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        result = real_sendfile(out_fd, in_fd, offset, count)
        sent.append(result)
        return result

    monkeypatch.setattr(adapter_module.os, "sendfile", counting_sendfile)
    await server.broker.create_topic("wire-sendfile", 1)
    batch = batch_of(5)
    await server.broker.append_batch("wire-sendfile", 0, batch)
    client = await connect(server)
    fetch = FetchRequest(
        replica_id=-1, max_wait=datetime.timedelta(milliseconds=50), min_bytes=1,
        max_bytes=1 << 20, isolation_level=0, session_id=0, session_epoch=-1,
        topics=(FetchTopic(topic="wire-sendfile", partitions=(FetchPartition(
            partition=0, current_leader_epoch=-1, fetch_offset=0, last_fetched_epoch=-1,
            log_start_offset=-1, partition_max_bytes=1 << 20),)),),
        forgotten_topics_data=(), rack_id="")
    response = await client.call(fetch)
    partition = response.responses[0].partitions[0]
    assert partition.error_code == 0 and partition.high_watermark == 5
    assert partition.records[12:] == batch[12:]  # the stored batch, base offset patched
    assert sum(sent) == len(batch)
    client.close()


async def test_fetch_long_poll_wakes_on_append(server: Server) -> None:
    from kio.schema.fetch.v11.request import FetchPartition, FetchRequest, FetchTopic

    await server.broker.create_topic("wire-poll", 1)
    client = await connect(server)
    fetch = FetchRequest(
        replica_id=-1, max_wait=datetime.timedelta(seconds=20), min_bytes=1, max_bytes=1 << 20,
        isolation_level=0, session_id=0, session_epoch=-1, topics=(FetchTopic(
            topic="wire-poll", partitions=(FetchPartition(
                partition=0, current_leader_epoch=-1, fetch_offset=0, log_start_offset=-1,
                partition_max_bytes=1 << 20),)),),
        forgotten_topics_data=(), rack_id="")
    await client.send(request_frame(fetch, 1))
    await server.broker.append_batch("wire-poll", 0, batch_of(2))
    async with asyncio.timeout(5):  # far below max_wait: woken by the append
        response = parse(await client.read_frame(), fetch)
    assert response.responses[0].partitions[0].high_watermark == 2
    client.close()


async def test_refused_produce_answers_per_partition(server: Server) -> None:
    await server.broker.create_topic("wire-refuse", 1)
    client = await connect(server)
    bad_acks = await client.call(produce("wire-refuse", batch_of(1), acks=2))
    assert partition_result(bad_acks).error_code == 21  # INVALID_REQUIRED_ACKS
    # a transactional batch of a producer with no ongoing transaction holding the
    # partition (KIP-890 verification): INVALID_TXN_STATE, nothing appended
    transactional = ProduceRequest(
        transactional_id="tx", acks=-1, timeout=datetime.timedelta(seconds=5),
        topic_data=produce("wire-refuse", batch_of(
            1, producer_id=7, producer_epoch=0, base_sequence=0,
            is_transactional=True)).topic_data)
    answer = await client.call(transactional, 2)
    assert partition_result(answer).error_code == 48
    assert server.broker.offsets("wire-refuse", 0).high_watermark == 0
    client.close()


async def test_mixed_pipeline_answered_in_request_order(server: Server) -> None:
    await server.broker.create_topic("wire-mixed", 1)
    client = await connect(server)
    versions = ApiVersionsRequest(client_software_name="raw", client_software_version="1")
    metadata = MetadataRequest(topics=None, allow_auto_topic_creation=False,
                               include_topic_authorized_operations=False)
    entities = [produce("wire-mixed", batch_of(1)), metadata, produce("wire-mixed", batch_of(2)),
                produce("wire-mixed", batch_of(1)), versions, produce("wire-mixed", batch_of(1))]
    await client.send(b"".join(request_frame(entity, index)
                               for index, entity in enumerate(entities)))
    answers = [await client.read_frame() for _ in entities]
    assert [struct.unpack(">i", answer[:4])[0] for answer in answers] == list(range(6))
    base_offsets = [partition_result(parse(answers[index], entities[index])).base_offset
                    for index in (0, 2, 3, 5)]
    assert base_offsets == [0, 1, 3, 4]
    client.close()


async def test_alter_configs_resets_what_it_does_not_name(server: Server) -> None:
    from kio.schema.alter_configs.v0.request import (
        AlterableConfig,
        AlterConfigsRequest,
        AlterConfigsResource,
    )

    await server.broker.create_topic("wire-alter", 1, {"cleanup.policy": "compact"})
    client = await connect(server)
    request = AlterConfigsRequest(resources=(AlterConfigsResource(
        resource_type=2, resource_name="wire-alter",
        configs=(AlterableConfig(name="retention.ms", value="1000"),)),), validate_only=False)
    response = await client.call(request)
    assert response.responses[0].error_code == 0
    config = server.broker.topic_config("wire-alter")
    assert (config["retention.ms"], config["cleanup.policy"]) == ("1000", "delete")
    client.close()
