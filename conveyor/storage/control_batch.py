"""Transaction markers: the control batches Kafka writes to end a transaction.

A control batch has the transactional and control bits set in its attributes and
one record whose key is (version 0, type: 0 = ABORT, 1 = COMMIT) and whose value
is (version 0, coordinator epoch), both big-endian, as Kafka's EndTransactionMarker.
Readers other than Kafka clients never see these records (broker/fetcher.py).
"""

from __future__ import annotations

import struct
from typing import Final

from conveyor.storage.record_batch import Record, RecordData, build_batch

CONTROL_ABORT: Final = 0
CONTROL_COMMIT: Final = 1
_KEY = struct.Struct(">hh")
_VALUE = struct.Struct(">hi")


def build_control_batch(producer_id: int, producer_epoch: int, commit: bool,
                        coordinator_epoch: int, timestamp_ms: int) -> bytes:
    key = _KEY.pack(0, CONTROL_COMMIT if commit else CONTROL_ABORT)
    value = _VALUE.pack(0, coordinator_epoch)
    return build_batch([RecordData(key, value, (), timestamp_ms)], producer_id=producer_id,
                       producer_epoch=producer_epoch, is_transactional=True, is_control=True)


def control_type(record: Record) -> int | None:
    """CONTROL_COMMIT / CONTROL_ABORT of a control record; None when its key is not one."""
    if record.key is None or len(record.key) < _KEY.size:
        return None
    return int(_KEY.unpack_from(record.key)[1])
