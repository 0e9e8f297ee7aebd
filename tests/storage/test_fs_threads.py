"""fs.start_in_thread: the durability passes' hand-over to worker threads and back.

Goal: a job runs off the loop's thread, its result or its error comes back as a call on
the loop, and however many jobs are handed over at once, at most SYNC_THREADS_MAX
threads run them (the rest wait their turn, none is lost). Method: real threads, jobs
that block on a threading.Event until the test lets them go.
"""

from __future__ import annotations

import asyncio
import threading

from conveyor.storage.fs import SYNC_THREADS_MAX, start_in_thread


async def test_results_and_errors_come_back_on_the_loop() -> None:
    loop = asyncio.get_running_loop()
    outcomes: list[asyncio.Future[tuple[object, BaseException | None, int]]] = [
        loop.create_future() for _ in range(2)]
    workers: list[int] = []

    def job(argument: int) -> int:
        workers.append(threading.get_ident())
        if argument < 0:
            raise OSError("the disk said no")
        return argument * 2

    for future, argument in zip(outcomes, (21, -1), strict=True):
        start_in_thread(job, argument, lambda result, error, future=future: future.set_result(
            (result, error, threading.get_ident())))
    (result, error, caller), (failed, failure, caller_2) = [await f for f in outcomes]
    assert (result, error) == (42, None)
    assert failed is None and isinstance(failure, OSError)
    assert caller == caller_2 == threading.get_ident()  # called on the loop's thread
    assert threading.get_ident() not in workers


async def test_many_jobs_at_once_share_a_bounded_set_of_threads() -> None:
    loop = asyncio.get_running_loop()
    release = threading.Event()
    workers: set[int] = set()
    count = SYNC_THREADS_MAX * 3
    ended: list[asyncio.Future[object]] = [loop.create_future() for _ in range(count)]

    def job(index: int) -> int:
        workers.add(threading.get_ident())
        release.wait(10)
        return index

    for index, future in enumerate(ended):
        start_in_thread(job, index, lambda result, error, future=future: future.set_result(
            result))
    release.set()  # the threads were started by the hand-overs, not by the jobs' pace
    assert [await future for future in ended] == list(range(count))
    assert 1 <= len(workers) <= SYNC_THREADS_MAX
