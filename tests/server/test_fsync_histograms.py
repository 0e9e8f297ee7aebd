"""The storage histograms count every fdatasync, though a sync thread only notes it.

Goal: moving the two ``Histogram.observe`` calls off the path from an fdatasync's return
to the publishers' answers loses no observation and holds a bounded number. Method: a
``MeasuredFileSystem`` over a real file; appends and fdatasyncs from several threads;
the histograms read through a scrape (``Metrics.render``) and directly after
``observe_held``; the cap checked by noting one more than it holds.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from prometheus_client import CollectorRegistry

from conveyor.server.metrics import (
    FSYNCS_HELD_MAX,
    MeasuredFileSystem,
    Metrics,
    StorageHistograms,
)


def sample(histograms: StorageHistograms, name: str) -> float:
    for histogram in (histograms.fsync_seconds, histograms.group_commit_writes):
        for family in histogram.collect():
            for item in family.samples:
                if item.name == name:
                    return float(item.value)
    raise AssertionError(name)


def test_a_scrape_counts_every_fdatasync_of_every_thread(tmp_path: Path) -> None:
    metrics = Metrics(lambda: None, tmp_path)
    fs = MeasuredFileSystem(metrics.storage)
    handles = [os.open(tmp_path / f"segment-{index}", os.O_CREAT | os.O_RDWR)
               for index in range(4)]

    def append_and_sync(handle: int) -> None:
        for round_index in range(25):
            fs.pwrite(handle, b"x" * 10, round_index * 20)
            fs.pwrite(handle, b"y" * 10, round_index * 20 + 10)
            fs.fdatasync(handle)

    threads = [threading.Thread(target=append_and_sync, args=(handle,)) for handle in handles]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for handle in handles:
        fs.close(handle)
    text, _ = metrics.render("")
    assert b"conveyor_storage_fsync_seconds_count 100.0" in text
    assert b"conveyor_storage_group_commit_writes_count 100.0" in text
    assert b"conveyor_storage_group_commit_writes_sum 200.0" in text
    text, _ = metrics.render("")  # a second scrape observes nothing twice
    assert b"conveyor_storage_fsync_seconds_count 100.0" in text


def test_the_noting_thread_observes_once_the_cap_is_reached() -> None:
    histograms = StorageHistograms(CollectorRegistry(auto_describe=False))
    for _ in range(FSYNCS_HELD_MAX - 1):
        histograms.note_fsync(0.001, 1)
    assert sample(histograms, "conveyor_storage_fsync_seconds_count") == 0
    histograms.note_fsync(0.001, 0)  # a sync that covered no write: timed, not counted
    assert sample(histograms, "conveyor_storage_fsync_seconds_count") == FSYNCS_HELD_MAX
    assert sample(histograms, "conveyor_storage_group_commit_writes_count") == (
        FSYNCS_HELD_MAX - 1)
    histograms.note_fsync(0.002, 3)
    histograms.observe_held()
    assert sample(histograms, "conveyor_storage_fsync_seconds_count") == FSYNCS_HELD_MAX + 1
    assert sample(histograms, "conveyor_storage_group_commit_writes_sum") == (
        FSYNCS_HELD_MAX - 1 + 3)
