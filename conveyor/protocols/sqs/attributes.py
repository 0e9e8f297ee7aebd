"""SQS queue and message attributes: validation, defaults, MD5 digests, QueueConfig.

Owns: which queue attributes exist and their ranges (AWS's documented limits), how
they map onto the broker's ``QueueConfig``, message-attribute validation, and the
MD5 digests SQS returns (MD5OfMessageBody, MD5OfMessageAttributes,
MD5OfMessageSystemAttributes), computed as AWS documents them.
Must not know: sockets, the wire protocols, the broker's internals.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from conveyor.broker.types import QueueConfig
from conveyor.protocols.sqs.errors import (
    InvalidAttributeName,
    InvalidAttributeValue,
    InvalidMessageContents,
    InvalidParameterValue,
)

QUEUE_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,80}")  # AWS: 80 chars incl. ".fifo"
FIFO_SUFFIX: Final = ".fifo"
MESSAGE_ATTRIBUTES_MAX: Final = 10  # AWS: up to 10 message attributes
ATTRIBUTE_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,256}")
DATA_TYPE: Final = re.compile(r"(String|Number|Binary)(\.[^\s]{1,256})?")
# XML 1.0 characters, the set AWS accepts in bodies and string values.
_INVALID_CHARACTERS: Final = re.compile(
    "[^\x09\x0a\x0d\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_INVALID_ASCII: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")  # the same, ASCII text
MESSAGE_BYTES_MAX: Final = 1 << 20  # AWS raised the maximum to 1 MiB (2025)

# name -> (default, minimum, maximum) for integer attributes, AWS's documented ranges.
_INTEGER_ATTRIBUTES: Final = {
    "DelaySeconds": (0, 0, 900),
    "MaximumMessageSize": (262_144, 1024, MESSAGE_BYTES_MAX),
    "MessageRetentionPeriod": (345_600, 60, 1_209_600),
    "ReceiveMessageWaitTimeSeconds": (0, 0, 20),
    "VisibilityTimeout": (30, 0, 43_200),
    "KmsDataKeyReusePeriodSeconds": (300, 60, 86_400),
}
_TEXT_ATTRIBUTES: Final = frozenset({"Policy", "KmsMasterKeyId", "RedrivePolicy",
                                     "RedriveAllowPolicy"})
_BOOLEAN_ATTRIBUTES: Final = frozenset({"SqsManagedSseEnabled", "ContentBasedDeduplication",
                                        "FifoQueue"})
_FIFO_ONLY: Final = {"ContentBasedDeduplication": None,
                     "DeduplicationScope": ("messageGroup", "queue"),
                     "FifoThroughputLimit": ("perQueue", "perMessageGroupId")}
READ_ONLY: Final = frozenset({
    "QueueArn", "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed", "CreatedTimestamp", "LastModifiedTimestamp",
})
SETTABLE: Final = (frozenset(_INTEGER_ATTRIBUTES) | _TEXT_ATTRIBUTES | _BOOLEAN_ATTRIBUTES
                   | frozenset(_FIFO_ONLY))
ALL_NAMES: Final = SETTABLE | READ_ONLY


def is_fifo(name: str) -> bool:
    return name.endswith(FIFO_SUFFIX)


def validate_queue_name(name: Any) -> str:
    if not isinstance(name, str):
        raise InvalidParameterValue("QueueName must be a string.")
    base = name[: -len(FIFO_SUFFIX)] if is_fifo(name) else name
    if len(name) > 80 or not QUEUE_NAME.fullmatch(base):
        raise InvalidParameterValue(
            "Can only include alphanumeric characters, hyphens, or underscores. "
            "1 to 80 in length")
    return name


@dataclass(frozen=True, slots=True)
class Redrive:
    dead_letter_queue: str  # queue name from deadLetterTargetArn
    max_receive_count: int


def parse_redrive(text: str) -> Redrive:
    try:
        policy = json.loads(text)
        arn = policy["deadLetterTargetArn"]
        count = int(policy["maxReceiveCount"])
    except (ValueError, KeyError, TypeError):
        raise InvalidParameterValue(
            f"Value {text} for parameter RedrivePolicy is invalid. Reason: Redrive policy "
            "is not a valid JSON map with deadLetterTargetArn and maxReceiveCount.") from None
    if not isinstance(arn, str) or arn.count(":") < 5 or not 1 <= count <= 1000:
        raise InvalidParameterValue(
            f"Value {text} for parameter RedrivePolicy is invalid. Reason: "
            "deadLetterTargetArn must be a queue ARN and maxReceiveCount 1 to 1000.")
    return Redrive(arn.rsplit(":", 1)[1], count)


def normalise_attributes(values: Any, fifo: bool, creating: bool) -> dict[str, str]:
    """Validate settable attributes; returns them as strings (AWS's representation)."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise InvalidParameterValue("Attributes must be a map of names to strings.")
    result: dict[str, str] = {}
    for name, value in values.items():
        if name not in SETTABLE:
            raise InvalidAttributeName(f"Unknown Attribute {name}.")
        if not isinstance(value, str):
            value = str(value).lower() if isinstance(value, bool) else str(value)
        if name in _INTEGER_ATTRIBUTES:
            _default, low, high = _INTEGER_ATTRIBUTES[name]
            if not re.fullmatch(r"[0-9]{1,10}", value) or not low <= int(value) <= high:
                raise InvalidAttributeValue(f"Invalid value for the parameter {name}.")
            value = str(int(value))
        elif name in _BOOLEAN_ATTRIBUTES:
            if value.lower() not in ("true", "false"):
                raise InvalidAttributeValue(f"Invalid value for the parameter {name}.")
            value = value.lower()
        if name == "FifoQueue" and (not creating or (value == "true") != fifo):
            raise InvalidAttributeValue(
                "The name of a FIFO queue can only include alphanumeric characters, hyphens,"
                " or underscores, must end with .fifo suffix." if creating else
                "Invalid value for the parameter FifoQueue: it cannot be changed.")
        if name in _FIFO_ONLY and not fifo:
            raise InvalidAttributeName(f"Unknown Attribute {name}.")
        allowed = _FIFO_ONLY.get(name)
        if allowed is not None and value not in allowed:
            raise InvalidAttributeValue(f"Invalid value for the parameter {name}.")
        if name == "RedrivePolicy" and value:
            parse_redrive(value)
        result[name] = value
    return result


def with_defaults(attributes: Mapping[str, str], fifo: bool) -> dict[str, str]:
    full = {name: str(default) for name, (default, _low, _high)
            in _INTEGER_ATTRIBUTES.items() if name != "KmsDataKeyReusePeriodSeconds"}
    full["SqsManagedSseEnabled"] = "false"
    if fifo:
        full.update(FifoQueue="true", ContentBasedDeduplication="false",
                    DeduplicationScope="queue", FifoThroughputLimit="perQueue")
    full.update(attributes)
    return full


def queue_config(attributes: Mapping[str, str], fifo: bool, partitions: int = 1) -> QueueConfig:
    """The broker's QueueConfig for a queue with these (defaulted) attributes."""
    full = with_defaults(attributes, fifo)
    redrive_text = full.get("RedrivePolicy", "")
    redrive = parse_redrive(redrive_text) if redrive_text else None
    return QueueConfig(
        visibility_timeout_ms=int(full["VisibilityTimeout"]) * 1000,
        max_deliveries=redrive.max_receive_count if redrive else 0,
        dead_letter_topic=redrive.dead_letter_queue if redrive else "",
        message_ttl_ms=int(full["MessageRetentionPeriod"]) * 1000,
        delay_ms=int(full["DelaySeconds"]) * 1000,
        fifo=fifo,
        partitions=partitions,
    )


def attributes_from_config(config: QueueConfig) -> dict[str, str]:
    """Attributes of a queue declared over another protocol (no SQS metadata)."""
    result = {
        "VisibilityTimeout": str(config.visibility_timeout_ms // 1000),
        "DelaySeconds": str(min(config.delay_ms // 1000, 900)),
    }
    if config.message_ttl_ms is not None:
        result["MessageRetentionPeriod"] = str(config.message_ttl_ms // 1000)
    return result


# --- message attributes -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MessageAttribute:
    name: str
    data_type: str
    value: bytes  # UTF-8 text for String/Number, raw bytes for Binary

    @property
    def is_binary(self) -> bool:
        return self.data_type.startswith("Binary")

    def to_wire(self) -> dict[str, str]:
        if self.is_binary:
            return {"DataType": self.data_type,
                    "BinaryValue": base64.b64encode(self.value).decode()}
        return {"DataType": self.data_type, "StringValue": self.value.decode()}


def check_text(text: str, what: str) -> None:
    invalid = (_INVALID_ASCII if text.isascii() else _INVALID_CHARACTERS).search(text)
    if invalid:
        raise InvalidMessageContents(
            f"Invalid characters found in {what}. Valid characters are #x9 | #xA | #xD | "
            "#x20 to #xD7FF | #xE000 to #xFFFD | #x10000 to #x10FFFF")


def parse_message_attributes(values: Any, system: bool = False) -> list[MessageAttribute]:
    if values is None:
        return []
    if not isinstance(values, dict):
        raise InvalidParameterValue("MessageAttributes must be a map.")
    if len(values) > MESSAGE_ATTRIBUTES_MAX:
        raise InvalidParameterValue(
            f"Number of message attributes [{len(values)}] exceeds the allowed maximum "
            f"[{MESSAGE_ATTRIBUTES_MAX}].")
    result = [_one_attribute(name, value, system) for name, value in values.items()]
    return sorted(result, key=lambda attribute: attribute.name)


def _one_attribute(name: Any, value: Any, system: bool) -> MessageAttribute:
    if not isinstance(name, str) or not ATTRIBUTE_NAME.fullmatch(name) or (
            not system and (name.lower().startswith(("aws.", "amazon."))
                            or ".." in name or name.startswith(".") or name.endswith("."))):
        raise InvalidParameterValue(f"Message attribute name '{name}' is invalid.")
    if system and name != "AWSTraceHeader":
        raise InvalidParameterValue(f"Message system attribute name '{name}' is invalid.")
    if not isinstance(value, dict):
        raise InvalidParameterValue(f"Message attribute '{name}' must be a map.")
    data_type = value.get("DataType")
    if not isinstance(data_type, str) or not DATA_TYPE.fullmatch(data_type):
        raise InvalidParameterValue(
            f"The message attribute '{name}' has an invalid message attribute type, the set "
            "of supported type prefixes is Binary, Number, and String.")
    if data_type.startswith("Binary"):
        raw = value.get("BinaryValue")
        if not isinstance(raw, str):
            raise InvalidParameterValue(
                f"The message attribute '{name}' with type 'Binary' must use field "
                "'Binary'.")
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidParameterValue(f"Message attribute '{name}' is not base64.") from None
        return MessageAttribute(name, data_type, data)
    text = value.get("StringValue")
    if not isinstance(text, str):
        raise InvalidParameterValue(
            f"The message attribute '{name}' with type '{data_type.split('.')[0]}' must use "
            "field 'String'.")
    check_text(text, f"the message attribute '{name}'")
    if data_type.startswith("Number") and not _is_number(text):
        raise InvalidParameterValue(
            f"Could not cast message attribute '{name}' value to number.")
    return MessageAttribute(name, data_type, text.encode())


def _is_number(text: str) -> bool:
    return re.fullmatch(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", text) is not None


def attributes_size_bytes(attributes: list[MessageAttribute]) -> int:
    return sum(len(a.name.encode()) + len(a.data_type.encode()) + len(a.value)
               for a in attributes)


def md5_of_body(body: str) -> str:
    return hashlib.md5(body.encode(), usedforsecurity=False).hexdigest()


def md5_of_attributes(attributes: list[MessageAttribute]) -> str:
    """AWS's digest: for each attribute sorted by name, the 4-byte big-endian length and
    bytes of the name and of the data type, a transport byte (1 text, 2 binary), then the
    length and bytes of the value."""
    digest = hashlib.md5(usedforsecurity=False)
    for attribute in sorted(attributes, key=lambda a: a.name):
        for part in (attribute.name.encode(), attribute.data_type.encode()):
            digest.update(struct.pack(">I", len(part)) + part)
        digest.update(b"\x02" if attribute.is_binary else b"\x01")
        digest.update(struct.pack(">I", len(attribute.value)) + attribute.value)
    return digest.hexdigest()
