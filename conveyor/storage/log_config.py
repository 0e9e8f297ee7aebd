"""LogConfig: the settings of one partition log, and the policy vocabularies they use.

Owns: ``CleanupPolicy`` and ``FsyncPolicy`` (the one definition of each; the broker's
TopicConfig reuses them) and the validation of a LogConfig. Imports nothing else of
storage, so partition_log, compaction and log_store can all depend on it without a circle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from conveyor.errors import InvalidConfigError

CleanupPolicy = Literal["delete", "compact", "work-queue"]
FsyncPolicy = Literal["always", "interval", "never"]
CLEANUP_POLICIES: tuple[str, ...] = get_args(CleanupPolicy)
FSYNC_POLICIES: tuple[str, ...] = get_args(FsyncPolicy)


@dataclass(frozen=True, slots=True)
class LogConfig:
    segment_bytes: int = 1 << 30
    segment_ms: int = 7 * 24 * 3600 * 1000
    retention_ms: int = 7 * 24 * 3600 * 1000  # -1: keep forever
    retention_bytes: int = -1  # -1: no size limit
    cleanup_policy: CleanupPolicy = "delete"
    fsync: FsyncPolicy = "always"
    fsync_interval_ms: int = 1000
    index_interval_bytes: int = 4096
    delete_retention_ms: int = 24 * 3600 * 1000
    min_compaction_lag_ms: int = 0

    def __post_init__(self) -> None:
        if self.cleanup_policy not in CLEANUP_POLICIES:
            raise InvalidConfigError("unknown cleanup policy", cleanup_policy=self.cleanup_policy)
        if self.fsync not in FSYNC_POLICIES:
            raise InvalidConfigError("unknown fsync policy", fsync=self.fsync)
        if self.segment_bytes <= 0 or self.index_interval_bytes <= 0:
            raise InvalidConfigError("sizes must be positive", segment_bytes=self.segment_bytes)
