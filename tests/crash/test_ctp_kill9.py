"""Consume-transform-produce with random kill -9 of the broker: every input's output is
read exactly once by read_committed readers, and no aborted output is ever visible.

The short form of ctp_checker.py (which describes the workload and the check; run it by
hand for the long form): 400 inputs, 4 kills. Seed: CONVEYOR_SEED or printed.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from ctp_checker import run


def test_exactly_once_under_kill9(tmp_path: Path) -> None:
    seed = int(os.environ.get("CONVEYOR_SEED", random.SystemRandom().randrange(2**32)))
    print(f"CONVEYOR_SEED={seed}")
    outcome = run(tmp_path / "data", inputs=400, kills=4, seed=seed)
    assert outcome.committed_transactions > 0
    assert outcome.problems() == []
