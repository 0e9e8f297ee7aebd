"""The start-up heap is frozen out of the garbage collector's way.

Goal: a full collection in a running broker walks only objects allocated after start-up
(a gen2 pass over the start-up heap paused the Kafka path's event loop for tens of ms).
Method: in a child interpreter (freezing this test process's heap would outlive the
test), import the server, build a broker-sized heap, call ``freeze_startup_heap`` and
check that the oldest generation is left nearly empty while the objects stay alive.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import gc, json
import conveyor.server.app as app
heap = [[index] for index in range(50_000)]  # the opened broker's state (tracked)
gc.collect()
before = len(gc.get_objects(generation=2))
frozen = app.freeze_startup_heap()
print(json.dumps({"before": before, "after": len(gc.get_objects(generation=2)),
                  "frozen": frozen, "alive": len(heap)}))
"""


def test_freezing_the_startup_heap_empties_the_oldest_generation() -> None:
    root = Path(__file__).resolve().parents[2]
    environment = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          check=True, timeout=60, env=environment)
    result = json.loads(done.stdout)
    assert result["before"] > 50_000
    assert result["frozen"] >= result["before"]
    assert result["after"] < result["before"] // 100
    assert result["alive"] == 50_000
