"""Kafka error codes and the mapping from Conveyor's typed operating errors to them.

Owns: the numeric codes the Kafka protocol defines (the subset Conveyor
answers with) and ``error_code_for(error)``. Pure; no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, Final

from kio.schema.errors import ErrorCode

from conveyor.errors import ConveyorError

NONE: Final = 0
UNKNOWN_SERVER_ERROR: Final = -1
OFFSET_OUT_OF_RANGE: Final = 1
CORRUPT_MESSAGE: Final = 2
UNKNOWN_TOPIC_OR_PARTITION: Final = 3
LEADER_NOT_AVAILABLE: Final = 5
NOT_LEADER_OR_FOLLOWER: Final = 6
MESSAGE_TOO_LARGE: Final = 10
COORDINATOR_NOT_AVAILABLE: Final = 15
NOT_COORDINATOR: Final = 16
INVALID_TOPIC_EXCEPTION: Final = 17
INVALID_REQUIRED_ACKS: Final = 21
ILLEGAL_GENERATION: Final = 22
INCONSISTENT_GROUP_PROTOCOL: Final = 23
UNKNOWN_MEMBER_ID: Final = 25
INVALID_SESSION_TIMEOUT: Final = 26
REBALANCE_IN_PROGRESS: Final = 27
TOPIC_AUTHORIZATION_FAILED: Final = 29
GROUP_AUTHORIZATION_FAILED: Final = 30
CLUSTER_AUTHORIZATION_FAILED: Final = 31
UNSUPPORTED_SASL_MECHANISM: Final = 33
ILLEGAL_SASL_STATE: Final = 34
UNSUPPORTED_VERSION: Final = 35
TOPIC_ALREADY_EXISTS: Final = 36
INVALID_PARTITIONS: Final = 37
INVALID_REPLICATION_FACTOR: Final = 38
INVALID_REPLICA_ASSIGNMENT: Final = 39
INVALID_CONFIG: Final = 40
INVALID_REQUEST: Final = 42
UNSUPPORTED_FOR_MESSAGE_FORMAT: Final = 43
OUT_OF_ORDER_SEQUENCE_NUMBER: Final = 45
DUPLICATE_SEQUENCE_NUMBER: Final = 46
INVALID_PRODUCER_EPOCH: Final = 47
INVALID_TXN_STATE: Final = 48
INVALID_PRODUCER_ID_MAPPING: Final = 49
INVALID_TRANSACTION_TIMEOUT: Final = 50
CONCURRENT_TRANSACTIONS: Final = 51
TRANSACTIONAL_ID_AUTHORIZATION_FAILED: Final = 53
KAFKA_STORAGE_ERROR: Final = 56
LOG_DIR_NOT_FOUND: Final = 57
SASL_AUTHENTICATION_FAILED: Final = 58
UNKNOWN_PRODUCER_ID: Final = 59
OPERATION_NOT_ATTEMPTED: Final = 55
UNSTABLE_OFFSET_COMMIT: Final = 88
PRODUCER_FENCED: Final = 90
TRANSACTIONAL_ID_NOT_FOUND: Final = 105
NON_EMPTY_GROUP: Final = 68
GROUP_ID_NOT_FOUND: Final = 69
FENCED_LEADER_EPOCH: Final = 74
UNKNOWN_LEADER_EPOCH: Final = 75
MEMBER_ID_REQUIRED: Final = 79
GROUP_MAX_SIZE_REACHED: Final = 81
ELECTION_NOT_NEEDED: Final = 84
NO_REASSIGNMENT_IN_PROGRESS: Final = 85
GROUP_SUBSCRIBED_TO_TOPIC: Final = 86
FENCED_INSTANCE_ID: Final = 82
RESOURCE_NOT_FOUND: Final = 91
DUPLICATE_RESOURCE: Final = 92
UNACCEPTABLE_CREDENTIAL: Final = 93
UNKNOWN_TOPIC_ID: Final = 100
FENCED_MEMBER_EPOCH: Final = 110
UNRELEASED_INSTANCE_ID: Final = 111
UNSUPPORTED_ASSIGNOR: Final = 112
STALE_MEMBER_EPOCH: Final = 113
INVALID_RECORD_STATE: Final = 121
SHARE_SESSION_NOT_FOUND: Final = 122
INVALID_SHARE_SESSION_EPOCH: Final = 123
INVALID_UPDATE_VERSION: Final = 95
INVALID_REGULAR_EXPRESSION: Final = 128
SHARE_SESSION_LIMIT_REACHED: Final = 133

# ConveyorError.code -> Kafka error code.
_BY_CODE: Final[dict[str, int]] = {
    "invalid_request": INVALID_REQUEST,
    "invalid_name": INVALID_TOPIC_EXCEPTION,
    "invalid_config": INVALID_CONFIG,
    "invalid_partitions": INVALID_PARTITIONS,
    "corrupt_record": CORRUPT_MESSAGE,
    "record_too_large": MESSAGE_TOO_LARGE,
    "limit_exceeded": MESSAGE_TOO_LARGE,
    "not_found": UNKNOWN_TOPIC_OR_PARTITION,
    "unknown_topic": UNKNOWN_TOPIC_OR_PARTITION,
    "unknown_partition": UNKNOWN_TOPIC_OR_PARTITION,
    "unknown_queue": UNKNOWN_TOPIC_OR_PARTITION,
    "unknown_group": GROUP_ID_NOT_FOUND,
    "already_exists": TOPIC_ALREADY_EXISTS,
    "topic_exists": TOPIC_ALREADY_EXISTS,
    "unknown_member": UNKNOWN_MEMBER_ID,
    "illegal_generation": ILLEGAL_GENERATION,
    "rebalance_in_progress": REBALANCE_IN_PROGRESS,
    "inconsistent_group_protocol": INCONSISTENT_GROUP_PROTOCOL,
    "invalid_session_timeout": INVALID_SESSION_TIMEOUT,
    "fenced_instance_id": FENCED_INSTANCE_ID,
    "non_empty_group": NON_EMPTY_GROUP,
    "offset_out_of_range": OFFSET_OUT_OF_RANGE,
    "duplicate_sequence": DUPLICATE_SEQUENCE_NUMBER,
    "out_of_order_sequence": OUT_OF_ORDER_SEQUENCE_NUMBER,
    "invalid_producer_epoch": INVALID_PRODUCER_EPOCH,
    "unknown_producer_id": UNKNOWN_PRODUCER_ID,
    "producer_fenced": PRODUCER_FENCED,
    "invalid_txn_state": INVALID_TXN_STATE,
    "invalid_producer_id_mapping": INVALID_PRODUCER_ID_MAPPING,
    "invalid_transaction_timeout": INVALID_TRANSACTION_TIMEOUT,
    "concurrent_transactions": CONCURRENT_TRANSACTIONS,
    "storage_error": KAFKA_STORAGE_ERROR,
    "storage_full": KAFKA_STORAGE_ERROR,
    "unavailable": COORDINATOR_NOT_AVAILABLE,
    "not_coordinator": NOT_COORDINATOR,
    "not_leader": NOT_LEADER_OR_FOLLOWER,
    "authentication_failed": SASL_AUTHENTICATION_FAILED,
    "topic_authorization_failed": TOPIC_AUTHORIZATION_FAILED,
    "fenced_member_epoch": FENCED_MEMBER_EPOCH,
    "group_max_size_reached": GROUP_MAX_SIZE_REACHED,
    "invalid_record_state": INVALID_RECORD_STATE,
    "share_session_not_found": SHARE_SESSION_NOT_FOUND,
    "invalid_share_session_epoch": INVALID_SHARE_SESSION_EPOCH,
    "share_session_limit_reached": SHARE_SESSION_LIMIT_REACHED,
    "unreleased_instance_id": UNRELEASED_INSTANCE_ID,
    "unsupported_assignor": UNSUPPORTED_ASSIGNOR,
    "stale_member_epoch": STALE_MEMBER_EPOCH,
    "invalid_regular_expression": INVALID_REGULAR_EXPRESSION,
    "lock_expired": INVALID_RECORD_STATE,
    "unknown_delivery": INVALID_RECORD_STATE,
}


def error_code_for(error: ConveyorError) -> int:
    return _BY_CODE.get(error.code, UNKNOWN_SERVER_ERROR)


def code(value: int) -> ErrorCode:
    """kio's enum member for a numeric code (kio's writer needs the enum)."""
    return ErrorCode(value)


def error_name(value: int) -> str:
    """Kafka's name of a code ("MESSAGE_TOO_LARGE"), for metrics labels."""
    try:
        return ErrorCode(value).name.upper()
    except ValueError:
        return f"ERROR_{value}"


def error_codes_in(entity: Any, depth: int = 3) -> Iterator[int]:
    """The non-zero error codes of a kio response entity and its nested entries."""
    if depth < 0 or not dataclasses.is_dataclass(entity):
        return
    for item in dataclasses.fields(entity):
        value = getattr(entity, item.name)
        if item.name == "error_code":
            if int(value):
                yield int(value)
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            for nested in value:
                yield from error_codes_in(nested, depth - 1)
