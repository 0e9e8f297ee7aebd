"""Supervisor: the owner of a component's long-lived background tasks.

Structured concurrency (Trio's rule, ``asyncio.TaskGroup``): a task belongs to the
component that waits for it. Short-lived concurrency uses ``async with
asyncio.TaskGroup()`` where it happens. A component whose tasks outlive one call
(the broker's timer, a topic auto-creation that several produces share, a
group-commit fsync pass) starts them here and, on shutdown, ``close()``s its
supervisor, which cancels what is asked to stop and awaits every task it started,
so none outlives its owner. The one place in conveyor/ that calls ``create_task``
outside a TaskGroup (tests/test_tidy.py holds everyone else to it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Supervisor:
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self, coroutine: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        """Run ``coroutine`` as a task owned by this supervisor."""
        task = asyncio.get_running_loop().create_task(coroutine, name=name or self.owner)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self, cancel: bool = False) -> None:
        """Await every task still running (cancelling them first when ``cancel``).

        Their outcomes belong to whoever awaited them; one nobody awaited is read
        here, so an error is never silently left on a task."""
        while self._tasks:
            tasks = list(self._tasks)
            if cancel:
                for task in tasks:
                    task.cancel()
            await asyncio.wait(tasks)
            for task in tasks:
                if not task.cancelled():
                    task.exception()


class StopSignal(asyncio.Event):
    """An ``asyncio.Event`` that also calls back when set, so ``unless_set`` can watch
    it without a task (a connection's "the client went away")."""

    def __init__(self) -> None:
        super().__init__()
        self._callbacks: list[Callable[[], None]] = []

    def set(self) -> None:
        super().set()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def add_callback(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def remove_callback(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._callbacks.remove(callback)


async def unless_set(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """Await ``work``; if ``stop`` is set first, cancel it and return None (or its
    result, if it finished despite the cancel: the caller releases it then).

    ``work`` runs in the caller's own task; setting ``stop`` cancels the caller. A
    ``StopSignal`` is watched by a callback, so the end of ``work`` is the return (a
    long-polled acquire's answer leaves in the turn its records arrive); any other
    event by a task of a TaskGroup (so it does not outlive this call), whose
    cancellation takes three loop turns. A second task for ``work`` raced by
    ``asyncio.wait`` took five (bench/README.md "Fifth pass (httpreq)"). An error of
    ``work`` is raised as itself."""
    task = asyncio.current_task()
    assert task is not None, "unless_set runs in a task"
    stopped = False

    def cancel_work() -> None:
        nonlocal stopped
        stopped = True
        task.cancel()

    if isinstance(stop, StopSignal):
        if stop.is_set():
            cancel_work()
        else:
            stop.add_callback(cancel_work)
        try:
            return await _stoppable(work, task, lambda: stopped)
        finally:
            stop.remove_callback(cancel_work)

    async def cancel_when_set() -> None:
        await stop.wait()
        cancel_work()

    result: T | None = None
    errors: list[Exception] = []  # raised after the group: inside, it would wrap them
    async with asyncio.TaskGroup() as group:
        watcher = group.create_task(cancel_when_set())
        try:
            result = await _stoppable(work, task, lambda: stopped)
        except Exception as error:
            errors.append(error)
        finally:
            watcher.cancel()
    if errors:
        raise errors[0]
    return result


async def _stoppable(work: Awaitable[T], task: asyncio.Task[Any],
                     stopped: Callable[[], bool]) -> T | None:
    """``await work``; a cancellation that ``stopped()`` says was the stop's (and only
    the stop's) gives None; the stop's cancel is taken back if the work ended anyway."""
    try:
        result = await work
    except asyncio.CancelledError:
        if stopped() and task.uncancel() == 0:
            return None
        raise
    except Exception:
        if stopped():
            task.uncancel()
        raise
    if stopped():
        task.uncancel()  # the work ended despite the stop's cancel: nothing is pending
    return result
