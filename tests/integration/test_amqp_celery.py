"""Goal: Celery works unchanged with Conveyor as its AMQP broker and the ``rpc://``
result backend.

Method: a real worker subprocess (``celery -A celery_app worker --pool=solo -c 1``)
on a queue unique to the run, pointed at the module's broker (Conveyor, or the broker
named by CONVEYOR_AMQP_TEST_URL); the test process sends tasks and waits for their
results with a timeout. Covers a plain task (add) and a task that retries twice
(``self.retry(countdown=0)``) before succeeding on its third attempt.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from amqp_support import AmqpTarget, unique
from celery import Celery
from celery_app import ADD, FLAKY, make_app

RESULT_TIMEOUT_S = 15
SHUTDOWN_TIMEOUT_S = 5


@pytest.fixture(scope="module")
def celery_queue(amqp_target: AmqpTarget,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A worker subprocess consuming a fresh queue; yields (queue, worker log path)."""
    queue = unique("celery")
    log_path = tmp_path_factory.mktemp("celery") / "worker.log"
    environment = {
        **os.environ,
        "CONVEYOR_CELERY_BROKER_URL": amqp_target.url,
        "CONVEYOR_CELERY_QUEUE": queue,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    with open(log_path, "w") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_app", "worker",
             "--pool=solo", "-c", "1", "-Q", queue, "-n", f"{queue}@localhost",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO"],
            stdout=log_file, stderr=subprocess.STDOUT, env=environment,
        )
    try:
        yield queue, log_path
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=SHUTDOWN_TIMEOUT_S)


@pytest.fixture(scope="module")
def app(amqp_target: AmqpTarget, celery_queue: tuple[str, Path]) -> Iterator[Celery]:
    client = make_app(amqp_target.url, celery_queue[0])
    try:
        yield client
    finally:
        client.close()


def result_of(app: Celery, task: str, arguments: tuple[object, ...], log_path: Path) -> object:
    async_result = app.send_task(task, args=arguments)
    try:
        return async_result.get(timeout=RESULT_TIMEOUT_S)
    except Exception as error:
        raise AssertionError(f"{task}{arguments} failed: {error!r}\nworker log:\n"
                             f"{log_path.read_text()}") from error


def test_add_returns_its_result(app: Celery, celery_queue: tuple[str, Path]) -> None:
    assert result_of(app, ADD, (2, 3), celery_queue[1]) == 5
    assert result_of(app, ADD, (40, 2), celery_queue[1]) == 42


def test_task_retries_then_succeeds(app: Celery, celery_queue: tuple[str, Path]) -> None:
    outcome = result_of(app, FLAKY, ("job-1",), celery_queue[1])
    assert outcome == {"label": "job-1", "attempts": 3}
    log = celery_queue[1].read_text()
    assert log.count("Retry in 0s") == 2, log
