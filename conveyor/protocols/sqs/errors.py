"""SQS's own errors: each carries the JSON ``__type`` name, the legacy query code and
the HTTP status AWS answers with, and how broker errors map onto them.

The legacy code is what the query protocol puts in ``<Code>`` and what the JSON
protocol repeats in the ``x-amzn-query-error`` header (``Code;Sender``) so that
botocore, whose SQS model is ``awsQueryCompatible``, raises the classic codes
such as ``AWS.SimpleQueueService.NonExistentQueue``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from conveyor.errors import (
    ConveyorError,
    IllegalStateError,
    LimitExceededError,
    NotFoundError,
    OperatingError,
    PreconditionFailedError,
    RecordTooLargeError,
    StorageError,
    UnavailableError,
)


class SqsError(OperatingError):
    """An error answered in SQS's shape; ``code`` is the JSON protocol's type name."""

    code = "InvalidParameterValue"
    query_code: ClassVar[str] = "InvalidParameterValue"
    http_status = 400
    sender: ClassVar[bool] = True  # "Sender" or "Receiver" fault

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message, **details)
        self.aws_message = message


def _error(name: str, query_code: str | None = None, status: int = 400,
           sender: bool = True) -> type[SqsError]:
    return type(name, (SqsError,), {
        "code": name, "query_code": query_code or name, "http_status": status,
        "sender": sender, "__module__": __name__,
    })


_SQS = "AWS.SimpleQueueService."
InvalidParameterValue = _error("InvalidParameterValue")
MissingParameter = _error("MissingParameter")
InvalidAction = _error("InvalidAction")
InvalidAttributeName = _error("InvalidAttributeName")
InvalidAttributeValue = _error("InvalidAttributeValue", "InvalidParameterValue")
InvalidMessageContents = _error("InvalidMessageContents")
InvalidBatchEntryId = _error("InvalidBatchEntryId", _SQS + "InvalidBatchEntryId")
QueueDoesNotExist = _error("QueueDoesNotExist", _SQS + "NonExistentQueue")
QueueNameExists = _error("QueueNameExists", "QueueAlreadyExists")
QueueDeletedRecently = _error("QueueDeletedRecently", _SQS + "QueueDeletedRecently")
ReceiptHandleIsInvalid = _error("ReceiptHandleIsInvalid")
MessageNotInflight = _error("MessageNotInflight", _SQS + "MessageNotInflight")
TooManyEntriesInBatchRequest = _error("TooManyEntriesInBatchRequest",
                                      _SQS + "TooManyEntriesInBatchRequest")
EmptyBatchRequest = _error("EmptyBatchRequest", _SQS + "EmptyBatchRequest")
BatchEntryIdsNotDistinct = _error("BatchEntryIdsNotDistinct",
                                  _SQS + "BatchEntryIdsNotDistinct")
BatchRequestTooLong = _error("BatchRequestTooLong", _SQS + "BatchRequestTooLong")
PurgeQueueInProgress = _error("PurgeQueueInProgress", _SQS + "PurgeQueueInProgress", 403)
OverLimit = _error("OverLimit", status=403)
UnsupportedOperation = _error("UnsupportedOperation", _SQS + "UnsupportedOperation")
ResourceNotFoundException = _error("ResourceNotFoundException")
RequestThrottled = _error("RequestThrottled", status=403)
ServiceUnavailable = _error("ServiceUnavailable", status=503, sender=False)
InternalError = _error("InternalError", status=500, sender=False)


def from_conveyor(error: ConveyorError) -> SqsError:
    """The SQS error for a broker/storage error that reached an action."""
    if isinstance(error, SqsError):
        return error
    message = str(error)
    if isinstance(error, NotFoundError):
        return QueueDoesNotExist("The specified queue does not exist.")
    if isinstance(error, RecordTooLargeError | LimitExceededError):
        return InvalidParameterValue(message)
    if isinstance(error, PreconditionFailedError | IllegalStateError):
        return InvalidParameterValue(message)
    if isinstance(error, UnavailableError | StorageError):
        return ServiceUnavailable(message)  # a server fault (full disk...): SDKs retry it
    if isinstance(error, OperatingError):
        return InvalidParameterValue(message)
    return InternalError("internal error")

# Authentication and authorization (SigV4, issue 10); AWS's common errors.
MissingAuthenticationToken = _error("MissingAuthenticationToken", status=403)
IncompleteSignature = _error("IncompleteSignature")
InvalidClientTokenId = _error("InvalidClientTokenId", status=403)
SignatureDoesNotMatch = _error("SignatureDoesNotMatch", status=403)
RequestExpired = _error("RequestExpired")
AccessDenied = _error("AccessDenied", status=403)
