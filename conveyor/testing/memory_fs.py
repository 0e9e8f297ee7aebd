"""MemoryFileSystem: an in-memory FileSystem with the fault model of a real disk.

Owns the simulated disk used by storage tests. Each file keeps its ``durable`` bytes
(what survives a crash: the content at its last ``fdatasync``) and its current bytes;
each directory keeps its durable set of names (as of its last ``fsync_dir``).
``crash(rng)`` forgets everything not durable: a file keeps its durable bytes plus a
random prefix of any bytes appended since (a torn write), possibly with flipped bits
in that tail; names created, renamed or removed since the last ``fsync_dir`` revert.
``free_bytes`` simulates a full disk: a write past it writes a prefix and raises
``OSError(errno.ENOSPC)``. Thread-safe (``fdatasync`` may run in a worker thread).
"""

from __future__ import annotations

import errno
import posixpath
import random
import threading
from dataclasses import dataclass, field


@dataclass(eq=False)
class _MemoryFile:
    data: bytearray = field(default_factory=bytearray)
    durable: bytes = b""


class MemoryFileSystem:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[str, _MemoryFile] = {}
        self._durable_names: dict[str, _MemoryFile] = {}
        self._directories: set[str] = {"/"}
        self._handles: dict[int, _MemoryFile] = {}
        self._next_handle = 1
        self.free_bytes: int | None = None  # None: unlimited
        self.fdatasync_count = 0
        self.write_count = 0
        # fault injection: the next N fdatasyncs raise OSError(EIO) and, as Linux may,
        # drop the dirty bytes' durability (they stay readable until a crash)
        self.fdatasync_errors = 0

    # --- files -------------------------------------------------------------------------
    def open(self, path: str, *, create: bool = False) -> int:
        path = posixpath.normpath(path)
        with self._lock:
            file = self._files.get(path)
            if file is None:
                if not create:
                    raise FileNotFoundError(errno.ENOENT, "no such file", path)
                if posixpath.dirname(path) not in self._directories:
                    raise FileNotFoundError(errno.ENOENT, "no such directory", path)
                file = self._files[path] = _MemoryFile()
            handle = self._next_handle
            self._next_handle += 1
            self._handles[handle] = file
            return handle

    def close(self, handle: int) -> None:
        with self._lock:
            del self._handles[handle]

    def pwrite(self, handle: int, data: bytes | bytearray | memoryview, position: int) -> None:
        with self._lock:
            file = self._handles[handle]
            payload = bytes(data)
            growth = max(0, position + len(payload) - len(file.data))
            full = self.free_bytes is not None and growth > self.free_bytes
            if full:
                assert self.free_bytes is not None
                payload = payload[: max(0, len(file.data) - position) + self.free_bytes]
                growth = max(0, position + len(payload) - len(file.data))
            if position > len(file.data):
                file.data.extend(bytes(position - len(file.data)))
            file.data[position : position + len(payload)] = payload
            self.write_count += 1
            if self.free_bytes is not None:
                self.free_bytes -= growth
            if full:
                raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    def append(self, handle: int, data: bytes | bytearray | memoryview) -> int:
        position = self.size(handle)
        self.pwrite(handle, data, position)
        return position

    def pread(self, handle: int, size: int, position: int) -> bytes:
        with self._lock:
            return bytes(self._handles[handle].data[position : position + size])

    def fdatasync(self, handle: int) -> None:
        with self._lock:
            file = self._handles[handle]
            if self.fdatasync_errors > 0:
                self.fdatasync_errors -= 1
                raise OSError(errno.EIO, "Input/output error (simulated fdatasync failure)")
            file.durable = bytes(file.data)
            self.fdatasync_count += 1

    def truncate(self, handle: int, size: int) -> None:
        with self._lock:
            file = self._handles[handle]
            if self.free_bytes is not None:
                self.free_bytes += max(0, len(file.data) - size)
            del file.data[size:]
            file.data.extend(bytes(max(0, size - len(file.data))))

    def size(self, handle: int) -> int:
        with self._lock:
            return len(self._handles[handle].data)

    def fileno(self, handle: int) -> int:
        return -1

    # --- names -------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        path = posixpath.normpath(path)
        with self._lock:
            return path in self._files or path in self._directories

    def rename(self, source: str, destination: str) -> None:
        source, destination = posixpath.normpath(source), posixpath.normpath(destination)
        with self._lock:
            if source not in self._files:
                raise FileNotFoundError(errno.ENOENT, "no such file", source)
            self._files[destination] = self._files.pop(source)

    def remove(self, path: str) -> None:
        path = posixpath.normpath(path)
        with self._lock:
            if path not in self._files:
                raise FileNotFoundError(errno.ENOENT, "no such file", path)
            del self._files[path]

    def make_dirs(self, path: str) -> None:
        path = posixpath.normpath(path)
        with self._lock:
            while path not in self._directories:
                self._directories.add(path)
                path = posixpath.dirname(path)

    def list_dir(self, path: str) -> list[str]:
        path = posixpath.normpath(path)
        with self._lock:
            if path not in self._directories:
                raise FileNotFoundError(errno.ENOENT, "no such directory", path)
            names = {posixpath.basename(name) for name in self._files
                     if posixpath.dirname(name) == path}
            names |= {posixpath.basename(name) for name in self._directories
                      if name != path and posixpath.dirname(name) == path}
            return sorted(names)

    def remove_dir(self, path: str) -> None:
        with self._lock:
            self._directories.discard(posixpath.normpath(path))

    def fsync_dir(self, path: str) -> None:
        path = posixpath.normpath(path)
        with self._lock:
            for name in [name for name in self._durable_names if posixpath.dirname(name) == path]:
                del self._durable_names[name]
            for name, file in self._files.items():
                if posixpath.dirname(name) == path:
                    self._durable_names[name] = file

    # --- faults ------------------------------------------------------------------------
    def crash(self, rng: random.Random, *, flip_bits: bool = True) -> None:
        """Lose everything not durable; keep a random, possibly corrupted, torn tail."""
        with self._lock:
            self._handles.clear()
            self._files = dict(self._durable_names)
            # in path order: a set of files iterates by id(), so the rng's draws went to
            # files in a different order each run and a seed did not replay
            files = {id(file): file for _, file in sorted(self._files.items())}
            for file in files.values():
                file.data = bytearray(_surviving_bytes(file, rng, flip_bits))
                file.durable = bytes(file.data)

    def durable_bytes(self, path: str) -> bytes:
        with self._lock:
            return self._files[posixpath.normpath(path)].durable


def _surviving_bytes(file: _MemoryFile, rng: random.Random, flip_bits: bool) -> bytes:
    current = bytes(file.data)
    if not current.startswith(file.durable):
        return rng.choice([file.durable, current])  # an overwrite or truncate: all or nothing
    pending = current[len(file.durable) :]
    kept = bytearray(pending[: rng.randint(0, len(pending))])
    if kept and flip_bits and rng.random() < 0.3:
        bit = rng.randrange(len(kept) * 8)
        kept[bit // 8] ^= 1 << (bit % 8)
    return file.durable + bytes(kept)
