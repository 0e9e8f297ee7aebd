"""Goal: no input at any listener takes the real server down, stalls a normal client,
or puts a traceback in the log (issue 9, "Show").

Method: one real ``conveyor serve`` (every listener on, fixed free ports, log file
captured). For each listener (fuzz_targets.TARGETS): first every input of
``corpus/<listener>/`` is replayed alone and checked; those marked in
``corpus/KNOWN.json`` must still fail with their bug (the mark is removed when
the fix is merged), all others must pass. Then a fixed budget of mutants of the
recorded seeds (fuzz_capture.py) is sent in batches over real sockets (whole, in
chunks, byte by byte, some left open); after each batch a real client does a
round trip within PROBE_TIMEOUT_S, the process must be alive and its new log free
of tracebacks. A batch that fails is halved down to one input, which is minimised
and written to the corpus, and the test fails. Hits of known bugs are counted, the
server restarted if they killed it, and the run goes on.

The node-to-node channel of a cluster node (fuzz_targets.CLUSTER_TARGETS) gets a server
of its own: one ``conveyor serve --node-id auto`` on the session's embedded PostgreSQL,
whose cluster secret the harness wrote first, so half of its inputs are sent after a
real authentication (post-auth garbage reaches the request handler); after each batch an
authenticated call and the HTTP and AMQP probes must be answered.

Seed: CONVEYOR_SEED (default 0, so ``make test`` explores the same inputs each
run; ``make fuzz`` explores new ones). Budget: CONVEYOR_FUZZ_INPUTS per listener.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzz_harness import Fuzzer, FuzzServer, KnownBugs
from fuzz_targets import CLUSTER_TARGETS, TARGETS, seed_cluster_secret

from conveyor.testing.postgres import PostgresServer

SEED = int(os.environ.get("CONVEYOR_SEED", "0"))
INPUTS_PER_LISTENER = int(os.environ.get("CONVEYOR_FUZZ_INPUTS", "1500"))
BATCH_INPUTS = 100  # inputs between two checks


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzServer]:
    server = FuzzServer(Path(tmp_path_factory.mktemp("fuzz")), list(TARGETS))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster_server(tmp_path_factory: pytest.TempPathFactory,
                   postgres_session_server: PostgresServer) -> Iterator[FuzzServer]:
    if not postgres_session_server.is_running():
        postgres_session_server.start()
    dsn = postgres_session_server.create_database("fuzz")
    seed_cluster_secret(dsn)
    server = FuzzServer(Path(tmp_path_factory.mktemp("fuzz-cluster")), list(TARGETS), dsn)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        postgres_session_server.drop_database(dsn)


@pytest.fixture
def fuzzer(request: pytest.FixtureRequest) -> Iterator[Fuzzer]:
    name = request.param
    cluster = name in CLUSTER_TARGETS
    server = request.getfixturevalue("cluster_server" if cluster else "server")
    target = CLUSTER_TARGETS[name] if cluster else TARGETS[name]
    fuzzer = Fuzzer(server, target, SEED, KnownBugs.load())
    try:
        yield fuzzer
    finally:
        fuzzer.close()
        print(fuzzer.findings.report(request.param))


ALL_TARGETS = sorted(TARGETS) + sorted(CLUSTER_TARGETS)


@pytest.mark.parametrize("fuzzer", ALL_TARGETS, indirect=True)
def test_corpus_replays_as_recorded(fuzzer: Fuzzer) -> None:
    problems = fuzzer.replay_corpus()
    assert not problems, "\n\n".join(problems)


@pytest.mark.timeout(600)  # isolating and minimising a new crash restarts the server often
@pytest.mark.parametrize("fuzzer", ALL_TARGETS, indirect=True)
def test_mutated_client_traffic_is_survived(fuzzer: Fuzzer) -> None:
    print(f"CONVEYOR_SEED={SEED}")
    findings = fuzzer.fuzz(INPUTS_PER_LISTENER, BATCH_INPUTS)
    assert findings.inputs == INPUTS_PER_LISTENER
    messages = [
        f"CONVEYOR_SEED={SEED}: input saved as {path or '(not reproducible alone)'}\n"
        f"{failure.summary()}"
        for failure, path in findings.new
    ]
    assert not messages, "\n\n".join(messages)
