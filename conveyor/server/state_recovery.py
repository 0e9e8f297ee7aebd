"""Start-up reconciliation of the state database with the partition logs (issue 9 item 4).

The logs are the data; ``state.sqlite3`` is metadata about them. Losing or damaging
the database (deleted, its WAL lost after a crash, bits flipped in the WAL, which
makes SQLite drop every later commit) must never make Conveyor start as if the logs
were not there. At start:

1. ``check_state_database``: SQLite's ``PRAGMA quick_check``. A database that fails it
   (or is not a database) is moved aside (``state.sqlite3.damaged-<ms>`` with its WAL
   and shm, kept for ``sqlite3 .recover``) and a new one is created: logged as ERROR.
2. ``rebuild_orphans``: every partition directory whose topic the state does not know
   is declared again from what the directory carries (name, partition count, its
   ``log-config.json``; ``cleanup_policy == "work-queue"`` means a queue), logged as a
   WARNING naming each topic and queue. What only the database knew is reset to
   defaults and the WARNING says so: committed offsets and shared-group progress
   (records are redelivered: at-least-once), queue settings other than partitions
   and fsync, exchanges and bindings, max message size.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from conveyor.clock import Clock

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker

logger = logging.getLogger("conveyor.server.recovery")

STATE_FILE_SUFFIXES = ("", "-wal", "-shm")


def quick_check(path: Path) -> list[str]:
    """Problems ``PRAGMA quick_check`` reports for the database at ``path`` (empty: ok)."""
    try:
        connection = sqlite3.connect(f"file:{path}?mode=rw", uri=True)
        try:
            rows = connection.execute("PRAGMA quick_check").fetchall()
        finally:
            connection.close()
    except sqlite3.DatabaseError as error:
        return [str(error)]
    problems = [str(row[0]) for row in rows]
    return [] if problems == ["ok"] else problems


def check_state_database(path: Path, clock: Clock) -> list[str]:
    """Run quick_check; a damaged database is moved aside (a new one starts empty)."""
    if not path.exists():
        return []
    problems = quick_check(path)
    if problems:
        aside = path.with_name(f"{path.name}.damaged-{clock.wall_ms()}")
        for suffix in STATE_FILE_SUFFIXES:
            source = path.with_name(path.name + suffix)
            if source.exists():
                source.rename(aside.with_name(aside.name + suffix))
        logger.error(
            "state database failed PRAGMA quick_check: moved to %s; topics and queues are "
            "rebuilt from the logs (problems: %s)", aside, "; ".join(problems[:5]),
            extra={"path": str(path), "moved_to": str(aside)})
    return problems


async def rebuild_orphans(broker: Broker) -> list[str]:
    """Declare again every topic/queue whose logs the state does not know; their names."""
    from conveyor.broker.topics import config_from_row
    from conveyor.broker.types import QueueConfig

    partitions: dict[str, list[int]] = defaultdict(list)
    for topic, partition in broker.log_store.partitions():
        if broker.topics.find(topic) is None:
            partitions[topic].append(partition)
    rebuilt: list[str] = []
    for topic in sorted(partitions):
        numbers = sorted(partitions[topic])
        if numbers != list(range(len(numbers))):
            logger.error("cannot rebuild %s: partition directories %s are not 0..n-1; "
                         "left untouched (run `conveyor verify`)", topic, numbers)
            continue
        log_config = broker.log_store.config(topic, 0)
        if log_config.cleanup_policy == "work-queue":
            await broker.declare_queue(topic, QueueConfig(partitions=len(numbers),
                                                          fsync=log_config.fsync))
            rebuilt.append(f"queue {topic} ({len(numbers)} partitions)")
        else:
            config = config_from_row(dataclasses.asdict(log_config))
            await broker.topics.create(topic, len(numbers), config)
            rebuilt.append(f"topic {topic} ({len(numbers)} partitions)")
    if rebuilt:
        logger.warning(
            "rebuilt from the logs, unknown to the state database: %s. Reset to defaults: "
            "committed offsets and shared-group progress (records are redelivered), queue "
            "settings other than partitions/fsync, exchanges and bindings",
            ", ".join(rebuilt), extra={"rebuilt": len(rebuilt)})
    return rebuilt
