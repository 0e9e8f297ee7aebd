"""Goal: the transaction index answers the LSO, the aborted transactions of a range and
whether a record was aborted, and rebuilds the same from the log's batches.

Method: pure; batches built with the storage codec (data batches with the transactional
bit, markers with build_control_batch), offsets patched as the log would.
"""

from __future__ import annotations

from conveyor.broker.txn_index import TransactionIndex, batches_below
from conveyor.storage.control_batch import build_control_batch
from conveyor.storage.record_batch import RecordData, build_batch, patch_base_offset


def at(offset: int, batch: bytes) -> bytes:
    patched = bytearray(batch)
    patch_base_offset(patched, offset)
    return bytes(patched)


def data(offset: int, producer_id: int, count: int = 1) -> bytes:
    return at(offset, build_batch([RecordData(None, b"v", (), 0)] * count,
                                  producer_id=producer_id, producer_epoch=0,
                                  base_sequence=0, is_transactional=True))


def marker(offset: int, producer_id: int, commit: bool) -> bytes:
    return at(offset, build_control_batch(producer_id, 0, commit, 0, 0))


def test_lso_and_aborted_ranges() -> None:
    index = TransactionIndex()
    assert index.stable_offset("t", 0, 10) == 10
    assert index.observe_data("t", 0, 1, 0)
    assert not index.observe_data("t", 0, 1, 1)  # same transaction
    assert index.observe_data("t", 0, 2, 2)
    assert index.stable_offset("t", 0, 5) == 0
    index.observe_marker("t", 0, 1, 3, commit=False)
    assert index.stable_offset("t", 0, 5) == 2
    index.observe_marker("t", 0, 2, 4, commit=True)
    assert index.stable_offset("t", 0, 5) == 5
    assert index.aborted_between("t", 0, 0, 5) == [(1, 0)]
    assert index.aborted_between("t", 0, 4, 5) == []  # ended before the range
    assert index.is_aborted("t", 0, 1, 1) and not index.is_aborted("t", 0, 2, 2)
    assert not index.is_aborted("t", 0, 1, 4)
    index.observe_marker("t", 0, 9, 6, commit=False)  # a marker ending nothing
    assert index.aborted_between("t", 0, 0, 10) == [(1, 0)]


def test_rebuild_matches_what_was_observed() -> None:
    log = [data(0, 1, 2), data(2, 2), marker(3, 1, False), data(4, 3), marker(5, 2, True),
           at(6, build_batch([RecordData(None, b"plain", (), 0)]))]
    index = TransactionIndex()
    index.rebuild("t", 0, [b"".join(log[:3]), b"".join(log[3:])])
    assert index.stable_offset("t", 0, 7) == 4  # producer 3 still open
    assert index.aborted_between("t", 0, 0, 7) == [(1, 0)]
    assert index.open_transactions() == [("t", 0, 3, 4)]
    assert batches_below(b"".join(log), 4) == b"".join(log[:3])
    assert batches_below(b"".join(log), 0) == b""
