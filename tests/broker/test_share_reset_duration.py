"""Goal: share.auto.offset.reset=by_duration:<ISO-8601 duration> parses as Java's
Duration.parse does for the non-negative day/hour/minute/second forms, and nothing else.

Method: pure calls of ``by_duration_ms`` and ``validate``.
"""

from __future__ import annotations

import pytest

from conveyor.broker.group_configs import by_duration_ms, validate
from conveyor.errors import InvalidConfigError


@pytest.mark.parametrize(("value", "millis"), [
    ("by_duration:PT1H", 3_600_000), ("by_duration:P1DT0.5S", 86_400_500),
    ("by_duration:PT0S", 0), ("by_duration:pt15m", 900_000), ("by_duration:P2D", 172_800_000),
    ("by_duration:PT1H30M15.123456S", 5_415_123)])
def test_durations_that_parse(value: str, millis: int) -> None:
    assert by_duration_ms(value) == millis
    validate("share.auto.offset.reset", value)


@pytest.mark.parametrize("value", ["by_duration:", "by_duration:PT", "by_duration:P1Y",
                                   "by_duration:PT-1S", "by_duration:P1DT", "earliest",
                                   "by_duration:PT1.S", "by_duration:P1D2H"])
def test_durations_that_do_not(value: str) -> None:
    assert by_duration_ms(value) is None
    if value != "earliest":
        with pytest.raises(InvalidConfigError):
            validate("share.auto.offset.reset", value)
