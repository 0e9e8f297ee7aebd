"""The long cluster run (``make chaos``): three nodes under mixed load (Kafka idempotent
acks=all, AMQP confirms, HTTP publishes and an HTTP queue consumer: tests/cluster/
mixed.py) while a random node is killed with SIGKILL and restarted, round after round;
then the history check. Per-protocol figures (acknowledged, lost, duplicated,
redelivered after a confirmed ack, the longest stall after each kill) are printed.
Skipped, and reported as skipped, unless CONVEYOR_CHAOS=1.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from tests.cluster.helpers import cluster, wait_for
from tests.cluster.mixed import MixedLoad
from tests.cluster.test_cluster_failover import declare_queue
from tests.cluster.test_cluster_kafka import create_topic

pytestmark = pytest.mark.chaos  # the long run: make chaos (CONVEYOR_CHAOS=1)
ROUNDS = int(os.environ.get("CONVEYOR_CHAOS_ROUNDS", "6"))
PER_ROUND = 2000  # Kafka records acknowledged between two kills


@pytest.mark.timeout(1800)
def test_kill_loop(tmp_path: Path, postgres_dsn: str) -> None:
    seed = int(os.environ.get("CONVEYOR_SEED", random.SystemRandom().randrange(2**32)))
    print(f"CONVEYOR_SEED={seed}")
    rng = random.Random(seed)
    with cluster(tmp_path, postgres_dsn, 3, listeners=("kafka", "amqp", "http")) as nodes:
        create_topic(nodes)
        declare_queue(nodes)
        load = MixedLoad(nodes, postgres_dsn)
        load.start()
        try:
            for _ in range(ROUNDS):
                load.progress("before a kill", kafka=PER_ROUND // 2, amqp=20, http=50,
                              acks=50, timeout_s=120)
                victim = rng.choice(nodes)
                killed_at = time.monotonic()
                victim.kill()
                load.recovered(killed_at, timeout_s=120)
                load.progress("after a kill", kafka=PER_ROUND // 2, amqp=20, http=50,
                              acks=50, timeout_s=120)
                # the same node id comes back once its lease has lapsed
                wait_for(lambda victim=victim: _restarted(victim), 30, "the node restarted")
            figures = load.stop_and_check(verify_s=180)
        finally:
            load.halt()
    stalls = figures.pop("stalls_s")
    worst = {name: max(round_[name] for round_ in stalls) for name in stalls[0]}
    mean = {name: round(sum(round_[name] for round_ in stalls) / len(stalls), 1)
            for name in stalls[0]}
    print(f"chaos: kills={ROUNDS} {figures} longest stall after a kill: max={worst} "
          f"mean={mean}")


def _restarted(node: object) -> bool:
    try:
        node.start()  # type: ignore[attr-defined]
    except RuntimeError:  # refused while its old lease is live
        return False
    return True
