"""``conveyor verify DATA_DIR``: the offline check of a data directory (moved out of cli.py
to keep that module under the size limit)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def add_parser(subparsers: Any) -> None:
    verify = subparsers.add_parser(
        "verify", help="offline check of every segment, index and the state database")
    verify.add_argument("data_dir", type=Path, help="the server's --data-dir")
    verify.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(arguments: argparse.Namespace) -> int:
    """Exit 0: no damage (repairable findings may be listed); 1: damage found."""
    from conveyor.storage.verify import verify_data_dir

    if not arguments.data_dir.is_dir():
        print(f"conveyor: {arguments.data_dir}: not a directory", file=sys.stderr)
        return EXIT_USAGE
    report = verify_data_dir(arguments.data_dir)
    if arguments.json:
        print(json.dumps({"damaged": report.damaged, "segments": report.segments,
                          "batches": report.batches, "bytes_checked": report.bytes_checked,
                          "findings": [finding.to_document() for finding in report.findings]},
                         sort_keys=True))
    else:
        for finding in report.findings:
            where = "" if finding.position < 0 else f" at byte {finding.position}"
            offsets = "" if finding.first_offset < 0 else (
                f" (offsets from {finding.first_offset}, next valid {finding.next_offset})")
            print(f"{finding.severity}: {finding.path}{where}: {finding.problem}{offsets}")
        print(f"checked {report.segments} segments, {report.batches} batches, "
              f"{report.bytes_checked} bytes: {'DAMAGED' if report.damaged else 'ok'}")
    return EXIT_ERROR if report.damaged else EXIT_OK
