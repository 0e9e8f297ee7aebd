"""Goal: the broker-free parts of the handlers behave: SASL/PLAIN checking, listener
settings, error-code mapping, building any response version, ApiVersions.

Method: call the pure functions directly and round-trip responses through kio.
"""

from __future__ import annotations

import datetime

import pytest
from kafka_wire import parse_response

from conveyor.errors import (
    CorruptRecordError,
    InvalidConfigError,
    OperatingError,
    RecordTooLargeError,
    UnknownMemberError,
    UnknownTopicError,
)
from conveyor.protocols.kafka import error_codes
from conveyor.protocols.kafka.codec import ServerCodec
from conveyor.protocols.kafka.framing import RequestHeader, is_flexible
from conveyor.protocols.kafka.handlers import api_versions_response
from conveyor.protocols.kafka.messages import SUPPORTED_VERSIONS, response_class
from conveyor.protocols.kafka.responses import build, millis, nested
from conveyor.protocols.kafka.sasl import check_plain
from conveyor.protocols.kafka.settings import load_settings

USERS = {"alice": "secret"}


@pytest.mark.parametrize(("token", "user"), [
    (b"\x00alice\x00secret", "alice"),
    (b"alice\x00alice\x00secret", "alice"),
    (b"bob\x00alice\x00secret", None),  # authorizing as someone else
    (b"\x00alice\x00wrong", None),
    (b"\x00nobody\x00secret", None),
    (b"alice\x00secret", None),
    (b"\x00\xff\x00secret", None),
])
def test_check_plain(token: bytes, user: str | None) -> None:
    assert check_plain(token, USERS) == user


def test_settings_defaults_and_validation() -> None:
    settings = load_settings({})
    assert not settings.sasl_enabled and settings.frame_bytes_max == 100 * 1024 * 1024
    assert load_settings({"sasl_users": USERS}).sasl_enabled
    for bad in ({"frame_bytes_max": -1}, {"nonsense": 1}, {"sasl_users": ["alice"]},
                {"fetch_wait_ms_max": True}, {"cluster_id": ""}):
        with pytest.raises(InvalidConfigError):
            load_settings(bad)


@pytest.mark.parametrize(("error", "code"), [
    (CorruptRecordError("x"), error_codes.CORRUPT_MESSAGE),
    (RecordTooLargeError("x"), error_codes.MESSAGE_TOO_LARGE),
    (UnknownTopicError("x"), error_codes.UNKNOWN_TOPIC_OR_PARTITION),
    (UnknownMemberError("x"), error_codes.UNKNOWN_MEMBER_ID),
    (OperatingError("x"), error_codes.UNKNOWN_SERVER_ERROR),
])
def test_error_mapping(error: OperatingError, code: int) -> None:
    assert error_codes.error_code_for(error) == code
    assert error_codes.code(code) == code


def test_build_drops_fields_a_version_lacks_and_converts_types() -> None:
    for version in (0, 9):
        response_type = response_class(11, version)
        built = build(response_type, error_code=error_codes.MEMBER_ID_REQUIRED,
                      generation_id=-1, protocol_type=None, protocol_name="",
                      leader="", member_id="m", members=(), skip_assignment=False)
        assert built.error_code == error_codes.MEMBER_ID_REQUIRED
        assert not hasattr(built, "skip_assignment") or built.skip_assignment is False
    with pytest.raises(TypeError):
        build(response_class(12, 0))  # error_code has no default
    assert millis(datetime.timedelta(seconds=2)) == 2000
    member_type = nested(response_class(11, 9), "JoinGroupResponseMember")
    assert member_type.__name__ == "JoinGroupResponseMember"


@pytest.mark.parametrize("version", range(0, 4))
def test_api_versions_advertises_the_table(version: int) -> None:
    header = RequestHeader(18, version, 3, "c", is_flexible(18, version))
    data = ServerCodec().send(header, api_versions_response(version))
    correlation_id, parsed = parse_response(data[4:], 18, version)
    assert correlation_id == 3 and parsed.error_code == 0
    assert {entry.api_key: (entry.min_version, entry.max_version)
            for entry in parsed.api_keys} == SUPPORTED_VERSIONS
