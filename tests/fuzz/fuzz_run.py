"""``make fuzz``: the long run, per listener, reporting inputs/s and what broke.

Usage: ``.venv/bin/python tests/fuzz/fuzz_run.py [--inputs N] [--minutes M]
[--listeners kafka,amqp,http] [--seed S] [--concurrency C] [--save-known K]``.
Each listener gets its own server (every listener enabled, so damage to the
shared process shows) and runs until N inputs or M minutes. New failures are
isolated and written to tests/fuzz/corpus/<listener>/; up to K inputs per known
bug are saved too and marked in corpus/KNOWN.json. Exit status 1 on a new failure.
``internal`` (the node-to-node channel) runs against a cluster node on an embedded
PostgreSQL started for it.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fuzz_harness import Fuzzer, FuzzServer, KnownBugs
from fuzz_targets import CLUSTER_TARGETS, TARGETS, seed_cluster_secret


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--inputs", type=int, default=1_000_000, help="per listener")
    parser.add_argument("--minutes", type=float, default=None, help="per listener")
    parser.add_argument("--listeners", default=",".join([*TARGETS, *CLUSTER_TARGETS]))
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256, help="inputs between checks")
    parser.add_argument("--save-known", type=int, default=2)
    arguments = parser.parse_args(argv)
    seed = arguments.seed
    if seed is None:
        seed = int(os.environ.get("CONVEYOR_SEED", random.SystemRandom().randrange(2**32)))
    print(f"CONVEYOR_SEED={seed}", flush=True)
    new_failures = 0
    for name in arguments.listeners.split(","):
        new_failures += run_listener(name, seed, arguments)
    return 1 if new_failures else 0


@contextmanager
def cluster_database(name: str) -> Iterator[str | None]:
    """A database on an embedded PostgreSQL for a cluster target, else None."""
    if name not in CLUSTER_TARGETS:
        yield None
        return
    from conveyor.testing.postgres import PostgresServer

    with PostgresServer() as postgres:
        dsn = postgres.create_database("fuzz")
        seed_cluster_secret(dsn)
        yield dsn


def run_listener(name: str, seed: int, arguments: argparse.Namespace) -> int:
    target = CLUSTER_TARGETS.get(name) or TARGETS[name]
    deadline = time.monotonic() + arguments.minutes * 60 if arguments.minutes else None
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as scratch, \
            cluster_database(name) as dsn:
        server = FuzzServer(Path(scratch), list(TARGETS), dsn)
        server.start()
        fuzzer = Fuzzer(server, target, seed, KnownBugs.load(),
                        save_known_max=arguments.save_known)
        try:
            for problem in fuzzer.replay_corpus():
                print(f"corpus: {problem}", flush=True)
            while fuzzer.findings.inputs < arguments.inputs and (
                    deadline is None or time.monotonic() < deadline):
                chunk_end = min(time.monotonic() + 30, deadline or float("inf"))
                fuzzer.fuzz(arguments.inputs - fuzzer.findings.inputs, arguments.batch,
                            chunk_end, arguments.concurrency)
                print(fuzzer.findings.report(name), flush=True)
        finally:
            fuzzer.close()
            server.stop()
    for failure, path in fuzzer.findings.new:
        print(f"NEW {name} failure, input {path or '(not reproducible alone)'}:\n"
              f"{failure.summary()}", flush=True)
    for bug_id, paths in fuzzer.findings.known_saved.items():
        print(f"known {bug_id}: saved {[str(p) for p in paths]}", flush=True)
    print(f"FINAL {fuzzer.findings.report(name)}", flush=True)
    return len(fuzzer.findings.new)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
