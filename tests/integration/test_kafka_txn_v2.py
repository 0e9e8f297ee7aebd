"""Goal: transaction.version 2 (KIP-890 part 2) on the wire: ApiVersions finalizes it,
Produce v12 adds partitions to the transaction itself, EndTxn v5 bumps the epoch and
answers it (a late write of the finished transaction is fenced, the new epoch works,
a retried EndTxn gets the same answer), TxnOffsetCommit v5 adds its group, an exhausted
epoch moves the transactional id to a new producer id; TV1 requests keep the epoch.

Method: raw TCP clients against one broker per test (run_broker), requests written with
kio at the versions a Kafka 4 Java client sends with transaction.version 2, record
batches built with the storage codec; what is visible checked with read_committed
reads through the broker.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kio.schema.api_versions.v3.request import ApiVersionsRequest
from kio.schema.end_txn.v3.request import EndTxnRequest as EndTxnV3
from kio.schema.end_txn.v5.request import EndTxnRequest
from kio.schema.init_producer_id.v4.request import InitProducerIdRequest
from kio.schema.produce.v11.request import PartitionProduceData as PartitionV11
from kio.schema.produce.v11.request import ProduceRequest as ProduceV11
from kio.schema.produce.v11.request import TopicProduceData as TopicV11
from kio.schema.produce.v12.request import PartitionProduceData, ProduceRequest, TopicProduceData
from kio.schema.txn_offset_commit.v5.request import (
    TxnOffsetCommitRequest,
    TxnOffsetCommitRequestPartition,
    TxnOffsetCommitRequestTopic,
)
from test_kafka_wire import RawClient, connect

from conveyor.broker.producer_state import EPOCH_MAX
from conveyor.server.app import Server
from conveyor.storage.record_batch import RecordData, build_batch, split_batches
from conveyor.testing.server import run_broker

NONE, INVALID_PRODUCER_EPOCH, INVALID_TXN_STATE, PRODUCER_FENCED = 0, 47, 48, 90


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with run_broker(tmp_path / "data", listeners=("kafka",)) as running:
        yield running


async def init(client: RawClient, transactional_id: str) -> tuple[int, int]:
    answer = await client.call(InitProducerIdRequest(
        transactional_id=transactional_id, transaction_timeout=datetime.timedelta(minutes=1),
        producer_id=-1, producer_epoch=-1))
    assert answer.error_code == NONE
    return int(answer.producer_id), int(answer.producer_epoch)


async def produce(client: RawClient, transactional_id: str, producer: tuple[int, int],
                  topic: str, partition: int, sequence: int, value: bytes,
                  version: int = 12) -> Any:
    batch = build_batch([RecordData(None, value, (), 1000)], producer_id=producer[0],
                        producer_epoch=producer[1], base_sequence=sequence,
                        is_transactional=True)
    request_type, topic_type, partition_type = (
        (ProduceRequest, TopicProduceData, PartitionProduceData) if version == 12
        else (ProduceV11, TopicV11, PartitionV11))
    answer = await client.call(request_type(
        transactional_id=transactional_id, acks=-1, timeout=datetime.timedelta(seconds=5),
        topic_data=(topic_type(name=topic, partition_data=(
            partition_type(index=partition, records=batch),)),)))
    return answer.responses[0].partition_responses[0]


async def end(client: RawClient, transactional_id: str, producer: tuple[int, int],
              commit: bool) -> tuple[int, tuple[int, int]]:
    answer = await client.call(EndTxnRequest(
        transactional_id=transactional_id, producer_id=producer[0],
        producer_epoch=producer[1], committed=commit))
    return int(answer.error_code), (int(answer.producer_id), int(answer.producer_epoch))


async def committed_values(server: Server, topic: str, partition: int = 0) -> list[bytes]:
    return [record.value for record in await server.broker.read_records(topic, partition, 0, 100)
            if record.value is not None]


async def batch_epochs(server: Server, topic: str, partition: int) -> list[tuple[bool, int]]:
    data = (await server.broker.topics.log_store.read(topic, partition, 0, 1 << 20)).read_bytes()
    return [(header.is_control, header.producer_epoch) for _, header in split_batches(data)]


async def test_api_versions_finalize_transaction_version_2(server: Server) -> None:
    client = await connect(server)
    answer = await client.call(ApiVersionsRequest(client_software_name="test",
                                                  client_software_version="1"))
    finalized = {key.name: (int(key.min_version_level), int(key.max_version_level))
                 for key in answer.finalized_features}
    assert finalized["transaction.version"] == (2, 2)
    versions = {int(key.api_key): int(key.max_version) for key in answer.api_keys}
    assert (versions[0], versions[26], versions[28]) == (12, 5, 5)
    client.close()


async def test_end_txn_v5_bumps_the_epoch_and_fences_late_writes(server: Server) -> None:
    await server.broker.create_topic("v2-fence", 2)
    client = await connect(server)
    producer = await init(client, "fence")
    # Produce v12 with no AddPartitionsToTxn: the partitions join the transaction
    assert (await produce(client, "fence", producer, "v2-fence", 0, 0, b"a")).error_code == 0
    assert (await produce(client, "fence", producer, "v2-fence", 1, 0, b"b")).error_code == 0
    described = server.broker.describe_transaction("fence")
    assert described is not None and described.state == "Ongoing"
    assert described.partitions == (("v2-fence", 0), ("v2-fence", 1))
    code, bumped = await end(client, "fence", producer, True)
    assert code == NONE and bumped == (producer[0], producer[1] + 1)
    assert await committed_values(server, "v2-fence", 0) == [b"a"]
    # a late write of the finished transaction (its epoch, its next sequence): fenced,
    # and it opens nothing (no transaction, no hanging LSO)
    late = await produce(client, "fence", producer, "v2-fence", 0, 1, b"late")
    assert late.error_code == INVALID_PRODUCER_EPOCH
    assert server.broker.describe_transaction("fence").state == "CompleteCommit"
    # a retry of the EndTxn (the old epoch, the answer lost): the same answer
    assert await end(client, "fence", producer, True) == (NONE, bumped)
    # ... but not the opposite decision
    assert (await end(client, "fence", producer, False))[0] == INVALID_TXN_STATE
    # the new epoch works (sequences start over) and starts the next transaction
    assert (await produce(client, "fence", bumped, "v2-fence", 0, 0, b"c")).error_code == 0
    code, aborted = await end(client, "fence", bumped, False)
    assert code == NONE and aborted == (producer[0], producer[1] + 2)
    assert await committed_values(server, "v2-fence", 0) == [b"a"]
    # the markers carry the bumped epochs: (control, epoch) of every batch in the log
    assert await batch_epochs(server, "v2-fence", 0) == [
        (False, producer[1]), (True, producer[1] + 1), (False, producer[1] + 1),
        (True, producer[1] + 2)]
    # an EndTxn with the epoch before last: fenced
    assert (await end(client, "fence", producer, True))[0] == PRODUCER_FENCED
    assert (await end(client, "fence", aborted, True))[0] == INVALID_TXN_STATE  # nothing open
    assert (await produce(client, "fence", aborted, "v2-fence", 1, 0, b"d")).error_code == 0
    assert (await end(client, "fence", aborted, True))[0] == NONE
    assert await committed_values(server, "v2-fence", 1) == [b"b", b"d"]
    client.close()


async def test_end_txn_v5_after_a_timeout_abort_resumes(server: Server) -> None:
    """KIP-890 part 2: the coordinator aborted the transaction on its timeout (bumping
    the epoch); the TV2 producer's EndTxn(abort) with its epoch is that abort's retry and
    answers the new epoch, which works; a commit instead is INVALID_TXN_STATE."""
    await server.broker.create_topic("v2-timeout", 1)
    client = await connect(server)
    answer = await client.call(InitProducerIdRequest(
        transactional_id="slow", transaction_timeout=datetime.timedelta(milliseconds=200),
        producer_id=-1, producer_epoch=-1))
    producer = (int(answer.producer_id), int(answer.producer_epoch))
    assert (await produce(client, "slow", producer, "v2-timeout", 0, 0, b"x")).error_code == 0
    deadline = asyncio.get_running_loop().time() + 10
    while server.broker.describe_transaction("slow").state != "CompleteAbort":
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)  # the coordinator's own timer aborts it (real clock)
    assert (await end(client, "slow", producer, True))[0] == INVALID_TXN_STATE
    code, resumed = await end(client, "slow", producer, False)
    assert code == NONE and resumed == (producer[0], producer[1] + 1)
    assert (await produce(client, "slow", resumed, "v2-timeout", 0, 0, b"y")).error_code == 0
    assert (await end(client, "slow", resumed, True))[0] == NONE
    assert await committed_values(server, "v2-timeout") == [b"y"]
    client.close()


async def test_produce_v11_still_needs_add_partitions(server: Server) -> None:
    """TV1 clients are unchanged: Produce v11 to a partition not added is refused, and
    EndTxn v3 keeps the epoch."""
    await server.broker.create_topic("v1-keep", 1)
    client = await connect(server)
    producer = await init(client, "keep")
    refused = await produce(client, "keep", producer, "v1-keep", 0, 0, b"x", version=11)
    assert refused.error_code == INVALID_TXN_STATE
    assert (await produce(client, "keep", producer, "v1-keep", 0, 0, b"y")).error_code == 0
    answer = await client.call(EndTxnV3(transactional_id="keep", producer_id=producer[0],
                                        producer_epoch=producer[1], committed=True))
    assert answer.error_code == NONE
    described = server.broker.describe_transaction("keep")
    assert described is not None and described.producer_epoch == producer[1]
    assert await committed_values(server, "v1-keep") == [b"y"]
    client.close()


async def test_txn_offset_commit_v5_adds_the_group(server: Server) -> None:
    await server.broker.create_topic("v2-offsets", 1)
    client = await connect(server)
    producer = await init(client, "offsets")
    answer = await client.call(TxnOffsetCommitRequest(
        transactional_id="offsets", group_id="g-v2", producer_id=producer[0],
        producer_epoch=producer[1], generation_id=-1, member_id="", group_instance_id=None,
        topics=(TxnOffsetCommitRequestTopic(name="v2-offsets", partitions=(
            TxnOffsetCommitRequestPartition(partition_index=0, committed_offset=7,
                                            committed_leader_epoch=-1,
                                            committed_metadata=None),)),)))
    assert answer.topics[0].partitions[0].error_code == NONE
    assert server.broker.fetch_offsets("g-v2", [("v2-offsets", 0)]) == {("v2-offsets", 0): None}
    code, _ = await end(client, "offsets", producer, True)
    assert code == NONE
    found = server.broker.fetch_offsets("g-v2", [("v2-offsets", 0)])[("v2-offsets", 0)]
    assert found is not None and found.offset == 7
    client.close()


async def test_exhausted_epoch_moves_to_a_new_producer_id(server: Server) -> None:
    await server.broker.create_topic("v2-rotate", 1)
    client = await connect(server)
    producer = await init(client, "rotate")
    # as after 32,765 transactions: the id's epoch is one below the last usable one
    transactions = server.broker.transactions
    row = transactions._transactions["rotate"]
    row.producer_epoch = EPOCH_MAX - 1
    transactions.producers.set_epoch("rotate", producer[0], EPOCH_MAX - 1)
    old = (producer[0], EPOCH_MAX - 1)
    assert (await produce(client, "rotate", old, "v2-rotate", 0, 0, b"last")).error_code == 0
    code, rotated = await end(client, "rotate", old, True)
    assert code == NONE and rotated[0] != producer[0] and rotated[1] == 0
    assert (await produce(client, "rotate", old, "v2-rotate", 0, 1, b"x")).error_code \
        == INVALID_PRODUCER_EPOCH
    assert await end(client, "rotate", old, True) == (NONE, rotated)  # a retry
    assert (await produce(client, "rotate", rotated, "v2-rotate", 0, 0, b"next")).error_code \
        == 0
    assert (await end(client, "rotate", rotated, True)) == (NONE, (rotated[0], 1))
    assert await committed_values(server, "v2-rotate") == [b"last", b"next"]
    client.close()
