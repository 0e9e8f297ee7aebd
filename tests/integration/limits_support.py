"""Helpers for the listener-limit tests: raw sockets, awaiting a close, a process's RSS."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

CLOSE_WAIT_S = 10  # the bound on awaiting a close the server must make far sooner


async def closed_by_peer(reader: asyncio.StreamReader, timeout_s: float = CLOSE_WAIT_S) -> bytes:
    """Read until the server closes; returns what it sent first. Times out if it never does."""
    received = bytearray()
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                chunk = await reader.read(1 << 16)
            except ConnectionResetError:
                return bytes(received)
            if not chunk:
                return bytes(received)
            received += chunk


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def kafka_frame_start(announced_bytes: int, sent: bytes = b"") -> bytes:
    """The start of a Kafka frame: its size, an ApiVersions v0 header, then ``sent``."""
    header = struct.pack(">hhih", 18, 0, 1, 4) + b"test"
    return struct.pack(">i", announced_bytes) + header + sent


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
