"""Would mypyc pay on the record-batch codec? Build it aside and measure (issue 17).

Copies ``conveyor/storage/record_batch.py`` into a scratch directory under another module
name, compiles it there with the venv's mypyc (mypy is pinned in constraints.txt; needs a C
compiler and Python's headers), and times ``decode_records`` of one batch of
``--records`` 1 KiB records carrying the four headers an AMQP publish writes, pure Python
against compiled, in interleaved rounds (the median per record of each, and the ratio).
Nothing in the package changes: the compiled module lives and dies in the scratch directory.

Run:  .venv/bin/python -m bench.storage.mypyc_codec [--records 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from types import ModuleType

from conveyor.storage import record_batch as pure

MODULE = "record_batch_compiled"
HEADERS = (("conveyor.amqp-properties", b"\x10\x00\x02"), ("conveyor.exchange", b""),
           ("conveyor.routing-key", b"bench-throughput"), ("conveyor.delivery-mode", b"2"))


def build(directory: Path) -> tuple[ModuleType, float]:
    """The compiled module and the seconds the build took."""
    shutil.copy(Path(pure.__file__), directory / f"{MODULE}.py")
    mypyc = Path(sys.executable).with_name("mypyc")
    started = time.monotonic()
    subprocess.run([str(mypyc), "--ignore-missing-imports", f"{MODULE}.py"], cwd=directory,
                   check=True, stdout=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    (directory / f"{MODULE}.py").unlink()  # import the extension, not the source
    sys.path.insert(0, str(directory))
    module = importlib.import_module(MODULE)
    assert module.__file__ is not None and module.__file__.endswith(".so"), module.__file__
    return module, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    records = [pure.RecordData(None, b"x" * 1024, HEADERS, 1_765_000_000_000 + n)
               for n in range(options.records)]
    batch = bytes(pure.build_batch(records))
    with tempfile.TemporaryDirectory() as directory:
        compiled, build_s = build(Path(directory))
        expected = pure.decode_records(batch)
        decoded = compiled.decode_records(batch)
        assert [(r.offset, r.timestamp_ms, r.key, r.value, r.headers) for r in decoded] == [
            (r.offset, r.timestamp_ms, r.key, r.value, r.headers) for r in expected]
        per_record_us: dict[str, list[float]] = {"pure": [], "mypyc": []}
        for _ in range(options.rounds):
            for name, module in (("pure", pure), ("mypyc", compiled)):
                best_s = min(timeit.repeat(lambda m=module: m.decode_records(batch),
                                           number=10, repeat=3)) / 10
                per_record_us[name].append(1e6 * best_s / options.records)
    medians = {name: statistics.median(values) for name, values in per_record_us.items()}
    print(json.dumps({
        "records_per_batch": options.records, "build_s": round(build_s, 1),
        "decode_us_per_record": {name: round(value, 3) for name, value in medians.items()},
        "rounds_us_per_record": {name: [round(v, 3) for v in values]
                                 for name, values in per_record_us.items()},
        "speedup": round(medians["pure"] / medians["mypyc"], 2),
        "load_average": os.getloadavg(),
    }, indent=2))


if __name__ == "__main__":
    main()
