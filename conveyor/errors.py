"""Typed operating errors shared by every layer.

Operating errors are expected: bad bytes, exceeded limits, unknown names, a full
disk. Each carries a stable ``code`` (protocols map it to their own error: Kafka
error codes, AMQP reply codes, SQS error shapes, HTTP statuses) and the evidence
in ``details``. Programmer errors are ``assert``s and never use these classes.
"""

from __future__ import annotations

from typing import Any


class ConveyorError(Exception):
    """Base of every error Conveyor raises on purpose."""

    code = "internal_error"
    http_status = 500

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __str__(self) -> str:
        if not self.details:
            return self.message
        evidence = ", ".join(f"{key}={value!r}" for key, value in self.details.items())
        return f"{self.message} ({evidence})"


class OperatingError(ConveyorError):
    """An expected failure caused by input or the environment, not by a bug."""

    code = "operating_error"
    http_status = 400


# --- input -------------------------------------------------------------------
class InvalidRequestError(OperatingError):
    code = "invalid_request"


class InvalidNameError(OperatingError):
    code = "invalid_name"


class InvalidConfigError(OperatingError):
    code = "invalid_config"


class CorruptRecordError(OperatingError):
    """A record batch failed validation (CRC, lengths, magic)."""

    code = "corrupt_record"


class RecordTooLargeError(OperatingError):
    code = "record_too_large"
    http_status = 413


class LimitExceededError(OperatingError):
    code = "limit_exceeded"
    http_status = 413


# --- names -------------------------------------------------------------------
class NotFoundError(OperatingError):
    code = "not_found"
    http_status = 404


class UnknownTopicError(NotFoundError):
    code = "unknown_topic"


class UnknownPartitionError(NotFoundError):
    code = "unknown_partition"


class UnknownGroupError(NotFoundError):
    code = "unknown_group"


class UnknownExchangeError(NotFoundError):
    code = "unknown_exchange"


class UnknownQueueError(NotFoundError):
    code = "unknown_queue"


class AlreadyExistsError(OperatingError):
    code = "already_exists"
    http_status = 409


class TopicExistsError(AlreadyExistsError):
    code = "topic_exists"


class PreconditionFailedError(OperatingError):
    """A declaration conflicts with an existing one (AMQP 406 semantics)."""

    code = "precondition_failed"
    http_status = 409


# --- state machines ----------------------------------------------------------
class IllegalStateError(OperatingError):
    code = "illegal_state"
    http_status = 409


class UnknownMemberError(IllegalStateError):
    code = "unknown_member"


class IllegalGenerationError(IllegalStateError):
    code = "illegal_generation"


class RebalanceInProgressError(IllegalStateError):
    code = "rebalance_in_progress"


class UnknownDeliveryError(IllegalStateError):
    """A receipt handle / delivery id that is unknown, already acked or expired."""

    code = "unknown_delivery"


class LockExpiredError(IllegalStateError):
    code = "lock_expired"


class OffsetOutOfRangeError(OperatingError):
    code = "offset_out_of_range"
    http_status = 416


# --- idempotent producer -----------------------------------------------------
class DuplicateSequenceError(OperatingError):
    code = "duplicate_sequence"


class OutOfOrderSequenceError(OperatingError):
    code = "out_of_order_sequence"


class InvalidProducerEpochError(OperatingError):
    code = "invalid_producer_epoch"


class UnknownProducerIdError(OperatingError):
    code = "unknown_producer_id"


# --- transactions (Kafka's names; broker/transactions.py) ----------------------
class ProducerFencedError(OperatingError):
    """A newer instance of the transactional id holds a higher epoch."""

    code = "producer_fenced"


class InvalidTxnStateError(IllegalStateError):
    """The operation does not fit the transaction's state (or the partition is not in it)."""

    code = "invalid_txn_state"


class InvalidProducerIdMappingError(OperatingError):
    code = "invalid_producer_id_mapping"


