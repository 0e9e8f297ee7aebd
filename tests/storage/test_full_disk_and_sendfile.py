"""A full disk fails only the append that hit it; read slices work with os.sendfile.

Method: set MemoryFileSystem.free_bytes so a write tears, check StorageFullError, that
the partial write was truncated and that earlier acks read back; then serve a slice
through a real socketpair with os.sendfile from an OsFileSystem store.
"""

from __future__ import annotations

import os
import socket

import pytest
from storage_helpers import make_batch, values_of

from conveyor.errors import StorageFullError
from conveyor.storage.fs import OsFileSystem
from conveyor.storage.log_store import FileLogStore, LogConfig
from conveyor.testing.clock import SimClock
from conveyor.testing.memory_fs import MemoryFileSystem


async def test_enospc_fails_the_append_and_keeps_acknowledged_data(clock: SimClock) -> None:
    fs = MemoryFileSystem()
    store = FileLogStore("/data", fs, clock)
    await store.open()
    log = await store.create_partition("t", 0, LogConfig())
    for index in range(5):
        await log.append(make_batch([b"%d" % index]))
    size_before = log.active_segment.size_bytes
    fs.free_bytes = 30  # less than one batch
    with pytest.raises(StorageFullError) as caught:
        await log.append(make_batch([b"too big" * 10]))
    assert caught.value.code == "storage_full"
    assert log.active_segment.size_bytes == size_before
    assert fs.size(log.active_segment.handle) == size_before  # partial write truncated
    assert log.high_watermark == 5
    fs.free_bytes = None  # space freed: appends continue at the next offset
    assert (await log.append(make_batch([b"5"]))).base_offset == 5
    await store.close()
    reopened = FileLogStore("/data", fs, clock)
    await reopened.open()
    assert reopened.recovery_reports == []
    assert values_of(reopened.partition("t", 0).read(0, 10**6).read_bytes()) == [
        (i, b"%d" % i) for i in range(6)]


async def test_slice_parts_work_with_sendfile(tmp_path: os.PathLike[str], clock: SimClock) -> None:
    store = FileLogStore(str(tmp_path), OsFileSystem(), clock)
    await store.open()
    log = await store.create_partition("t", 0, LogConfig())
    for index in range(10):
        await log.append(make_batch([b"record-%d" % index]))
    piece = log.read(3, 10**6)
    assert piece.size_bytes > 0 and all(fileno >= 0 for fileno, _, _ in piece.parts)
    sender, receiver = socket.socketpair()
    with sender, receiver:
        for fileno, position, size in piece.parts:
            sent = 0
            while sent < size:
                sent += os.sendfile(sender.fileno(), fileno, position + sent, size - sent)
        received = b""
        while len(received) < piece.size_bytes:
            received += receiver.recv(65536)
    assert received == piece.read_bytes()
    assert values_of(received) == [(i, b"record-%d" % i) for i in range(3, 10)]
    await store.close()
