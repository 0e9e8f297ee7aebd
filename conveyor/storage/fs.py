"""FileSystem: the one seam between storage/ and the disk.

Owns: the small set of file operations the log needs (positional reads and writes,
fdatasync, truncate, rename, directory listing and directory fsync) and
``OsFileSystem``, the real implementation over ``os`` file descriptors.
``conveyor.testing.memory_fs.MemoryFileSystem`` is the simulated one (crashes, torn
writes, a full disk).

Contract: a write is durable only after ``fdatasync`` of its handle; a create, rename
or remove is durable only after ``fsync_dir`` of its directory. A full disk raises
``OSError(errno.ENOSPC)`` from ``pwrite`` (possibly after writing a prefix). Handles are
ints; ``fileno`` gives an OS descriptor usable with ``os.sendfile`` or -1 when there is
none. Not thread-safe except ``fdatasync``, which may run in a worker thread.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, Final, Protocol, TypeVar

T = TypeVar("T")


class FileSystem(Protocol):
    def open(self, path: str, *, create: bool = False) -> int:
        """Open ``path`` for reading and writing; ``create`` makes it if missing."""
        ...

    def close(self, handle: int) -> None: ...

    def pwrite(self, handle: int, data: bytes | bytearray | memoryview, position: int) -> None:
        """Write all of ``data`` at ``position`` (raises OSError ENOSPC on a full disk)."""
        ...

    def append(self, handle: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at the end of the file; return the position it was written at."""
        ...

    def pread(self, handle: int, size: int, position: int) -> bytes:
        """Up to ``size`` bytes from ``position`` (fewer at the end of the file)."""
        ...

    def fdatasync(self, handle: int) -> None: ...

    def truncate(self, handle: int, size: int) -> None: ...

    def size(self, handle: int) -> int: ...

    def fileno(self, handle: int) -> int:
        """An OS file descriptor for os.sendfile, or -1 when the file is not on a real disk."""
        ...

    def exists(self, path: str) -> bool: ...

    def rename(self, source: str, destination: str) -> None:
        """Atomically replace ``destination`` with ``source``."""
        ...

    def remove(self, path: str) -> None: ...

    def make_dirs(self, path: str) -> None: ...

    def list_dir(self, path: str) -> list[str]:
        """Names (not paths) of the entries of ``path``, sorted."""
        ...

    def remove_dir(self, path: str) -> None: ...

    def fsync_dir(self, path: str) -> None:
        """Make creates, renames and removes inside ``path`` durable."""
        ...


class OsFileSystem:
    """The real disk, through os file descriptors (handle == descriptor)."""

    def open(self, path: str, *, create: bool = False) -> int:
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        return os.open(path, flags, 0o644)

    def close(self, handle: int) -> None:
        os.close(handle)

    def pwrite(self, handle: int, data: bytes | bytearray | memoryview, position: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(handle, view, position)
            view = view[written:]
            position += written

    def append(self, handle: int, data: bytes | bytearray | memoryview) -> int:
        position = os.fstat(handle).st_size
        self.pwrite(handle, data, position)
        return position

    def pread(self, handle: int, size: int, position: int) -> bytes:
        return os.pread(handle, size, position)

    def fdatasync(self, handle: int) -> None:
        os.fdatasync(handle)

    def truncate(self, handle: int, size: int) -> None:
        os.ftruncate(handle, size)

    def size(self, handle: int) -> int:
        return os.fstat(handle).st_size

    def fileno(self, handle: int) -> int:
        return handle

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def rename(self, source: str, destination: str) -> None:
        os.replace(source, destination)

    def remove(self, path: str) -> None:
        os.remove(path)

    def make_dirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def list_dir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def remove_dir(self, path: str) -> None:
        os.rmdir(path)

    def fsync_dir(self, path: str) -> None:
        descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


# --- blocking calls off the event loop: the only place storage/ hands work to a thread ----
def fdatasync_descriptor(descriptor: int) -> None:
    """fdatasync of a descriptor opened outside the seam (SQLite's WAL file)."""
    os.fdatasync(descriptor)


def fdatasync_descriptor_in_thread(descriptor: int) -> asyncio.Future[None]:
    """``fdatasync_descriptor`` in the loop's default executor; the future of its end."""
    return asyncio.get_running_loop().run_in_executor(None, fdatasync_descriptor, descriptor)


def call_in_thread(function: Callable[..., T], *arguments: Any) -> asyncio.Future[T]:
    """A blocking file call (a checkpoint, an fdatasync pass) in the loop's default
    executor, started now; the future of its end."""
    return asyncio.get_running_loop().run_in_executor(None, function, *arguments)


# --- the durability passes' threads ----------------------------------------------------
# Process-wide, shared by every loop: a pass hands a list of jobs over and gets the
# result back with one ``loop.call_soon_threadsafe``. ``run_in_executor`` costs more per
# hand-over — a concurrent Future (a Condition), its asyncio twin (``wrap_future``) and a
# loop turn between the two (bench/README.md, "Fifth pass (httpreq)": a publish of batch 1
# took 5.0 loop turns, now 4.0).
SYNC_THREADS_MAX: Final = 8  # idle threads are reused; a pass uses at most 5 at once
_Done = Callable[[Any, BaseException | None], None]
_Item = tuple[asyncio.AbstractEventLoop, Callable[[Any], Any], Any, _Done]


class _SyncThreads:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Fresh state; also in a forked child, where the parent's threads are not."""
        self._items: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._lock = threading.Lock()  # a C lock: cheaper than a Semaphore's Condition
        self._threads = 0
        self._pending = 0  # items handed over and not finished

    def start(self, item: _Item) -> None:
        with self._lock:
            self._pending += 1
            more = self._pending > self._threads and self._threads < SYNC_THREADS_MAX
            if more:
                self._threads += 1
        if more:
            threading.Thread(target=self._work, name="conveyor-sync", daemon=True).start()
        self._items.put(item)

    def _work(self) -> None:
        while True:
            loop, function, argument, done = self._items.get()
            result, failure = None, None
            try:
                result = function(argument)
            except BaseException as error:  # handed to the loop, which decides
                failure = error
            with self._lock:
                self._pending -= 1
            try:
                loop.call_soon_threadsafe(done, result, failure)
            except RuntimeError:
                pass  # the loop closed meanwhile: nobody waits for this pass
            del loop, function, argument, done, result, failure


_sync_threads = _SyncThreads()
os.register_at_fork(after_in_child=_sync_threads.reset)


def start_in_thread(function: Callable[[T], Any], argument: T, done: _Done) -> None:
    """``function(argument)`` in a durability thread, started now; then, on the running
    loop, ``done(result, None)``, or ``done(None, error)`` if it raised."""
    _sync_threads.start((asyncio.get_running_loop(), function, argument, done))


async def in_thread(function: Callable[..., T], *arguments: Any) -> T:
    """Run a blocking file-system call (an fdatasync pass) in a worker thread."""
    return await asyncio.to_thread(function, *arguments)
