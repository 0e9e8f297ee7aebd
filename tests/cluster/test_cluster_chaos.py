"""The long cluster run (``make chaos``): rounds of load, a SIGKILL of a random node and
its restart, then the history check. Figures (kills, acknowledged, lost, duplicated,
time to recover) are printed. Skipped, and reported as skipped, unless CONVEYOR_CHAOS=1.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from tests.cluster.helpers import History, check, cluster, stored_log, wait_for
from tests.cluster.test_cluster_kafka import TOPIC, create_topic, full_log, produce, producer

pytestmark = pytest.mark.chaos  # the long run: make chaos (CONVEYOR_CHAOS=1)
ROUNDS = int(os.environ.get("CONVEYOR_CHAOS_ROUNDS", "6"))
PER_ROUND = 2000


@pytest.mark.timeout(1800)
def test_kill_loop(tmp_path: Path, postgres_dsn: str) -> None:
    seed = int(os.environ.get("CONVEYOR_SEED", random.SystemRandom().randrange(2**32)))
    print(f"CONVEYOR_SEED={seed}")
    rng = random.Random(seed)
    with cluster(tmp_path, postgres_dsn, 3) as nodes:
        create_topic(nodes)
        history = History()
        client = producer(nodes)
        recoveries = []
        for round_index in range(ROUNDS):
            produce(client, history, range(round_index * PER_ROUND,
                                           round_index * PER_ROUND + PER_ROUND // 2))
            victim = rng.choice(nodes)
            victim.kill()
            started = time.monotonic()
            produce(client, history, range(round_index * PER_ROUND + PER_ROUND // 2,
                                           (round_index + 1) * PER_ROUND))
            recoveries.append(time.monotonic() - started)
            # the same node id comes back once its lease has lapsed
            wait_for(lambda victim=victim: _restarted(victim), 30, "the node restarted")
        figures = check(history, full_log(nodes, postgres_dsn),
                        stored_log(postgres_dsn, TOPIC))
        print(f"chaos: kills={ROUNDS} {figures} "
              f"recover max={max(recoveries):.1f}s mean={sum(recoveries) / ROUNDS:.1f}s")


def _restarted(node: object) -> bool:
    try:
        node.start()  # type: ignore[attr-defined]
    except RuntimeError:  # refused while its old lease is live
        return False
    return True
