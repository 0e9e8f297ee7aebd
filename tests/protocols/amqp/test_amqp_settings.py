"""The AMQP listener's settings: defaults follow RabbitMQ 4, limits are validated."""

from __future__ import annotations

import pytest

from conveyor.errors import InvalidConfigError
from conveyor.protocols.amqp.settings import MESSAGE_BYTES_CEILING, load_settings


def test_message_size_defaults_to_rabbitmq_4s_16_mib() -> None:
    assert load_settings({}).message_bytes_max == 16 << 20


def test_message_size_is_configurable_up_to_128_mib_and_no_further() -> None:
    assert load_settings({"message_bytes_max": 128 << 20}).message_bytes_max == 128 << 20
    assert MESSAGE_BYTES_CEILING == 128 << 20
    with pytest.raises(InvalidConfigError):
        load_settings({"message_bytes_max": (128 << 20) + 1})
