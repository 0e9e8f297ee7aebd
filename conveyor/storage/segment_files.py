"""Segment file names and the suffix states that make file replacement crash-safe.

Owns: the 20-digit base-offset file names (zero-padded so ``ls`` sorts them
numerically), the partition directory name ``<topic>-<partition>`` and the atomic
replace used by compaction. Knows nothing of file contents.

Suffix states: ``<base>.log.cleaned`` is a compaction output still being written (on
recovery: delete it); ``<base>.log.swap`` is a complete output (on recovery: finish the
swap by renaming it over ``<base>.log``).
"""

from __future__ import annotations

import posixpath

from conveyor.storage.fs import FileSystem

LOG_SUFFIX = ".log"
OFFSET_INDEX_SUFFIX = ".index"
TIME_INDEX_SUFFIX = ".timeindex"
CLEANED_SUFFIX = ".cleaned"
SWAP_SUFFIX = ".swap"
LOG_START_OFFSET_FILE = "log-start-offset"


def file_prefix(base_offset: int) -> str:
    return f"{base_offset:020d}"


def log_path(directory: str, base_offset: int) -> str:
    return posixpath.join(directory, file_prefix(base_offset) + LOG_SUFFIX)


def offset_index_path(directory: str, base_offset: int) -> str:
    return posixpath.join(directory, file_prefix(base_offset) + OFFSET_INDEX_SUFFIX)


def time_index_path(directory: str, base_offset: int) -> str:
    return posixpath.join(directory, file_prefix(base_offset) + TIME_INDEX_SUFFIX)


def base_offset_of(name: str) -> int | None:
    """The base offset a ``<20 digits>.log`` name stands for, else None."""
    stem, dot, suffix = name.partition(".")
    if len(stem) != 20 or not stem.isdigit() or dot + suffix != LOG_SUFFIX:
        return None
    return int(stem)


def partition_directory(root: str, topic: str, partition: int) -> str:
    return posixpath.join(root, f"{topic}-{partition}")


def parse_partition_directory(name: str) -> tuple[str, int] | None:
    topic, dash, number = name.rpartition("-")
    if not dash or not topic or not number.isdigit():
        return None
    return topic, int(number)


def write_file_atomically(fs: FileSystem, directory: str, name: str, data: bytes) -> None:
    """Write ``name`` via a temporary file, fdatasync, rename and directory fsync."""
    temporary = posixpath.join(directory, name + ".tmp")
    handle = fs.open(temporary, create=True)
    try:
        fs.truncate(handle, 0)
        fs.pwrite(handle, data, 0)
        fs.fdatasync(handle)
    finally:
        fs.close(handle)
    fs.rename(temporary, posixpath.join(directory, name))
    fs.fsync_dir(directory)
