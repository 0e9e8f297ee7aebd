"""Process-level fuzzing: mutated client traffic at a real ``conveyor serve``.

Owns: the server under test (restarted on a fresh data directory when it dies),
sending inputs over real sockets, the checks after each batch (the process is
alive, a normal client is served within ``PROBE_TIMEOUT_S``, the new part of the
server's log holds no traceback or fatal error), isolating the input that caused a
failure, the crash corpus and the manifest of known bugs.
Must not know: any protocol (fuzz_targets.py and fuzz_mutators.py hold that).

Invariants: an input is one TCP connection's client bytes plus how they are sent;
a failing input is written to ``tests/fuzz/corpus/<listener>/`` unless it matches
a known bug of ``corpus/KNOWN.json``; the seed of every run is printed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fuzz_mutators import Frame, mutate
from fuzz_targets import FUZZ_ROOT, Opener, ProbeFailed, Target

from conveyor.testing.server import BrokerProcess, free_port

KNOWN_PATH = FUZZ_ROOT / "corpus" / "KNOWN.json"
CONNECT_TIMEOUT_S = 2.0
# After a half-close the server has all the input and answers or closes at once;
# this bounds a server that does neither (a held connection is its own bug, issue 9.3).
READ_TIMEOUT_S = 0.3
OPEN_READ_S = 0.05  # "open" inputs keep the connection open this long, then drop it
BYTEWISE_BYTES_MAX = 4096  # bigger inputs are sent in random chunks instead
RESPONSE_BYTES_MAX = 1 << 20  # read and drop at most this much per connection
FATAL_PATTERNS = re.compile(
    r"Traceback \(most recent call last\)|memory allocation of \d+ bytes failed|"
    r"Fatal Python error|panicked at|Task exception was never retrieved")
# Resident memory the server may reach while being fuzzed: it starts near 50 MiB and
# issue 9 saw AMQP grow to 116 MiB on ~370 malformed inputs and stay there.
RSS_BYTES_MAX = 384 * 2**20
MINIMIZE_ATTEMPTS_MAX = 24  # single-frame removals tried per saved input
DYING_PATTERNS = re.compile(
    r"(?m)^.*(?:memory allocation of \d+ bytes failed|Fatal Python error|panicked at).*$")
MODES = ("whole", "whole", "whole", "chunked", "bytewise")


@dataclass(frozen=True, slots=True)
class Input:
    data: bytes
    mode: str = "whole"  # whole | chunked | bytewise
    keep_open: bool = False  # no half-close: the server must cope with a silent peer

    @property
    def file_name(self) -> str:
        digest = hashlib.sha256(self.data).hexdigest()[:16]
        return f"{digest}-{self.mode}{'-open' if self.keep_open else ''}.bin"

    @classmethod
    def from_file(cls, path: Path) -> Input:
        parts = path.stem.split("-")
        mode = parts[1] if len(parts) > 1 and parts[1] in MODES else "whole"
        return cls(path.read_bytes(), mode, keep_open="open" in parts[2:])


@dataclass(frozen=True, slots=True)
class Failure:
    kind: str  # died | traceback | unresponsive | memory
    evidence: str  # exit status and log excerpt, or the probe's error

    def summary(self) -> str:
        return f"{self.kind}: {self.evidence[-3000:]}"


@dataclass(slots=True)
class KnownBugs:
    """corpus/KNOWN.json: bugs fixed on other branches, how to recognise them, their inputs."""

    bugs: dict[str, dict[str, str]] = field(default_factory=dict)  # id -> owner, issue, pattern
    entries: dict[str, str] = field(default_factory=dict)  # "<listener>/<file>" -> bug id

    @classmethod
    def load(cls, path: Path = KNOWN_PATH) -> KnownBugs:
        if not path.exists():
            return cls()
        document = json.loads(path.read_text())
        return cls(dict(document.get("bugs", {})), dict(document.get("entries", {})))

    def classify(self, failure: Failure) -> str | None:
        """The known bug this failure shows, by its pattern (searched in the evidence)."""
        for bug_id, bug in self.bugs.items():
            pattern = bug.get("pattern")
            if pattern and failure.kind in bug.get("kinds", failure.kind) and re.search(
                    pattern, failure.evidence):
                return bug_id
        return None

    def mark(self, key: str, bug_id: str, path: Path = KNOWN_PATH) -> None:
        """Record that the corpus input ``key`` reproduces ``bug_id``; rewrite the manifest."""
        self.entries[key] = bug_id
        document = {"bugs": self.bugs, "entries": dict(sorted(self.entries.items()))}
        path.write_text(json.dumps(document, indent=2) + "\n")


class FuzzServer:
    """``conveyor serve`` with every fuzzed listener on fixed ports; fresh data on restart.

    ``cluster_dsn``: a cluster node on that PostgreSQL database (``--node-id auto``: a
    restarted node is a new node, the killed one's lease runs out by itself), with its
    node-to-node port fixed too (``ports["internal"]``)."""

    def __init__(self, scratch: Path, listeners: Sequence[str],
                 cluster_dsn: str | None = None) -> None:
        self.scratch = scratch
        self.listeners = tuple(listeners)
        self.cluster_dsn = cluster_dsn
        self.ports = {name: free_port() for name in self.listeners}
        if cluster_dsn is not None:
            self.ports["internal"] = free_port()
        self.generation = 0
        self.broker: BrokerProcess | None = None
        self._log_position = 0

    def start(self) -> None:
        self.generation += 1
        data_dir = self.scratch / f"data-{self.generation}"
        cluster = () if self.cluster_dsn is None else (
            "--storage", self.cluster_dsn, "--node-id", "auto")
        self.broker = BrokerProcess(data_dir, listeners=self.listeners, extra_args=cluster)
        # the same ports across restarts (``internal`` becomes --internal-port)
        self.broker.ports = dict(self.ports)
        self.broker.start()
        self._log_position = 0

    def stop(self) -> None:
        if self.broker is not None and self.broker.process is not None:
            if self.broker.process.poll() is None:
                self.broker.kill()
            else:
                self.broker._close_pipes()
            shutil.rmtree(self.broker.data_dir, ignore_errors=True)
        self.broker = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def pid(self) -> int:
        assert self.broker is not None and self.broker.process is not None
        return self.broker.process.pid

    def exit_status(self) -> int | None:
        assert self.broker is not None and self.broker.process is not None
        return self.broker.process.poll()

    def new_log(self) -> str:
        """The server log written since the last call."""
        assert self.broker is not None
        with open(self.broker.log_path, "rb") as log_file:
            log_file.seek(self._log_position)
            text = log_file.read()
        self._log_position += len(text)
        return text.decode("utf-8", "replace")

    def rss_bytes(self) -> int:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return 0
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        return int(match.group(1)) * 1024 if match else 0


async def send_input(port: int, item: Input, opener: Opener | None = None) -> None:
    """One connection: the target's opening (if any), then the bytes as ``item.mode``
    says, drain the answer, close."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError):
        return  # a dead or saturated server is found by the checks, not here
    try:
        data = item.data if opener is None else await opener(reader, writer, item.data)
        for chunk in _chunks(Input(data, item.mode, item.keep_open)):
            writer.write(chunk)
            await writer.drain()
        if item.keep_open:
            await _drain(reader, OPEN_READ_S)
        else:
            writer.write_eof()
            await _drain(reader, READ_TIMEOUT_S)
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        pass  # the server closed on us mid-input: allowed, its answer to bad bytes
    finally:
        writer.transport.abort()


def _chunks(item: Input) -> Iterable[bytes]:
    data = item.data
    if item.mode == "bytewise" and len(data) <= BYTEWISE_BYTES_MAX:
        return (data[i:i + 1] for i in range(len(data)))
    if item.mode in ("chunked", "bytewise"):
        rng = random.Random(data)  # the same cuts every replay
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, 16))) if data else []
        return (data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True))
    return (data,)


