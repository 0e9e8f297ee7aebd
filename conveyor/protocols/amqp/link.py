"""What an AMQP channel and its handlers share: errors, the connection link, helpers.

Owns: ``ChannelError`` (a soft error: the channel closes) and ``ConnectionError_``
(a hard one: the connection closes), ``ChannelLink`` (the connection as a channel
sees it: the adapter implements it), and two small helpers. No I/O of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from pamqp import base as pamqp_base

from conveyor.errors import NotFoundError, UnknownTopicError

from .machine import PublishReceived
from .server import AmqpServer

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker
    from conveyor.security.api import Principal

REPLY_TO_QUEUE = "amq.rabbitmq.reply-to"


class ChannelError(Exception):
    """Close the channel with ``reply_code`` (a soft error)."""

    def __init__(self, reply_code: int, text: str, class_id: int = 0, method_id: int = 0):
        super().__init__(text)
        self.reply_code, self.text = reply_code, text
        self.class_id, self.method_id = class_id, method_id


class ConnectionError_(Exception):
    """Close the connection with ``reply_code`` (a hard error)."""

    def __init__(self, reply_code: int, text: str, class_id: int = 0, method_id: int = 0):
        super().__init__(text)
        self.reply_code, self.text = reply_code, text
        self.class_id, self.method_id = class_id, method_id


def method_ids(method: pamqp_base.Frame) -> tuple[int, int]:
    index = method.index
    return index >> 16, index & 0xFFFF


def is_stream(broker: Broker, topic: str) -> bool:
    """A plain topic (not a queue) is served as a RabbitMQ stream."""
    try:
        return broker.get_topic(topic).kind == "topic"
    except (UnknownTopicError, NotFoundError):
        return False


class ChannelLink(Protocol):
    """The connection as its channels see it."""

    server: AmqpServer
    connection_id: int
    frame_bytes_max: int
    user: str
    principal: Principal | None
    vhost: str
    writing_paused: bool
    exclusive_queues: set[str]

    def send_method(self, channel: int, method: pamqp_base.Frame) -> None: ...

    def write_parts(self, parts: list[bytes]) -> None: ...

    def capability(self, name: str) -> bool: ...

    def fail(self, reply_code: int, text: str, class_id: int = 0, method_id: int = 0,
             machine_closing: bool = False) -> None: ...

    def inbox_drained(self, batch: list[PublishReceived]) -> None: ...

    def channel_closing(self, number: int) -> None: ...

    def forget_channel(self, number: int, channel: object) -> None: ...
