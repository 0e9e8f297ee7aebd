"""Goal: what ApiVersions advertises, what docs/kafka.md lists and what the dispatcher
answers are the same set of APIs and versions.

Method: parse the "What is served" table of docs/kafka.md (API keys in parentheses,
version ranges in the same order) and compare it with SUPPORTED_VERSIONS; check every
advertised key has a handler branch in handlers.py (the dispatcher's api_key tests).
"""

from __future__ import annotations

import re
from pathlib import Path

from conveyor.protocols.kafka import handlers, txn_handlers
from conveyor.protocols.kafka.messages import SUPPORTED_VERSIONS

DOC = Path(__file__).resolve().parents[3] / "docs" / "kafka.md"


def documented_versions() -> dict[int, tuple[int, int]]:
    found: dict[int, tuple[int, int]] = {}
    for line in DOC.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not re.search(r"\(\d+\)", cells[0]):
            continue
        keys = [int(key) for key in re.findall(r"\((\d+)\)", cells[0])]
        ranges = [(int(low), int(high or low))
                  for low, high in re.findall(r"(\d+)(?:\u2013(\d+))?", cells[1])]
        assert len(keys) == len(ranges), line
        found.update(zip(keys, ranges, strict=True))
    return found


def test_docs_list_exactly_the_advertised_versions() -> None:
    assert documented_versions() == SUPPORTED_VERSIONS


def test_every_advertised_api_has_a_handler() -> None:
    source = Path(handlers.__file__).read_text()
    dispatched = {int(key) for key in re.findall(r"api_key == (\d+)", source)}
    dispatched |= {0, 1, 18}  # Produce and Fetch: the hot path; ApiVersions: asserted
    # the transaction APIs: handlers.py hands txn_handlers.API_KEYS to txn_handlers.handle
    assert "txn_handlers.API_KEYS" in source
    dispatched |= {int(key) for key in re.findall(
        r"api_key == (\d+)", Path(txn_handlers.__file__).read_text())} & set(
        txn_handlers.API_KEYS)
    assert set(SUPPORTED_VERSIONS) <= dispatched