class InvalidTransactionTimeoutError(InvalidRequestError):
    code = "invalid_transaction_timeout"


class ConcurrentTransactionsError(IllegalStateError):
    """The previous transaction of this id is still being completed: retry."""

    code = "concurrent_transactions"


# --- environment -------------------------------------------------------------
class StorageError(OperatingError):
    code = "storage_error"
    http_status = 503


class StorageFullError(StorageError):
    code = "storage_full"
    http_status = 507


class StorageBusyError(StorageError):
    """Too many writes are waiting for the database (stalled or away): refused at once,
    before anything is written. Keeps code ``storage_error``, so every protocol answers
    its retriable storage error (Kafka KAFKA_STORAGE_ERROR, HTTP 503 with Retry-After,
    an AMQP nack under publisher confirms)."""


class UnavailableError(OperatingError):
    code = "unavailable"
    http_status = 503


class NotLeaderError(UnavailableError):
    """This node no longer leads the partition (a cluster node whose owner row moved or
    whose lease lapsed before its append was written): the client finds the leader
    again."""

    code = "not_leader"


class NotCoordinatorError(UnavailableError):
    """This node no longer coordinates the group (a cluster node that lost its owner
    row or its lease): the client finds the coordinator again."""

    code = "not_coordinator"


class AuthenticationError(OperatingError):
    code = "authentication_failed"
    http_status = 401


# --- ordered groups (additive, broker engineer) ------------------------------
class InconsistentGroupProtocolError(IllegalStateError):
    """A joining member shares no protocol (or protocol type) with the group."""

    code = "inconsistent_group_protocol"


class InvalidSessionTimeoutError(InvalidRequestError):
    code = "invalid_session_timeout"


class FencedInstanceIdError(IllegalStateError):
    """A static member (group.instance.id) was replaced by a newer instance."""

    code = "fenced_instance_id"


class NonEmptyGroupError(IllegalStateError):
    code = "non_empty_group"


# --- storage faults (additive, storage-damage helper) ------------------------
class PartitionFailedError(StorageError):
    """An fdatasync of this partition failed: it acknowledges nothing until a restart.

    Linux may drop the dirty pages of a failed fsync and report the next one clean
    (PostgreSQL's "fsyncgate"), so the data written before it cannot be called durable.
    Keeps code ``storage_error`` so every protocol answers its retriable storage error.
    """


# --- share groups and KIP-848 consumer groups (additive, kafka4 helper) -------
class FencedMemberEpochError(IllegalStateError):
    """A group member sent an epoch older than its current one."""

    code = "fenced_member_epoch"


class StaleMemberEpochError(IllegalStateError):
    code = "stale_member_epoch"


class UnreleasedInstanceIdError(IllegalStateError):
    """A static member's instance id is still held by an active member."""

    code = "unreleased_instance_id"


class GroupLimitError(IllegalStateError):
    """Too many members in a group, or too many groups."""

    code = "group_max_size_reached"


class ShareSessionNotFoundError(IllegalStateError):
    code = "share_session_not_found"


class InvalidShareSessionEpochError(IllegalStateError):
    code = "invalid_share_session_epoch"


class ShareSessionLimitError(IllegalStateError):
    """As many share sessions are open as the broker keeps (KIP-932's cache bound)."""

    code = "share_session_limit_reached"


class InvalidRecordStateError(IllegalStateError):
    """A share member settled a record it does not hold (or whose lock expired)."""

    code = "invalid_record_state"


class InvalidRegularExpressionError(InvalidRequestError):
    code = "invalid_regular_expression"


class UnsupportedAssignorError(InvalidRequestError):
    code = "unsupported_assignor"


# --- security (issue 10, authcore) ---------------------------------------------
class AuthorizationError(OperatingError):
    """Authenticated, but not allowed (HTTP 403, AMQP ACCESS_REFUSED, Kafka
    *_AUTHORIZATION_FAILED)."""

    code = "access_refused"
    http_status = 403
