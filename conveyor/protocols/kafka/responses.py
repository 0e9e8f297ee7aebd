"""Building kio response entities for any version from one set of values.

Owns: ``build(cls, **values)``, which keeps the values a version's dataclass has
(fields added or removed across versions are simply dropped or defaulted) and
converts plain ints to the types kio's writer expects (``ErrorCode``,
``timedelta`` for *_ms durations, ``datetime`` for timestamps); and
``nested(cls, name)`` to find the nested struct classes of the same version.
Handlers write one builder per API instead of one per version. Sans-IO.
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
from typing import Any

from kio.schema.errors import ErrorCode

from conveyor.protocols.kafka.messages import response_class

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


_FIELDS: dict[type[Any], dict[str, tuple[str | None, bool]]] = {}


def _fields(cls: type[Any]) -> dict[str, tuple[str | None, bool]]:
    """Field name -> (kafka_type, has_default), cached per class."""
    cached = _FIELDS.get(cls)
    if cached is not None:
        return cached
    result: dict[str, tuple[str | None, bool]] = {}
    for item in dataclasses.fields(cls):
        has_default = (
            item.default is not dataclasses.MISSING
            or item.default_factory is not dataclasses.MISSING
        )
        result[item.name] = (item.metadata.get("kafka_type"), has_default)
    _FIELDS[cls] = result
    return result


def _convert(kafka_type: str | None, value: Any) -> Any:
    if kafka_type == "error_code" and not isinstance(value, ErrorCode):
        return ErrorCode(int(value))
    if kafka_type in ("timedelta_i32", "timedelta_i64") and isinstance(value, int):
        return datetime.timedelta(milliseconds=value)
    if kafka_type == "datetime_i64" and isinstance(value, int):
        return None if value < 0 else _EPOCH + datetime.timedelta(milliseconds=value)
    return value


def build(cls: type[Any], **values: Any) -> Any:
    """An instance of ``cls`` from the values it has fields for; ``throttle_time`` defaults to 0."""
    fields = _fields(cls)
    arguments: dict[str, Any] = {}
    for name, (kafka_type, has_default) in fields.items():
        if name in values:
            arguments[name] = _convert(kafka_type, values[name])
        elif name == "throttle_time":
            arguments[name] = datetime.timedelta(0)
        elif not has_default:
            raise TypeError(f"{cls.__module__}.{cls.__name__} needs {name!r}")
    return cls(**arguments)


def nested(cls: type[Any], name: str) -> type[Any]:
    """The nested struct class ``name`` defined beside ``cls`` (same API version)."""
    found: type[Any] = getattr(sys.modules[cls.__module__], name)
    return found


def response(api_key: int, api_version: int, **values: Any) -> Any:
    return build(response_class(api_key, api_version), **values)


def millis(value: datetime.timedelta | int) -> int:
    """kio's durations (timedelta) back to milliseconds."""
    if isinstance(value, datetime.timedelta):
        return int(value / datetime.timedelta(milliseconds=1))
    return int(value)
