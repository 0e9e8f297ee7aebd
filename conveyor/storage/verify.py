"""Offline verification of a data directory: ``conveyor verify DATA_DIR`` (issue 9).

Like Kafka's ``DumpLogSegments --verify``: every batch of every segment is CRC-checked,
every index is checked against its log, each partition's ``log-config.json`` is
parsed, and the state database gets ``PRAGMA quick_check``. Reads only; changes
nothing (a running server's start-up recovery is what repairs).

Severity: ``damage`` is data that readers skip or recovery truncates (exit non-zero);
``repairable`` is derived data rebuilt at start (indexes), reported for information.
"""

from __future__ import annotations

import json
import posixpath
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from conveyor.storage import segment_files
from conveyor.storage.damage import check_batch, resync
from conveyor.storage.fs import FileSystem, OsFileSystem
from conveyor.storage.segment import BatchScan, Segment


@dataclass(frozen=True, slots=True)
class Finding:
    severity: Literal["damage", "repairable"]
    path: str
    position: int  # byte position in the file (-1: the whole file)
    problem: str
    first_offset: int = -1
    next_offset: int = -1
    size_bytes: int = 0

    def to_document(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class VerifyReport:
    findings: tuple[Finding, ...]
    segments: int
    batches: int
    bytes_checked: int

    @property
    def damaged(self) -> bool:
        return any(finding.severity == "damage" for finding in self.findings)


def verify_segment(fs: FileSystem, directory: str, base_offset: int,
                   findings: list[Finding]) -> tuple[int, int]:
    """Scan one segment; append findings; return (batches, bytes) checked."""
    segment = Segment.open(fs, directory, base_offset, index_interval_bytes=4096,
                           created_ms=0)
    try:
        size, position, batches, next_offset = segment.size_bytes, 0, 0, base_offset
        while position < size:
            scan = BatchScan(fs, segment.handle, position, size, validate=True)
            for _, header in scan:
                batches += 1
                next_offset = header.last_offset + 1
            if scan.position >= size:
                break
            checked = check_batch(fs, segment.handle, scan.position, size)
            reason = checked if isinstance(checked, str) else "bad batch"
            found = resync(fs, segment.handle, scan.position, size, next_offset)
            resume = found[0] if found else size
            findings.append(Finding(
                "damage", segment.log_path, scan.position,
                f"corrupt batch ({reason})" if found else f"corrupt or torn tail ({reason})",
                next_offset, found[1].base_offset if found else -1, resume - scan.position))
            position = resume
        if not segment.load_indexes():
            findings.append(Finding("repairable", segment.log_path, -1,
                                    "offset/time index missing or inconsistent "
                                    "(rebuilt from the log at start)"))
        return batches, size
    finally:
        segment.close()


def _check_config(fs: FileSystem, directory: str, findings: list[Finding]) -> None:
    path = posixpath.join(directory, "log-config.json")
    if not fs.exists(path):
        findings.append(Finding("repairable", path, -1, "missing (defaults apply)"))
        return
    handle = fs.open(path)
    try:
        json.loads(fs.pread(handle, fs.size(handle), 0))
    except ValueError as error:
        findings.append(Finding("damage", path, -1, f"not JSON: {error}"))
    finally:
        fs.close(handle)


def check_state(path: Path, findings: list[Finding]) -> None:
    if not path.exists():
        findings.append(Finding("repairable", str(path), -1,
                                "missing (topics and queues are rebuilt from the logs)"))
        return
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = [str(row[0]) for row in connection.execute("PRAGMA quick_check")]
        finally:
            connection.close()
    except sqlite3.DatabaseError as error:
        rows = [str(error)]
    if rows != ["ok"]:
        findings.extend(Finding("damage", str(path), -1, f"quick_check: {row}")
                        for row in rows[:20])


def verify_data_dir(data_dir: Path, fs: FileSystem | None = None) -> VerifyReport:
    fs = fs or OsFileSystem()
    findings: list[Finding] = []
    segments = batches = bytes_checked = 0
    root = str(data_dir / "logs")
    names = fs.list_dir(root) if fs.exists(root) else []
    for name in names:
        if segment_files.parse_partition_directory(name) is None:
            continue
        directory = posixpath.join(root, name)
        _check_config(fs, directory, findings)
        bases = sorted(base for base in map(segment_files.base_offset_of, fs.list_dir(directory))
                       if base is not None)
        for base_offset in bases:
            counted, size = verify_segment(fs, directory, base_offset, findings)
            segments, batches, bytes_checked = segments + 1, batches + counted, \
                bytes_checked + size
    check_state(data_dir / "state.sqlite3", findings)
    return VerifyReport(tuple(findings), segments, batches, bytes_checked)
