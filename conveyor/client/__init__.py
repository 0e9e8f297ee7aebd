"""Conveyor's own Python client over the HTTP API: ``Client`` (blocking) and
``AsyncClient`` (asyncio), sharing the sans-IO core in core.py."""

from conveyor.client.aio import AsyncClient, AsyncMessage
from conveyor.client.core import (
    AckFailure,
    Acquired,
    ClientError,
    ConnectionFailedError,
    FetchResult,
    MessageData,
    PublishResult,
    RetryPolicy,
    ServerError,
    encode_message,
)
from conveyor.client.sync import Client, Message

__all__ = [
    "AckFailure", "Acquired", "AsyncClient", "AsyncMessage", "Client", "ClientError",
    "ConnectionFailedError", "FetchResult", "Message", "MessageData", "PublishResult",
    "RetryPolicy", "ServerError", "encode_message",
]
