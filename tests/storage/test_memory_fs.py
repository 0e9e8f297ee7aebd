"""MemoryFileSystem: the fault model itself (durable vs pending bytes and names, ENOSPC).

Method: write, sync and crash with seeded randomness; check what survives.
"""

from __future__ import annotations

import errno
import random

import pytest

from conveyor.testing.memory_fs import MemoryFileSystem


def test_crash_keeps_durable_bytes_and_a_prefix_of_pending() -> None:
    for seed in range(50):
        fs = MemoryFileSystem()
        fs.make_dirs("/d")
        handle = fs.open("/d/f", create=True)
        fs.fsync_dir("/d")
        fs.pwrite(handle, b"durable", 0)
        fs.fdatasync(handle)
        fs.pwrite(handle, b"-pending-bytes", 7)
        fs.crash(random.Random(seed), flip_bits=False)
        data = fs.pread(fs.open("/d/f"), 100, 0)
        assert data.startswith(b"durable") and b"durable-pending-bytes".startswith(data)


def test_unsynced_names_vanish_in_a_crash() -> None:
    fs = MemoryFileSystem()
    fs.make_dirs("/d")
    fs.close(fs.open("/d/kept", create=True))
    fs.fsync_dir("/d")
    fs.close(fs.open("/d/lost", create=True))
    fs.rename("/d/kept", "/d/renamed")
    fs.crash(random.Random(1))
    assert fs.list_dir("/d") == ["kept"]


def test_full_disk_writes_a_prefix_then_raises_enospc() -> None:
    fs = MemoryFileSystem()
    fs.make_dirs("/d")
    handle = fs.open("/d/f", create=True)
    fs.free_bytes = 4
    with pytest.raises(OSError) as caught:
        fs.pwrite(handle, b"abcdefgh", 0)
    assert caught.value.errno == errno.ENOSPC
    assert fs.pread(handle, 10, 0) == b"abcd"
    fs.truncate(handle, 0)
    assert fs.free_bytes == 4