async def _drain(reader: asyncio.StreamReader, timeout_s: float) -> None:
    received = 0
    async with asyncio.timeout(timeout_s):
        while received < RESPONSE_BYTES_MAX and (data := await reader.read(65536)):
            received += len(data)


async def send_batch(port: int, inputs: Sequence[Input], concurrency: int,
                     opener: Opener | None = None) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(item: Input) -> None:
        async with gate:
            await send_input(port, item, opener)

    await asyncio.gather(*(one(item) for item in inputs))


@dataclass(slots=True)
class Findings:
    """What one run saw, per listener."""

    inputs: int = 0
    batches: int = 0
    restarts: int = 0
    new: list[tuple[Failure, Path | None]] = field(default_factory=list)  # input saved, or None
    known: dict[str, int] = field(default_factory=dict)  # bug id -> batches that hit it
    known_saved: dict[str, list[Path]] = field(default_factory=dict)  # bug id -> inputs
    rss_bytes_max: int = 0
    seconds: float = 0.0

    def report(self, name: str) -> str:
        rate = self.inputs / self.seconds if self.seconds else 0.0
        return (f"{name}: {self.inputs} inputs in {self.seconds:.1f} s ({rate:.0f} inputs/s), "
                f"{self.batches} batches, {self.restarts} restarts, new failures {len(self.new)}, "
                f"known {self.known or '{}'}, max RSS {self.rss_bytes_max / 2**20:.0f} MiB")


