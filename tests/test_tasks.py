"""conveyor.tasks: the Supervisor and unless_set keep no task past their owner."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from conveyor.tasks import StopSignal, Supervisor, unless_set

StopFactory = Callable[[], asyncio.Event]


@pytest.fixture(params=[asyncio.Event, StopSignal], ids=["event", "stop_signal"])
def new_stop(request: pytest.FixtureRequest) -> StopFactory:
    """Every unless_set test runs with a plain Event (watched by a task) and with a
    StopSignal (watched by a callback)."""
    factory: StopFactory = request.param
    return factory


async def test_unless_set_returns_the_work_result(
        new_stop: StopFactory) -> None:
    assert await unless_set(asyncio.sleep(0, result=[1, 2]), new_stop()) == [1, 2]


async def test_unless_set_cancels_the_work_when_the_event_is_set_first(
        new_stop: StopFactory) -> None:
    stop = new_stop()
    started = asyncio.Event()
    cancelled = False

    async def work() -> int:
        nonlocal cancelled
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled = True
            raise
        return 1

    async def set_later() -> None:
        await started.wait()
        stop.set()

    async with asyncio.TaskGroup() as group:
        group.create_task(set_later())
        assert await unless_set(work(), stop) is None
    assert cancelled


async def test_unless_set_keeps_a_result_that_finished_despite_the_cancel(
        new_stop: StopFactory) -> None:
    stop = new_stop()
    stop.set()

    async def work() -> str:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return "late"  # finished anyway: the caller must see (and release) it
        return "never"

    assert await unless_set(work(), stop) == "late"


async def test_unless_set_raises_the_work_error_itself(
        new_stop: StopFactory) -> None:
    async def work() -> int:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        await unless_set(work(), new_stop())


async def test_unless_set_runs_the_work_in_the_callers_task_and_passes_its_cancel_on(
        new_stop: StopFactory) -> None:
    """The work's end resumes the caller without a task between them; a cancellation of
    the caller itself is not mistaken for the stop (it propagates, nothing pending)."""
    async def whose_task() -> asyncio.Task[object] | None:
        return asyncio.current_task()

    assert await unless_set(whose_task(), new_stop()) is asyncio.current_task()
    waiting = asyncio.get_running_loop().create_task(
        unless_set(asyncio.Event().wait(), new_stop()))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0


async def test_a_stop_signal_is_watched_without_a_task() -> None:
    """Waiting on a StopSignal adds no task (the end of the work is the return); setting
    it cancels the work through the callback, which is gone afterwards."""
    stop = StopSignal()
    tasks_while_waiting: list[int] = []

    async def work() -> None:
        tasks_while_waiting.append(len(asyncio.all_tasks()))
        stop.set()  # the client goes away while the work waits
        await asyncio.Event().wait()

    assert await unless_set(work(), stop) is None
    assert tasks_while_waiting == [1] and stop._callbacks == []


async def test_supervisor_close_cancels_and_awaits_every_task() -> None:
    tasks = Supervisor("test")
    forever = tasks.start(asyncio.Event().wait())
    assert len(tasks) == 1
    await tasks.close(cancel=True)
    assert forever.cancelled() and len(tasks) == 0
