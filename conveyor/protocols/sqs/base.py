"""What every SQS action shares: queue URLs and ARNs, receipt handles, the catalog.

Owns: resolving a QueueUrl (or the query protocol's request path)
to a Conveyor queue, the account id and region in URLs and ARNs, and receipt
handles: the broker's receipt plus an HMAC under a key drawn from ``secrets`` at
start, so a handle cannot be forged or guessed; the broker's receipt token changes on
every receive, so each receive hands out a new handle, and a handle stops working
once its lock is gone (the broker says so).
Must not know: sockets, HTTP framing, JSON/XML (codec.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from conveyor.broker.shared_groups import parse_receipt
from conveyor.errors import UnknownDeliveryError
from conveyor.protocols.sqs.catalog import QueueCatalog
from conveyor.protocols.sqs.errors import (
    QueueDoesNotExist,
    ReceiptHandleIsInvalid,
)
from conveyor.protocols.sqs.move_tasks import MoveTasks
from conveyor.protocols.sqs.receive_attempts import ReceiveAttempts

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker

ACCOUNT_ID_DEFAULT: Final = "000000000000"  # what LocalStack and moto answer with
REGION_DEFAULT: Final = "us-east-1"
_MAC_BYTES: Final = 16


class MessageIds:
    """UUID-shaped message ids: a random 64-bit prefix drawn at start and a counter, so
    they are unique without a random draw per message (uuid4 was a visible cost)."""

    def __init__(self) -> None:
        prefix = secrets.token_hex(8)
        self._prefix = f"{prefix[:8]}-{prefix[8:12]}-{prefix[12:16]}-"
        self._counter = secrets.randbits(32) << 32

    def next_id(self) -> str:
        self._counter += 1
        text = f"{self._counter & 0xFFFF_FFFF_FFFF_FFFF:016x}"
        return f"{self._prefix}{text[:4]}-{text[4:]}"


@dataclass(slots=True)
class RequestContext:
    """What an action may know about its connection."""

    host: str  # the Host header the client used (queue URLs point back at it)
    disconnected: asyncio.Event
    path: str = "/"  # the query protocol may name the queue by its URL's path
    scheme: str = "http"  # "https" when the client came over TLS


class SqsBase:
    def __init__(self, broker: Broker, account_id: str = ACCOUNT_ID_DEFAULT,
                 region: str = REGION_DEFAULT, default_host: str = "127.0.0.1:9324") -> None:
        self.broker = broker
        self.account_id = account_id
        self.region = region
        self.default_host = default_host
        self.catalog = QueueCatalog(broker)
        self._mac_key = secrets.token_bytes(32)
        self.purged_at_ms: dict[str, int] = {}  # queue -> monotonic ms of its last purge
        self.move_tasks = MoveTasks(broker)  # DLQ redrive tasks
        # (queue, partition, offset) -> wall ms of its first receive (bounded, oldest out)
        self.first_receive_ms: dict[tuple[str, int, int], int] = {}
        self.attempts = ReceiveAttempts(broker)  # FIFO ReceiveRequestAttemptId answers
        self.message_ids = MessageIds()
        self.receive_counter = 0  # names each receive's consumer (released alone if it ends)

    # --- queues, URLs, ARNs ------------------------------------------------------------
    def queue_url(self, name: str, context: RequestContext) -> str:
        return f"{context.scheme}://{context.host or self.default_host}/{self.account_id}/{name}"

    def queue_arn(self, name: str) -> str:
        return f"arn:aws:sqs:{self.region}:{self.account_id}:{name}"

    def queue_exists(self, name: str) -> bool:
        return self.broker.queue_exists(name)

    def resolve_queue(self, params: dict[str, Any], context: RequestContext) -> str:
        """The queue named by QueueUrl (or the request path); QueueDoesNotExist."""
        url = params.get("QueueUrl")
        if url is None and context.path.strip("/"):
            url = context.path
        if not isinstance(url, str) or not url:
            from conveyor.protocols.sqs.errors import MissingParameter

            raise MissingParameter("The request must contain the parameter QueueUrl.")
        try:
            name = urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1] if "/" in url else url
        except ValueError:  # not a URL (an unbalanced "[" reads as a bad IPv6 host)
            raise QueueDoesNotExist("The specified queue does not exist.") from None
        if not self.queue_exists(name):
            raise QueueDoesNotExist("The specified queue does not exist.")
        return name

    def queue_from_arn(self, arn: str) -> str:
        name = arn.rsplit(":", 1)[-1]
        if arn.count(":") < 5 or not self.queue_exists(name):
            from conveyor.protocols.sqs.errors import ResourceNotFoundException

            raise ResourceNotFoundException("The resource that you specified for the "
                                            "SourceArn parameter doesn't exist.")
        return name

    # --- receipt handles ---------------------------------------------------------------
    def use_receipt_key(self, key: bytes) -> None:
        """Several nodes (docs/cluster.md): one key for all, so a handle received from
        one node deletes the message through any other (a load balancer in front)."""
        self._mac_key = key

    def receipt_handle(self, receipt: str) -> str:
        raw = receipt.encode()
        mac = hmac.digest(self._mac_key, raw, hashlib.sha256)[:_MAC_BYTES]
        return base64.urlsafe_b64encode(mac + raw).decode()

    def broker_receipt(self, handle: Any, queue: str) -> str:
        """The broker receipt inside a handle of ``queue``; ReceiptHandleIsInvalid."""
        invalid = ReceiptHandleIsInvalid(f"The input receipt handle \"{str(handle)[:100]}\" "
                                         "is not a valid receipt handle.")
        if not isinstance(handle, str) or not handle or len(handle) > 4096:
            raise invalid
        try:
            data = base64.urlsafe_b64decode(handle.encode())
        except (binascii.Error, ValueError):
            raise invalid from None
        mac, raw = data[:_MAC_BYTES], data[_MAC_BYTES:]
        expected = hmac.digest(self._mac_key, raw, hashlib.sha256)[:_MAC_BYTES]
        if not hmac.compare_digest(mac, expected):
            raise invalid
        receipt = raw.decode()
        try:
            group, topic, *_ = parse_receipt(receipt)
        except UnknownDeliveryError:
            raise invalid from None
        if (group, topic) != (queue, queue):
            raise invalid  # a handle of another queue
        return receipt

