"""The AMQP listener's own settings (the ``[listeners.amqp]`` config section).

Owns: reading and validating the settings mapping the server hands to
``start_listener``. Every limit ends in its unit and cites its precedent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from conveyor.config import LISTENER_LIMIT_NAMES
from conveyor.errors import InvalidConfigError


@dataclass(frozen=True, slots=True)
class AmqpSettings:
    # user -> password for PLAIN / AMQPLAIN; RabbitMQ's default user guest/guest.
    users: dict[str, str] = field(default_factory=lambda: {"guest": "guest"})
    vhosts: tuple[str, ...] = ("/",)  # all share one namespace (docs/amqp.md)
    frame_bytes_max: int = 131_072  # RabbitMQ's frame_max default (128 KiB)
    channel_max: int = 2_047  # RabbitMQ's channel_max default
    heartbeat_s: int = 60  # RabbitMQ's heartbeat default
    # Largest message body: RabbitMQ 4's max_message_size default (16 MiB); configurable up
    # to MESSAGE_BYTES_CEILING.
    message_bytes_max: int = 16 << 20
    consumer_timeout_ms: int = 30 * 60 * 1000  # RabbitMQ's consumer_timeout (30 min)
    handshake_timeout_ms: int = 10_000  # RabbitMQ's handshake_timeout
    close_timeout_ms: int = 3_000  # wait for Close-Ok after a hard error
    # Unprocessed input per connection before it stops reading its own socket.
    inbox_bytes_max: int = 64 << 20
    # Unprocessed input over all connections before a publishing connection stops reading
    # (RabbitMQ's memory high-water mark, but only the publishers that add to it wait).
    memory_high_watermark_bytes: int = 256 << 20


# The largest message_bytes_max that may be configured (128 MiB): the broker's record
# ceiling (BrokerSettings.record_bytes_max) leaves room above it for the properties.
MESSAGE_BYTES_CEILING = 128 << 20

_INTS = ("frame_bytes_max", "channel_max", "heartbeat_s", "message_bytes_max",
         "consumer_timeout_ms", "handshake_timeout_ms", "close_timeout_ms", "inbox_bytes_max",
         "memory_high_watermark_bytes")
_MINIMUM = {"frame_bytes_max": 4096, "channel_max": 1, "message_bytes_max": 1,
            "inbox_bytes_max": 1 << 16, "memory_high_watermark_bytes": 1 << 16}


def load_settings(settings: Mapping[str, Any]) -> AmqpSettings:
    known = {"users", "vhosts", *_INTS, *LISTENER_LIMIT_NAMES}  # config.listener_limits
    unknown = sorted(set(settings) - known)
    if unknown:
        raise InvalidConfigError("unknown amqp listener settings", names=unknown)
    values: dict[str, Any] = {}
    for name in _INTS:
        if name in settings:
            value = settings[name]
            minimum = _MINIMUM.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise InvalidConfigError(f"amqp.{name} must be an integer >= {minimum}",
                                         value=value)
            values[name] = value
    if values.get("message_bytes_max", 0) > MESSAGE_BYTES_CEILING:
        raise InvalidConfigError(f"amqp.message_bytes_max must be <= {MESSAGE_BYTES_CEILING}",
                                 value=values["message_bytes_max"])
    if values.get("channel_max", 0) > 65_535:
        raise InvalidConfigError("amqp.channel_max must be <= 65535")
    if "users" in settings:
        users = settings["users"]
        if not isinstance(users, Mapping) or not all(
            isinstance(name, str) and isinstance(password, str)
            for name, password in users.items()
        ):
            raise InvalidConfigError("amqp.users must map user names to passwords")
        values["users"] = dict(users)
    if "vhosts" in settings:
        vhosts = settings["vhosts"]
        if isinstance(vhosts, str) or not all(isinstance(name, str) for name in vhosts):
            raise InvalidConfigError("amqp.vhosts must be a list of names")
        values["vhosts"] = tuple(vhosts)
    return AmqpSettings(**values)
