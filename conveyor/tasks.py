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
from collections.abc import Awaitable, Coroutine
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


async def unless_set(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """Await ``work``; if ``stop`` is set first, cancel it and return None (or its
    result, if it finished despite the cancel: the caller releases it then).

    ``work`` runs in the caller's own task and the watch on ``stop`` in a task of a
    TaskGroup (so it does not outlive this call), which cancels the caller when ``stop``
    is set. The end of ``work`` resumes the caller at once: from there to the return is
    three loop turns (the watch's cancellation), where a second task for ``work`` raced
    by ``asyncio.wait`` took five (a long-polled acquire's end-to-end latency,
    bench/README.md "Fifth pass (httpreq)"). An error of ``work`` is raised as itself."""
    task = asyncio.current_task()
    assert task is not None, "unless_set runs in a task"
    stopped = False

    async def cancel_when_set() -> None:
        nonlocal stopped
        await stop.wait()
        stopped = True
        task.cancel()

    results: list[T] = []
    errors: list[Exception] = []  # raised after the group: inside, it would wrap them
    async with asyncio.TaskGroup() as group:
        watcher = group.create_task(cancel_when_set())
        try:
            results.append(await work)
        except asyncio.CancelledError:
            # ours alone (not the caller's own cancellation too): the work was stopped
            if stopped and task.uncancel() == 0:
                return None
            raise
        except Exception as error:
            errors.append(error)
        finally:
            watcher.cancel()
        if stopped:
            task.uncancel()  # the work ended despite our cancel: nothing is pending
    if errors:
        raise errors[0]
    return results[0]
