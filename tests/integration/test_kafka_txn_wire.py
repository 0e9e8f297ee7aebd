"""Goal: transactional requests out of order, with wrong epochs or for partitions not in
the transaction are answered with Kafka's own error codes, and nothing half-visible.

Method: raw TCP clients against one broker per test (run_broker), requests written with
kio, record batches built with the storage codec. Covers: EndTxn without InitProducerId
(INVALID_PRODUCER_ID_MAPPING), EndTxn of an empty transaction and TxnOffsetCommit
without AddOffsetsToTxn (INVALID_TXN_STATE), a stale epoch (PRODUCER_FENCED, and
INVALID_PRODUCER_EPOCH for pre-KIP-588 versions), an out-of-range timeout, an unknown
partition (UNKNOWN_TOPIC_OR_PARTITION, the others OPERATION_NOT_ATTEMPTED), KIP-890
verification of produces (a partition not added, a late write after EndTxn: refused
with INVALID_TXN_STATE, nothing appended), AddPartitionsToTxn v5 verify-only, a
client-made control batch, a transaction timing out (aborted, producer fenced, a
read_committed Fetch told of the aborted transaction), offsets visible only on commit
(OffsetFetch with require_stable: UNSTABLE_OFFSET_COMMIT meanwhile, KIP-447),
Describe/ListTransactions.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kio.schema.add_offsets_to_txn.v3.request import AddOffsetsToTxnRequest
from kio.schema.add_partitions_to_txn.v1.request import (
    AddPartitionsToTxnRequest as AddPartitionsV1,
)
from kio.schema.add_partitions_to_txn.v1.request import (
    AddPartitionsToTxnTopic as TopicV1,
)
from kio.schema.add_partitions_to_txn.v3.request import (
    AddPartitionsToTxnRequest as AddPartitionsV3,
)
from kio.schema.add_partitions_to_txn.v3.request import (
    AddPartitionsToTxnTopic as TopicV3,
)
from kio.schema.add_partitions_to_txn.v5.request import (
    AddPartitionsToTxnRequest as AddPartitionsV5,
)
from kio.schema.add_partitions_to_txn.v5.request import (
    AddPartitionsToTxnTopic as TopicV5,
)
from kio.schema.add_partitions_to_txn.v5.request import AddPartitionsToTxnTransaction
from kio.schema.describe_transactions.v0.request import DescribeTransactionsRequest
from kio.schema.end_txn.v3.request import EndTxnRequest
from kio.schema.fetch.v12.request import FetchPartition, FetchRequest, FetchTopic
from kio.schema.init_producer_id.v4.request import InitProducerIdRequest
from kio.schema.list_transactions.v1.request import ListTransactionsRequest
from kio.schema.offset_fetch.v7.request import OffsetFetchRequest, OffsetFetchRequestTopic
from kio.schema.produce.v9.request import PartitionProduceData, ProduceRequest, TopicProduceData
from kio.schema.txn_offset_commit.v3.request import (
    TxnOffsetCommitRequest,
    TxnOffsetCommitRequestPartition,
    TxnOffsetCommitRequestTopic,
)
from test_kafka_wire import RawClient, connect

from conveyor.server.app import Server
from conveyor.storage.control_batch import build_control_batch
from conveyor.storage.record_batch import RecordData, build_batch
from conveyor.testing.server import run_broker

NONE, UNKNOWN_TOPIC, UNKNOWN_MEMBER_ID, INVALID_REQUEST = 0, 3, 25, 42
INVALID_PRODUCER_EPOCH, INVALID_TXN_STATE, INVALID_PRODUCER_ID_MAPPING = 47, 48, 49
INVALID_TRANSACTION_TIMEOUT, OPERATION_NOT_ATTEMPTED = 50, 55
UNSTABLE_OFFSET_COMMIT, PRODUCER_FENCED, TRANSACTIONAL_ID_NOT_FOUND = 88, 90, 105


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with run_broker(tmp_path / "data", listeners=("kafka",)) as running:
        yield running


def ms(value: int) -> datetime.timedelta:
    return datetime.timedelta(milliseconds=value)


async def init(client: RawClient, transactional_id: str,
               timeout_ms: int = 60_000) -> tuple[int, int]:
    answer = await client.call(InitProducerIdRequest(
        transactional_id=transactional_id, transaction_timeout=ms(timeout_ms),
        producer_id=-1, producer_epoch=-1))
    assert answer.error_code == NONE
    return int(answer.producer_id), int(answer.producer_epoch)


async def add(client: RawClient, transactional_id: str, producer: tuple[int, int],
              topic: str, *partitions: int) -> dict[int, int]:
    answer = await client.call(AddPartitionsV3(
        v3_and_below_transactional_id=transactional_id,
        v3_and_below_producer_id=producer[0], v3_and_below_producer_epoch=producer[1],
        v3_and_below_topics=(TopicV3(name=topic, partitions=partitions),)))
    return {int(result.partition_index): int(result.partition_error_code)
            for topic_result in answer.results_by_topic_v3_and_below
            for result in topic_result.results_by_partition}


async def end(client: RawClient, transactional_id: str, producer: tuple[int, int],
              commit: bool) -> int:
    answer = await client.call(EndTxnRequest(
        transactional_id=transactional_id, producer_id=producer[0],
        producer_epoch=producer[1], committed=commit))
    return int(answer.error_code)


async def produce(client: RawClient, transactional_id: str, producer: tuple[int, int],
                  topic: str, partition: int, sequence: int, value: bytes) -> Any:
    batch = build_batch([RecordData(None, value, (), 1000)], producer_id=producer[0],
                        producer_epoch=producer[1], base_sequence=sequence,
                        is_transactional=True)
    answer = await client.call(ProduceRequest(
        transactional_id=transactional_id, acks=-1, timeout=datetime.timedelta(seconds=5),
        topic_data=(TopicProduceData(name=topic, partition_data=(
            PartitionProduceData(index=partition, records=batch),)),)))
    return answer.responses[0].partition_responses[0]


async def test_out_of_order_requests(server: Server) -> None:
    await server.broker.create_topic("w-order", 1)
    client = await connect(server)
    # EndTxn before any InitProducerId for the id
    assert await end(client, "never-initialised", (5, 0), True) == INVALID_PRODUCER_ID_MAPPING
    producer = await init(client, "order")
    # EndTxn with nothing in the transaction
    assert await end(client, "order", producer, True) == INVALID_TXN_STATE
    # TxnOffsetCommit without AddOffsetsToTxn
    answer = await client.call(TxnOffsetCommitRequest(
        transactional_id="order", group_id="g", producer_id=producer[0],
        producer_epoch=producer[1], generation_id=-1, member_id="", group_instance_id=None,
        topics=(TxnOffsetCommitRequestTopic(name="w-order", partitions=(
            TxnOffsetCommitRequestPartition(partition_index=0, committed_offset=1,
                                            committed_leader_epoch=-1,
                                            committed_metadata=None),)),)))
    assert answer.topics[0].partitions[0].error_code == INVALID_TXN_STATE
    # a proper transaction, then EndTxn twice: the retry is fine, the opposite is not
    assert await add(client, "order", producer, "w-order", 0) == {0: NONE}
    assert (await produce(client, "order", producer, "w-order", 0, 0, b"a")).error_code == 0
    assert await end(client, "order", producer, True) == NONE
    assert await end(client, "order", producer, True) == NONE
    assert await end(client, "order", producer, False) == INVALID_TXN_STATE
    # a late write of the finished transaction (its partition no longer added): refused
    late = await produce(client, "order", producer, "w-order", 0, 1, b"late")
    assert late.error_code == INVALID_TXN_STATE
    assert server.broker.offsets("w-order", 0).high_watermark == 2  # record + marker
    # AddPartitionsToTxn after EndTxn with the same epoch starts the next transaction
    # (Kafka's transaction.version 1); a late retry of the first transaction's batch is
    # then answered as the duplicate it is, with its original offset, and not appended
    assert await add(client, "order", producer, "w-order", 0) == {0: NONE}
    assert server.broker.describe_transaction("order").state == "Ongoing"
    retry = await produce(client, "order", producer, "w-order", 0, 0, b"a")
    assert (retry.error_code, retry.base_offset) == (NONE, 0)
    assert server.broker.offsets("w-order", 0).high_watermark == 2
    assert server.broker.last_stable_offset("w-order", 0) == 2
    client.close()


async def test_wrong_epochs_and_fencing(server: Server) -> None:
    await server.broker.create_topic("w-fence", 2)
    client = await connect(server)
    first = await init(client, "fence")
    assert await add(client, "fence", first, "w-fence", 0) == {0: NONE}
    assert (await produce(client, "fence", first, "w-fence", 0, 0, b"zombie")).error_code == 0
    second = await init(client, "fence")  # the next instance: the first is fenced
    assert second == (first[0], first[1] + 1)
    assert await add(client, "fence", first, "w-fence", 1) == {1: PRODUCER_FENCED}
    old = await client.call(AddPartitionsV1(
        v3_and_below_transactional_id="fence", v3_and_below_producer_id=first[0],
        v3_and_below_producer_epoch=first[1],
        v3_and_below_topics=(TopicV1(name="w-fence", partitions=(1,)),)))
    code = old.results_by_topic_v3_and_below[0].results_by_partition[0].partition_error_code
    assert code == INVALID_PRODUCER_EPOCH  # pre-KIP-588
    assert await end(client, "fence", first, True) == PRODUCER_FENCED
    zombie = await produce(client, "fence", first, "w-fence", 0, 1, b"zombie 2")
    assert zombie.error_code == INVALID_PRODUCER_EPOCH
    # the first instance's open transaction was aborted when the second arrived
    assert server.broker.last_stable_offset("w-fence", 0) == 2
    assert server.broker.aborted_transactions("w-fence", 0, 0, 2) == [(first[0], 0)]
    bad = await client.call(InitProducerIdRequest(
        transactional_id="fence", transaction_timeout=ms(60_000), producer_id=first[0],
        producer_epoch=first[1]))
    assert bad.error_code == PRODUCER_FENCED  # KIP-360 with a stale epoch
    too_long = await client.call(InitProducerIdRequest(
        transactional_id="other", transaction_timeout=ms(3_600_000), producer_id=-1,
        producer_epoch=-1))
    assert too_long.error_code == INVALID_TRANSACTION_TIMEOUT
    client.close()


async def test_partition_verification(server: Server) -> None:
    await server.broker.create_topic("w-verify", 2)
    client = await connect(server)
    producer = await init(client, "verify")
    unknown = await add(client, "verify", producer, "w-verify", 0, 7)
    assert unknown == {0: OPERATION_NOT_ATTEMPTED, 7: UNKNOWN_TOPIC}
    assert await add(client, "verify", producer, "w-verify", 0) == {0: NONE}
    # partition 1 was never added: refused, not silently accepted
    refused = await produce(client, "verify", producer, "w-verify", 1, 0, b"x")
    assert refused.error_code == INVALID_TXN_STATE
    assert server.broker.offsets("w-verify", 1).high_watermark == 0
    verify = await client.call(AddPartitionsV5(transactions=(AddPartitionsToTxnTransaction(
        transactional_id="verify", producer_id=producer[0], producer_epoch=producer[1],
        verify_only=True, topics=(TopicV5(name="w-verify", partitions=(0, 1)),)),)))
    codes = {int(r.partition_index): int(r.partition_error_code)
             for r in verify.results_by_transaction[0].topic_results[0].results_by_partition}
    assert codes == {0: NONE, 1: INVALID_TXN_STATE}
    # verify-only added nothing
    assert server.broker.describe_transaction("verify").partitions == (("w-verify", 0),)
    # a control batch is the broker's to write
    marker = build_control_batch(producer[0], producer[1], True, 0, 1000)
    forged = await client.call(ProduceRequest(
        transactional_id="verify", acks=-1, timeout=datetime.timedelta(seconds=5),
        topic_data=(TopicProduceData(name="w-verify", partition_data=(
            PartitionProduceData(index=0, records=marker),)),)))
    assert forged.responses[0].partition_responses[0].error_code == INVALID_REQUEST
    assert server.broker.offsets("w-verify", 0).high_watermark == 0
    client.close()


async def test_transaction_timeout_aborts_and_fences(server: Server) -> None:
    await server.broker.create_topic("w-timeout", 1)
    client = await connect(server)
    producer = await init(client, "slow", timeout_ms=300)
    assert await add(client, "slow", producer, "w-timeout", 0) == {0: NONE}
    assert (await produce(client, "slow", producer, "w-timeout", 0, 0, b"x")).error_code == 0
    # a read_committed fetch waits at the LSO and is woken by the abort marker's append
    fetch = FetchRequest(
        replica_id=-1, max_wait=ms(10_000), min_bytes=1, max_bytes=1 << 20,
        isolation_level=1, session_id=0, session_epoch=-1, rack_id="",
        topics=(FetchTopic(topic="w-timeout", partitions=(FetchPartition(
            partition=0, current_leader_epoch=-1, fetch_offset=0, last_fetched_epoch=-1,
            log_start_offset=-1, partition_max_bytes=1 << 20),)),), forgotten_topics_data=())
    answer = await client.call(fetch)
    partition = answer.responses[0].partitions[0]
    assert int(partition.last_stable_offset) == 2  # record + ABORT marker
    assert [(int(a.producer_id), int(a.first_offset))
            for a in partition.aborted_transactions] == [(producer[0], 0)]
    assert server.broker.describe_transaction("slow").state == "CompleteAbort"
    assert await end(client, "slow", producer, True) == PRODUCER_FENCED
    late = await produce(client, "slow", producer, "w-timeout", 0, 1, b"late")
    assert late.error_code == INVALID_PRODUCER_EPOCH
    assert [r.value for r in await server.broker.read_records("w-timeout", 0, 0, 10)] == []
    client.close()


async def test_offsets_and_admin_apis(server: Server) -> None:
    await server.broker.create_topic("w-admin", 1)
    client = await connect(server)
    producer = await init(client, "admin")
    answer = await client.call(AddOffsetsToTxnRequest(
        transactional_id="admin", producer_id=producer[0], producer_epoch=producer[1],
        group_id="g-admin"))
    assert answer.error_code == NONE
    commit = await client.call(TxnOffsetCommitRequest(
        transactional_id="admin", group_id="g-admin", producer_id=producer[0],
        producer_epoch=producer[1], generation_id=-1, member_id="", group_instance_id=None,
        topics=(TxnOffsetCommitRequestTopic(name="w-admin", partitions=(
            TxnOffsetCommitRequestPartition(partition_index=0, committed_offset=4,
                                            committed_leader_epoch=-1,
                                            committed_metadata="m"),)),)))
    assert commit.topics[0].partitions[0].error_code == NONE
    # a member the classic group does not know (a zombie consumer, KIP-447): refused
    await server.broker.commit_offsets("g-classic", {("w-admin", 0): 1})
    answer = await client.call(AddOffsetsToTxnRequest(
        transactional_id="admin", producer_id=producer[0], producer_epoch=producer[1],
        group_id="g-classic"))
    assert answer.error_code == NONE
    zombie = await client.call(TxnOffsetCommitRequest(
        transactional_id="admin", group_id="g-classic", producer_id=producer[0],
        producer_epoch=producer[1], generation_id=3, member_id="ghost",
        group_instance_id=None, topics=(TxnOffsetCommitRequestTopic(name="w-admin", partitions=(
            TxnOffsetCommitRequestPartition(partition_index=0, committed_offset=9,
                                            committed_leader_epoch=-1,
                                            committed_metadata=None),)),)))
    assert zombie.topics[0].partitions[0].error_code == UNKNOWN_MEMBER_ID
    assert server.broker.fetch_offsets("g-admin", [("w-admin", 0)]) == {("w-admin", 0): None}
    stable = OffsetFetchRequest(group_id="g-admin", topics=(OffsetFetchRequestTopic(
        name="w-admin", partition_indexes=(0,)),), require_stable=True)
    pending = (await client.call(stable)).topics[0].partitions[0]
    assert pending.error_code == UNSTABLE_OFFSET_COMMIT  # KIP-447: retry after the end
    described = await client.call(DescribeTransactionsRequest(
        transactional_ids=("admin", "nobody")))
    states = {s.transactional_id: s for s in described.transaction_states}
    assert states["admin"].transaction_state == "Ongoing"
    assert states["nobody"].error_code == TRANSACTIONAL_ID_NOT_FOUND
    listed = await client.call(ListTransactionsRequest(
        state_filters=("Ongoing", "Bogus"), producer_id_filters=(), duration_filter=-1))
    assert [s.transactional_id for s in listed.transaction_states] == ["admin"]
    assert listed.unknown_state_filters == ("Bogus",)
    assert await end(client, "admin", producer, True) == NONE
    found = server.broker.fetch_offsets("g-admin", [("w-admin", 0)])[("w-admin", 0)]
    assert found is not None and found.offset == 4 and found.metadata == "m"
    kept = server.broker.fetch_offsets("g-classic", [("w-admin", 0)])[("w-admin", 0)]
    assert kept is not None and kept.offset == 1  # the zombie's offset never applied
    settled = (await client.call(stable)).topics[0].partitions[0]
    assert (settled.error_code, settled.committed_offset) == (NONE, 4)
    client.close()
