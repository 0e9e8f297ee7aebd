"""GroupConfigs: the per-group configs Kafka 4 keeps for share and consumer groups.

Owns: the names a GROUP config resource accepts (``share.*`` for share groups,
KIP-932; ``consumer.*`` for KIP-848 consumer groups), their defaults (Kafka 4.2's
broker defaults), validation, and persistence in its own table through the
StateStore. Both coordinators read their settings here; the Kafka admin
handlers describe and alter them.

Must not know: the wire format, sockets, files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final

from conveyor.errors import InvalidConfigError
from conveyor.storage.state_store import StateStore

# Name -> default (Kafka 4.2's group.share.* / group.consumer.* broker defaults).
DEFAULTS: Final[dict[str, str]] = {
    "share.auto.offset.reset": "latest",
    "share.isolation.level": "read_uncommitted",
    "share.record.lock.duration.ms": "30000",
    "share.session.timeout.ms": "45000",
    "share.heartbeat.interval.ms": "5000",
    "share.delivery.count.limit": "5",
    "consumer.session.timeout.ms": "45000",
    "consumer.heartbeat.interval.ms": "5000",
}
# (low, high) for the integer configs. Kafka bounds the share lock duration by the
# broker's 15 s..60 s; Conveyor allows 1 s..1 h (a test or a slow worker may want either).
INT_RANGES: Final[dict[str, tuple[int, int]]] = {
    "share.record.lock.duration.ms": (1_000, 3_600_000),
    "share.session.timeout.ms": (1_000, 3_600_000),
    "share.heartbeat.interval.ms": (100, 600_000),
    "share.delivery.count.limit": (1, 100),
    "consumer.session.timeout.ms": (1_000, 3_600_000),
    "consumer.heartbeat.interval.ms": (100, 600_000),
}
CHOICES: Final[dict[str, tuple[str, ...]]] = {
    "share.auto.offset.reset": ("latest", "earliest"),
    # No transactions in Conveyor: every record is committed, both levels read the same.
    "share.isolation.level": ("read_uncommitted", "read_committed"),
}
# share.auto.offset.reset=by_duration:<ISO-8601 duration> (KIP-1106): java.time.Duration's
# PnDTnHnMn.nS, non-negative; the group starts at the first record at most that old.
BY_DURATION: Final = "by_duration:"
_DURATION = re.compile(r"P(?:(\d{1,9})D)?(?:T(?:(\d{1,9})H)?(?:(\d{1,9})M)?"
                       r"(?:(\d{1,12})(?:\.(\d{1,9}))?S)?)?")
_DURATION_CHARS_MAX: Final = 64


def by_duration_ms(value: str) -> int | None:
    """The milliseconds of a ``by_duration:<ISO-8601>`` reset (None: not such a value, or
    one that does not parse: ``P``, ``PT``, a sign, weeks or years are refused)."""
    if not value.startswith(BY_DURATION) or len(value) > _DURATION_CHARS_MAX:
        return None
    text = value[len(BY_DURATION):].upper()
    match = _DURATION.fullmatch(text)
    if match is None or text in ("P", "PT") or text.endswith("T"):
        return None
    days, hours, minutes, seconds, fraction = match.groups()
    total_s = (int(days or 0) * 86_400 + int(hours or 0) * 3_600 + int(minutes or 0) * 60
               + int(seconds or 0))
    return total_s * 1000 + int((fraction or "0").ljust(3, "0")[:3])


def validate(name: str, value: str | None) -> None:
    if name not in DEFAULTS:
        raise InvalidConfigError("unknown group config", name=name)
    if value is None:
        return
    if name in INT_RANGES:
        low, high = INT_RANGES[name]
        try:
            number = int(value)
        except ValueError:
            raise InvalidConfigError("not an integer", name=name, value=value) from None
        if not low <= number <= high:
            raise InvalidConfigError(f"must be in {low}..{high}", name=name, value=value)
    elif name == "share.auto.offset.reset" and value.startswith(BY_DURATION):
        if by_duration_ms(value) is None:
            raise InvalidConfigError("by_duration takes an ISO-8601 duration (PnDTnHnMn.nS)",
                                     name=name, value=value)
    elif value not in CHOICES[name]:
        raise InvalidConfigError(f"must be one of {CHOICES[name]}", name=name, value=value)


class GroupConfigs:
    """The group configs in memory, written through to the StateStore; ``load()`` at open."""

    def __init__(self, state_store: StateStore) -> None:
        self.state_store = state_store
        self.explicit: dict[str, dict[str, str]] = {}  # group -> configs set on it

    async def load(self) -> None:
        self.explicit = await self.state_store.load_group_configs()

    async def reload_group(self, group: str) -> None:
        """Read one group's configs again (a cluster node claiming the group: another
        node may have set them)."""
        found = (await self.state_store.load_group_configs()).get(group)
        if found is None:
            self.explicit.pop(group, None)
        else:
            self.explicit[group] = found

    def get(self, group: str) -> dict[str, str]:
        return {**DEFAULTS, **self.explicit.get(group, {})}

    def integer(self, group: str, name: str) -> int:
        return int(self.get(group)[name])

    def set_on(self, group: str) -> Mapping[str, str]:
        return self.explicit.get(group, {})

    async def alter(self, group: str, to_set: Mapping[str, str | None],
                    to_delete: Iterable[str], validate_only: bool = False) -> None:
        updated = dict(self.explicit.get(group, {}))
        for name, value in to_set.items():
            validate(name, value)
            if value is None:
                updated.pop(name, None)
            else:
                updated[name] = value
        for name in to_delete:
            validate(name, None)
            updated.pop(name, None)
        if validate_only:
            return
        self.explicit[group] = updated
        self.state_store.save_group_config(group, updated)
        await self.state_store.commit()

    async def forget(self, group: str) -> None:
        if self.explicit.pop(group, None) is not None:
            self.state_store.delete_group_config(group)
            await self.state_store.commit()
