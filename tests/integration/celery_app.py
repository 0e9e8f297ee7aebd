"""A small Celery app for test_amqp_celery.py: its broker is an AMQP URL, results go
back over ``rpc://`` (reply queues on the same broker).

The worker subprocess imports this module (``celery -A celery_app worker``) and reads
its broker URL and queue from ``CONVEYOR_CELERY_BROKER_URL`` / ``CONVEYOR_CELERY_QUEUE``;
the test process builds its own app with ``make_app``.
"""

from __future__ import annotations

import os

from celery import Celery, Task

ADD = "conveyor_tests.add"
FLAKY = "conveyor_tests.flaky"


def make_app(broker_url: str, queue: str) -> Celery:
    app = Celery("conveyor_tests", broker=broker_url, backend="rpc://")
    app.conf.update(
        task_default_queue=queue,
        task_default_exchange=queue,
        task_default_routing_key=queue,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        result_expires=60,
        worker_hijack_root_logger=False,
        # With AMQP heartbeats on, the solo-pool worker sometimes sits in the kombu hub's
        # 10 s maximum poll before it sees a retried task (the same against RabbitMQ 3.10).
        broker_heartbeat=0,
    )

    @app.task(name=ADD)
    def add(left: int, right: int) -> int:
        return left + right

    @app.task(name=FLAKY, bind=True, max_retries=2)
    def flaky(self: Task, label: str) -> dict[str, object]:
        attempt = self.request.retries + 1
        if attempt < 3:
            raise self.retry(countdown=0, max_retries=2, exc=RuntimeError(f"attempt {attempt}"))
        return {"label": label, "attempts": attempt}

    return app


app = make_app(
    os.environ.get("CONVEYOR_CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    os.environ.get("CONVEYOR_CELERY_QUEUE", "celery"),
)
