"""Handlers of the transaction APIs: AddPartitionsToTxn (24), AddOffsetsToTxn (25),
EndTxn (26), TxnOffsetCommit (28), DescribeTransactions (65), ListTransactions (66).

Owns: turning these typed requests into calls of the broker's transaction
coordinator (broker/transactions.py) and its answers into Kafka's error codes.
PRODUCER_FENCED is answered as INVALID_PRODUCER_EPOCH to the versions older
than KIP-588's (clients that predate the code), as Kafka does.
Must not know: sockets, files, the coordinator's state machine.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any, Final

from conveyor.errors import OperatingError
from conveyor.protocols.kafka import error_codes
from conveyor.protocols.kafka.codec import Request
from conveyor.protocols.kafka.messages import response_class
from conveyor.protocols.kafka.responses import build, nested

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker

API_KEYS: Final = frozenset({24, 25, 26, 28, 65, 66})
# transaction.version 2 (KIP-890 part 2): EndTxn v5 bumps the epoch and answers it,
# TxnOffsetCommit v5 adds its group to the transaction (no AddOffsetsToTxn before it)
TV2_END_TXN: Final = 5
TV2_TXN_OFFSET_COMMIT: Final = 5
# api key -> first version that may receive PRODUCER_FENCED (KIP-588)
_FENCED_FROM: Final = {22: 4, 24: 2, 25: 2, 26: 2, 28: 3}
# Kafka's -1 "not started" start time (kio writes datetimes; build() maps -1 to None)
_NOT_STARTED: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) - datetime.timedelta(
    milliseconds=1)
KNOWN_STATES: Final = ("Empty", "Ongoing", "PrepareCommit", "PrepareAbort",
                       "CompleteCommit", "CompleteAbort", "Dead", "PrepareEpochFence")


def code_for(error: OperatingError | None, api_key: int, version: int) -> int:
    if error is None:
        return error_codes.NONE
    code = error_codes.error_code_for(error)
    if code == error_codes.PRODUCER_FENCED and version < _FENCED_FROM.get(api_key, 0):
        return error_codes.INVALID_PRODUCER_EPOCH
    if error.code == "operation_not_attempted":
        return error_codes.OPERATION_NOT_ATTEMPTED
    return code


async def handle(broker: Broker, request: Request) -> Any:
    api_key = request.header.api_key
    if api_key == 24:
        return await _add_partitions(broker, request)
    if api_key == 25:
        return await _add_offsets(broker, request)
    if api_key == 26:
        return await _end_txn(broker, request)
    if api_key == 28:
        return await _txn_offset_commit(broker, request)
    if api_key == 65:
        return _describe(broker, request)
    if api_key == 66:
        return _list(broker, request)
    raise AssertionError(f"api key {api_key} is in API_KEYS without a handler")


async def _add_partitions(broker: Broker, request: Request) -> Any:
    version = request.header.api_version
    body = request.body
    response_type = response_class(24, version)
    topic_type = nested(response_type, "AddPartitionsToTxnTopicResult")
    partition_type = nested(response_type, "AddPartitionsToTxnPartitionResult")

    async def one(transactional_id: str, producer_id: int, epoch: int, verify_only: bool,
                  topics: Any) -> tuple[Any, ...]:
        wanted = [(topic.name, int(partition)) for topic in topics
                  for partition in topic.partitions]
        try:
            outcomes = await broker.add_partitions_to_txn(
                transactional_id, producer_id, epoch, wanted, verify_only)
            codes = {key: code_for(error, 24, version) for key, error in outcomes.items()}
        except OperatingError as error:
            codes = dict.fromkeys(wanted, code_for(error, 24, version))
        names = list(dict.fromkeys(name for name, _ in wanted))
        return tuple(build(topic_type, name=name, results_by_partition=tuple(
            build(partition_type, partition_index=partition, partition_error_code=code)
            for (topic, partition), code in codes.items() if topic == name))
            for name in names)

    if version <= 3:
        results = await one(body.v3_and_below_transactional_id,
                            body.v3_and_below_producer_id, body.v3_and_below_producer_epoch,
                            False, body.v3_and_below_topics)
        return build(response_type, results_by_topic_v3_and_below=results)
    result_type = nested(response_type, "AddPartitionsToTxnResult")
    batched = []
    for transaction in body.transactions:
        results = await one(transaction.transactional_id, transaction.producer_id,
                            transaction.producer_epoch, transaction.verify_only,
                            transaction.topics)
        batched.append(build(result_type, transactional_id=transaction.transactional_id,
                             topic_results=results))
    return build(response_type, error_code=error_codes.NONE,
                 results_by_transaction=tuple(batched))


async def _add_offsets(broker: Broker, request: Request) -> Any:
    version = request.header.api_version
    body = request.body
    try:
        await broker.add_offsets_to_txn(body.transactional_id, body.producer_id,
                                        body.producer_epoch, body.group_id)
        code = error_codes.NONE
    except OperatingError as error:
        code = code_for(error, 25, version)
    return build(response_class(25, version), error_code=code)


async def _end_txn(broker: Broker, request: Request) -> Any:
    version = request.header.api_version
    body = request.body
    producer = (-1, -1)
    try:
        producer = await broker.end_txn(body.transactional_id, body.producer_id,
                                        body.producer_epoch, bool(body.committed),
                                        bump_epoch=version >= TV2_END_TXN)
        code = error_codes.NONE
    except OperatingError as error:
        code = code_for(error, 26, version)
    # v5 answers the producer id and epoch the client uses next (v4 and older: no field)
    return build(response_class(26, version), error_code=code, producer_id=producer[0],
                 producer_epoch=producer[1])


async def _txn_offset_commit(broker: Broker, request: Request) -> Any:
    version = request.header.api_version
    body = request.body
    response_type = response_class(28, version)
    topic_type = nested(response_type, "TxnOffsetCommitResponseTopic")
    partition_type = nested(response_type, "TxnOffsetCommitResponsePartition")
    offsets = [(topic.name, int(partition.partition_index), int(partition.committed_offset),
                partition.committed_metadata)
               for topic in body.topics for partition in topic.partitions]
    try:
        member = (str(getattr(body, "member_id", "") or ""),
                  int(getattr(body, "generation_id", -1)))
        outcomes = await broker.txn_offset_commit(
            body.transactional_id, body.group_id, body.producer_id, body.producer_epoch,
            offsets, member, implicit=version >= TV2_TXN_OFFSET_COMMIT)
        codes = {key: code_for(error, 28, version) for key, error in outcomes.items()}
    except OperatingError as error:
        codes = {(topic, partition): code_for(error, 28, version)
                 for topic, partition, _, _ in offsets}
    return build(response_type, topics=tuple(
        build(topic_type, name=topic.name, partitions=tuple(
            build(partition_type, partition_index=partition.partition_index,
                  error_code=codes.get((topic.name, int(partition.partition_index)),
                                       error_codes.NONE))
            for partition in topic.partitions))
        for topic in body.topics))


def _describe(broker: Broker, request: Request) -> Any:
    response_type = response_class(65, request.header.api_version)
    state_type = nested(response_type, "TransactionState")
    topic_type = nested(response_type, "TopicData")
    states = []
    for transactional_id in request.body.transactional_ids:
        found = broker.describe_transaction(transactional_id)
        if found is None:
            states.append(build(state_type, error_code=error_codes.TRANSACTIONAL_ID_NOT_FOUND,
                                transactional_id=transactional_id, transaction_state="",
                                transaction_timeout=0, transaction_start_time=0,
                                producer_id=-1, producer_epoch=-1, topics=()))
            continue
        topics: dict[str, list[int]] = {}
        for topic, partition in found.partitions:
            topics.setdefault(topic, []).append(partition)
        states.append(build(
            state_type, error_code=error_codes.NONE, transactional_id=transactional_id,
            transaction_state=found.state, transaction_timeout=found.timeout_ms,
            transaction_start_time=(found.started_ms if found.started_ms >= 0
                                    else _NOT_STARTED), producer_id=found.producer_id,
            producer_epoch=found.producer_epoch,
            topics=tuple(build(topic_type, topic=topic, partitions=tuple(partitions))
                         for topic, partitions in sorted(topics.items()))))
    return build(response_type, transaction_states=tuple(states))


def _list(broker: Broker, request: Request) -> Any:
    body = request.body
    response_type = response_class(66, request.header.api_version)
    state_type = nested(response_type, "TransactionState")
    unknown = tuple(state for state in body.state_filters if state not in KNOWN_STATES)
    duration_ms = int(getattr(body, "duration_filter", -1))
    found = broker.list_transactions(body.state_filters, body.producer_id_filters,
                                     duration_ms)
    return build(response_type, error_code=error_codes.NONE, unknown_state_filters=unknown,
                 transaction_states=tuple(
                     build(state_type, transactional_id=item.transactional_id,
                           producer_id=item.producer_id, transaction_state=item.state)
                     for item in found))