class Fuzzer:
    """Drives one target: replay its corpus, then fuzz in checked batches."""

    def __init__(self, server: FuzzServer, target: Target, seed: int,
                 known: KnownBugs | None = None, save_known_max: int = 0) -> None:
        self.server = server
        self.target = target
        self.seed = seed
        self.known = known or KnownBugs.load()
        self.save_known_max = save_known_max  # save at most this many known-bug inputs a run
        self.known_variants: set[str] = set()  # known bug + place already in the corpus
        self.findings = Findings()
        self.rng = random.Random(f"{seed}-{target.name}")  # one stream across fuzz() calls
        self._runner = asyncio.Runner()

    def close(self) -> None:
        self._runner.close()

    @property
    def port(self) -> int:
        return self.server.ports[self.target.name]

    def check(self) -> Failure | None:
        """Probe with a normal client, then look at the process and its new log."""
        probe_error = None
        if self.server.exit_status() is None:  # a dead server needs no 5 s probe to tell
            try:
                self.target.probe(self.port)
                for other in self.target.also_probed:  # the process's other listeners
                    other.probe(self.server.ports[other.name])
            except ProbeFailed as error:
                probe_error = str(error)
        log = self.server.new_log()
        rss_bytes = self.server.rss_bytes()
        self.findings.rss_bytes_max = max(self.findings.rss_bytes_max, rss_bytes)
        status = self.server.exit_status()
        if status is not None:
            last_words = "\n".join(DYING_PATTERNS.findall(log))  # what the process said dying
            return Failure("died", f"exit status {status}\n{last_words}\n...\n{log[-2000:]}")
        tracebacks = [Failure("traceback", log[max(0, match.start() - 500):match.start() + 4000])
                      for match in FATAL_PATTERNS.finditer(log)]
        unknown = [failure for failure in tracebacks if self.known.classify(failure) is None]
        if tracebacks:  # a new bug must not hide behind a known one in the same batch
            return (unknown or tracebacks)[0]
        if probe_error is not None:
            return Failure("unresponsive", probe_error)
        if rss_bytes > RSS_BYTES_MAX:
            return Failure("memory", f"listener={self.target.name} RSS {rss_bytes >> 20} MiB > "
                           f"{RSS_BYTES_MAX >> 20} MiB after {self.findings.inputs} inputs")
        return None

    def run_batch(self, inputs: Sequence[Input], concurrency: int = 16) -> Failure | None:
        self._runner.run(send_batch(self.port, inputs, concurrency, self.target.opener))
        return self.check()

    def _recover(self, failure: Failure) -> None:
        """A dead or hung server is replaced before the next batch (a traceback alone is not)."""
        if failure.kind != "traceback":
            self.findings.restarts += 1
            self.server.restart()

    def reproduces(self, inputs: Sequence[Input], fresh: bool = True) -> Failure | None:
        """Run ``inputs`` one at a time, on a fresh server unless ``fresh`` is False."""
        if fresh:
            self.server.restart()
        failure = self.run_batch(inputs, concurrency=1)
        if failure is not None:
            self._recover(failure)
        return failure

    @staticmethod
    def place(failure: Failure) -> str:
        """The innermost Conveyor frame of the first traceback in the evidence ("?" if none)."""
        parts = failure.evidence.split("Traceback (most recent call last):\n", 1)
        text = parts[1] if len(parts) > 1 else failure.evidence
        text = re.split(r"(?m)^\S", text, maxsplit=1)[0]  # up to the exception line
        places = re.findall(r'File "[^"]*?/(conveyor/[\w/]+\.py)", line \d+, in (\w+)', text)
        return ":".join(places[-1]) if places else "?"

    def variant(self, failure: Failure) -> str:
        """A known bug at one place: the corpus keeps one input per variant."""
        return f"{self.known.classify(failure)} {self.place(failure)}"

    def signature(self, failure: Failure) -> str:
        """What makes two failures the same bug: a known bug id, else kind, place, exception."""
        bug_id = self.known.classify(failure)
        if bug_id is not None:
            return bug_id
        if failure.kind != "traceback":
            return failure.kind
        exception = re.search(r"(?m)^(\w[\w.]*(?:Error|Exception|Exit))\b", failure.evidence)
        return f"traceback {self.place(failure)} {exception.group(1) if exception else '?'}"

    def reproduces_same(self, inputs: Sequence[Input], failure: Failure) -> Failure | None:
        """``inputs`` alone show the same bug as ``failure`` (fresh server unless a traceback)."""
        seen = self.reproduces(inputs, fresh=failure.kind != "traceback")
        if seen is None or self.signature(seen) != self.signature(failure):
            return None
        return seen

    def isolate(self, inputs: Sequence[Input], failure: Failure) -> tuple[Input, Failure] | None:
        """Halve the batch until one input shows the same failure alone; None if none does."""
        candidates = list(inputs)
        while len(candidates) > 1:
            half = len(candidates) // 2
            if self.reproduces_same(candidates[:half], failure) is not None:
                candidates = candidates[:half]
            elif self.reproduces_same(candidates[half:], failure) is not None:
                candidates = candidates[half:]
            else:
                return None
        isolated = self.reproduces_same(candidates, failure)
        if isolated is None:
            return None
        return self.minimize(candidates[0], isolated)

    def minimize(self, item: Input, failure: Failure) -> tuple[Input, Failure]:
        """Drop trailing frames, then single frames, while the same failure still shows."""
        prefix, frames, _rest = self.target.framing.split(item.data)
        best = (item, failure)

        def attempt(kept: Sequence[Frame]) -> bool:
            nonlocal best
            data = prefix + b"".join(f.header + f.body + f.trailer for f in kept)
            candidate = Input(data, item.mode, item.keep_open)
            seen = self.reproduces_same([candidate], failure)
            if seen is None:
                return False
            best = (candidate, seen)
            return True

        low, high = 1, len(frames)  # the shortest failing prefix of whole frames
        while low < high:
            middle = (low + high) // 2
            if attempt(frames[:middle]):
                high = middle
            else:
                low = middle + 1
        if frames and (len(frames) == high and not attempt(frames[:high])):
            return best  # the failure needs the bytes after the last whole frame
        kept = list(frames[:high])
        for index in range(len(kept) - 2, -1, -1)[:MINIMIZE_ATTEMPTS_MAX]:
            trial = kept[:index] + kept[index + 1:]
            if attempt(trial):
                kept = trial
        return best

    def save(self, item: Input) -> Path:
        self.target.corpus_dir.mkdir(parents=True, exist_ok=True)
        path = self.target.corpus_dir / item.file_name
        path.write_bytes(item.data)
        return path

    def corpus(self) -> list[tuple[str, Input]]:
        """(manifest key, input) for every saved input of this target, in name order."""
        paths = sorted(self.target.corpus_dir.glob("*.bin"))
        return [(f"{self.target.name}/{path.name}", Input.from_file(path)) for path in paths]

    def replay_corpus(self) -> list[str]:
        """Replay every corpus input alone; the problems found (empty: all as expected)."""
        problems = []
        for key, item in self.corpus():
            failure = self.run_batch([item], concurrency=1)
            expected = self.known.entries.get(key)
            if failure is not None:
                self._recover(failure)
                bug_id = self.known.classify(failure)
                if expected is not None and bug_id == expected:
                    self.findings.known[expected] = self.findings.known.get(expected, 0) + 1
                    self.known_variants.add(self.variant(failure))
                    continue
                problems.append(f"{key} (known: {expected}) fails: {failure.summary()}")
            elif expected is not None:
                problems.append(f"{key} no longer reproduces known bug {expected!r}: "
                                f"remove its entry from {KNOWN_PATH.name} (the fix is merged)")
        return problems

    def fuzz(self, inputs_max: int, batch_size: int = 32, deadline_s: float | None = None,
             concurrency: int = 16) -> Findings:
        """Mutate seeds in batches until ``inputs_max`` inputs or the deadline."""
        started = time.monotonic()
        rng = self.rng
        pool = self.target.seeds() + [item.data for _key, item in self.corpus()]
        assert pool, f"no seeds in {self.target.seeds_dir}: run fuzz_capture.py"
        sent = 0
        while sent < inputs_max and (deadline_s is None or time.monotonic() < deadline_s):
            batch = [self.next_input(rng, pool) for _ in range(min(batch_size, inputs_max - sent))]
            sent += len(batch)
            failure = self.run_batch(batch, concurrency)
            self.findings.inputs += len(batch)
            self.findings.batches += 1
            if failure is not None:
                self.handle(batch, failure)
        self.findings.seconds += time.monotonic() - started
        return self.findings

    def next_input(self, rng: random.Random, pool: Sequence[bytes]) -> Input:
        data = rng.choice(pool)
        if rng.random() < 0.97:  # a few untouched seeds keep state (topics, queues) real
            data = mutate(rng, data, self.target.framing, pool)
        return Input(data, rng.choice(MODES), keep_open=rng.random() < 0.05)

    def handle(self, batch: Sequence[Input], failure: Failure) -> None:
        """Count a known bug (isolating a few for the corpus) or isolate and save a new one."""
        bug_id = self.known.classify(failure)
        if bug_id is not None:
            self.findings.known[bug_id] = self.findings.known.get(bug_id, 0) + 1
            saved = sum(len(paths) for paths in self.findings.known_saved.values())
            if self.variant(failure) in self.known_variants or saved >= self.save_known_max:
                self._recover(failure)
                return
        if failure.kind == "memory":  # grown over many batches: no single input to isolate
            if bug_id is None:
                self.findings.new.append((failure, None))
            self._recover(failure)
            return
        found = self.isolate(batch, failure)
        if found is None:
            if bug_id is None:  # needs several inputs together, or flaky: report the seed
                self.findings.new.append((failure, None))
            return
        item, isolated = found
        isolated_bug = self.known.classify(isolated)
        if isolated_bug is None:
            self.findings.new.append((isolated, self.save(item)))
        elif self.variant(isolated) not in self.known_variants:
            path = self.save(item)
            self.known.mark(f"{self.target.name}/{path.name}", isolated_bug)
            self.known_variants.add(self.variant(isolated))
            self.findings.known_saved.setdefault(isolated_bug, []).append(path)
