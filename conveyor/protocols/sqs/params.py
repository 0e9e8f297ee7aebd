"""Typed access to an action's parameters, with AWS's errors for missing or wrong ones.

Both protocols arrive here in the JSON protocol's shape (codec.py rebuilt the
query protocol's flattened names), so one set of checks serves both.
"""

from __future__ import annotations

import re
from typing import Any, Final

from conveyor.protocols.sqs.errors import InvalidParameterValue, MissingParameter

BATCH_ENTRIES_MAX: Final = 10  # AWS: at most 10 entries per batch
BATCH_ENTRY_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,80}")


def required_str(params: dict[str, Any], name: str) -> str:
    value = params.get(name)
    if value is None or value == "":
        raise MissingParameter(f"The request must contain the parameter {name}.")
    if not isinstance(value, str):
        raise InvalidParameterValue(f"Value for parameter {name} must be a string.")
    return value


def optional_str(params: dict[str, Any], name: str) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidParameterValue(f"Value for parameter {name} must be a string.")
    return value


def optional_int(params: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameterValue(f"Value {value!r} for parameter {name} is invalid. "
                                    "Reason: must be an integer.")
    if not low <= value <= high:
        raise InvalidParameterValue(f"Value {value} for parameter {name} is invalid. "
                                    f"Reason: must be between {low} and {high}.")
    return value


def string_list(params: dict[str, Any], name: str) -> list[str]:
    value = params.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidParameterValue(f"Value for parameter {name} must be a list of strings.")
    return value


def string_map(params: dict[str, Any], name: str) -> dict[str, str]:
    value = params.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InvalidParameterValue(f"Value for parameter {name} must be a map of strings.")
    return value


def batch_entries(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Validated ``Entries``: 1..10 maps with distinct, well-formed ``Id``s."""
    from conveyor.protocols.sqs.errors import (
        BatchEntryIdsNotDistinct,
        EmptyBatchRequest,
        InvalidBatchEntryId,
        TooManyEntriesInBatchRequest,
    )

    entries = params.get("Entries")
    if entries is None or entries == []:
        raise EmptyBatchRequest("There should be at least one entry in the request.")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InvalidParameterValue("Entries must be a list of maps.")
    if len(entries) > BATCH_ENTRIES_MAX:
        raise TooManyEntriesInBatchRequest(
            f"Maximum number of entries per request are {BATCH_ENTRIES_MAX}. You have sent "
            f"{len(entries)}.")
    ids = []
    for entry in entries:
        entry_id = entry.get("Id")
        if not isinstance(entry_id, str) or not BATCH_ENTRY_ID.fullmatch(entry_id):
            raise InvalidBatchEntryId(
                "A batch entry id can only contain alphanumeric characters, hyphens and "
                "underscores. It can be at most 80 letters long.")
        ids.append(entry_id)
    if len(set(ids)) != len(ids):
        raise BatchEntryIdsNotDistinct("Two or more batch entries in the request have the "
                                       "same Id.")
    return entries
