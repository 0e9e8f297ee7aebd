"""Every fenced Python and shell example in README.md and docs/*.md runs against a real broker.

(A ``toml`` fence is a configuration file: it must load as ``conveyor serve --config`` does.)

Goal: the documentation cannot drift from the product; an example that breaks fails
``make test``. Method: Sybil lexes each Markdown file (every ``docs/*.md`` is found by a
glob at collection time, so new pages are tested without registering them). Each
``python`` / ``sh`` fence (and each ``<!-- invisible-code-block: python -->`` used for
setup or assertions) is one test, run in document order with one namespace per document.
Each document gets its own ``conveyor serve`` child on free ports, started the way a user
starts it; a ``conveyor serve ...`` or ``make serve`` line in a shell example restarts
that broker with the line's own arguments. Ports: the examples say what a user types
(localhost:8080/9092/5672); the evaluator rewrites those to the free ports it started
on, because the defaults may be taken on a shared machine. A block preceded by
``<!-- example: background -->`` runs as a second process (a worker) for the rest of
the document; ``<!-- example: not runnable, <reason> -->`` keeps a block out (see
docs/dev/examples.md).

Why Sybil: it evaluates fenced blocks of any language through evaluators we supply
(shell as well as Python), shares a namespace across a document's blocks in order,
and has invisible code blocks for setup and assertions that readers do not see.
pytest-markdown-docs and pytest-examples run Python fences only, and pytest-examples
is built around print-output and lint checks rather than a live server.
"""

from __future__ import annotations

import contextlib
import gc
import io
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sybil import Document, Example, Region
from sybil.parsers.markdown.codeblock import CodeBlockParser

from conveyor.config import DEFAULT_PORTS, ServerConfig, load_config
from conveyor.testing.server import BrokerProcess

ROOT = Path(__file__).resolve().parents[2]
RUNNABLE_LANGUAGES = {
    "python": "python", "sh": "sh", "shell": "sh", "bash": "sh", "toml": "toml",
}
SHELL_TIMEOUT_S = 60
_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_DIRECTIVE = re.compile(r"<!--\s*example:\s*([^>]*?)\s*-->\s*\Z")
_SERVE = re.compile(r"^(?:make serve|conveyor serve)\b")


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def directive_before(text: str, start: int) -> str | None:
    """The ``<!-- example: ... -->`` comment right above a fence, if any."""
    match = _DIRECTIVE.search(text[:start])
    return match.group(1) if match else None


@dataclass(frozen=True)
class Block:
    language: str
    source: str
    background: bool


class ExampleParser(CodeBlockParser):
    """Python and shell fences and invisible code blocks, minus the non-runnable ones."""

    def __init__(self) -> None:
        super().__init__(language="python")

    def __call__(self, document: Document) -> Iterator[Region]:
        for region in self.lexers(document):
            language = RUNNABLE_LANGUAGES.get(str(region.lexemes["arguments"]).strip())
            if language is None:
                continue
            directive = directive_before(document.text, region.start) or ""
            if directive.startswith("not runnable"):
                continue
            region.parsed = Block(language, str(region.lexemes["source"]),
                                  directive == "background")
            region.evaluator = evaluate
            yield region


@dataclass
class DocumentRun:
    """One document's broker, working directory and background processes."""

    workdir: Path
    broker: BrokerProcess | None = None
    brokers_started: int = 0
    background: list[subprocess.Popen[bytes]] = field(default_factory=list)
    namespace: dict[str, Any] = field(default_factory=dict)  # the document's, shared by its blocks

    def start_broker(self, arguments: list[str]) -> None:
        self.stop_broker()
        listeners = [c.name for c in ServerConfig().listeners if c.enabled]
        extra: list[str] = []
        words = iter(arguments)
        for word in words:
            if word == "--listeners":
                listeners = next(words).split(",")
            elif word.startswith("--listeners="):
                listeners = word.removeprefix("--listeners=").split(",")
            else:
                extra.append(word)
        self.brokers_started += 1
        data_dir = self.workdir / f"conveyor-data-{self.brokers_started}"
        data_dir.mkdir()
        self.broker = BrokerProcess(data_dir, listeners=listeners, extra_args=extra,
                                    cwd=self.workdir)  # where the shell blocks run
        self.broker.start()

    def ensure_broker(self) -> BrokerProcess:
        if self.broker is None:
            self.start_broker([])
        assert self.broker is not None
        return self.broker

    def rewrite(self, source: str) -> str:
        """What the user types (default ports) -> the ports this broker listens on."""
        ports = self.ensure_broker().ports
        for name, default_port in DEFAULT_PORTS.items():
            if name in ports:
                for host in ("localhost", "127.0.0.1"):
                    source = source.replace(f"{host}:{default_port}", f"{host}:{ports[name]}")
        return source

    def environment(self) -> dict[str, str]:
        import os

        ports = self.ensure_broker().ports
        environ = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        if "http" in ports:
            environ["CONVEYOR_URL"] = f"http://127.0.0.1:{ports['http']}"
        return environ

    def stop_broker(self) -> None:
        if self.broker is not None and self.broker.process is not None:
            if self.broker.process.poll() is None:
                self.broker.stop()
        self.broker = None

    def close(self) -> list[str]:
        """Stop everything; returns what went wrong in background processes."""
        # The examples' clients go before their broker: a Kafka producer left alive keeps
        # reconnecting to the stopped broker (and logging it) until the interpreter exits.
        self.namespace.clear()
        gc.collect()
        problems = []
        for process in self.background:
            if process.poll() is not None and process.returncode != 0:
                problems.append(f"background example exited with {process.returncode}")
            else:
                process.terminate()
            process.wait(timeout=SHELL_TIMEOUT_S)
        self.stop_broker()
        return problems


def evaluate(example: Example) -> None:
    run: DocumentRun = example.namespace["document_run"]
    block: Block = example.parsed
    if block.language == "sh":
        run_shell(run, block.source, example)
        return
    if block.language == "toml":  # a configuration file, as `conveyor serve --config` reads it
        path = run.workdir / f"conveyor-{example.line}.toml"
        path.write_text(block.source)
        example.namespace["config"] = load_config(path, environ={})
        return
    source = "\n" * (example.line) + run.rewrite(block.source)
    if block.background:
        script = run.workdir / f"background-{example.line}.py"
        script.write_text(source)
        log = (run.workdir / f"background-{example.line}.log").open("wb")
        run.background.append(subprocess.Popen(
            [sys.executable, str(script)], cwd=run.workdir, env=run.environment(),
            stdout=log, stderr=subprocess.STDOUT))
        return
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(source, example.path, "exec"), example.namespace)
    finally:
        sys.stdout.write(printed.getvalue())  # still shown with -s or on failure
        example.namespace["python_output"] = printed.getvalue()


def shell_commands(source: str) -> list[str]:
    return [c.strip() for c in source.replace("\\\n", " ").splitlines() if c.strip()]


def run_shell(run: DocumentRun, source: str, example: Example) -> None:
    outputs = []
    for command in shell_commands(source):
        if _SERVE.match(command):
            words = shlex.split(command, comments=True)
            run.start_broker(words[2:])
            continue
        completed = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", run.rewrite(command)], cwd=run.workdir,
            env=run.environment(), capture_output=True, timeout=SHELL_TIMEOUT_S, check=False,
        )
        assert completed.returncode == 0, (
            f"{example.path}:{example.line}: `{command}` exited {completed.returncode}\n"
            f"{completed.stdout.decode(errors='replace')}{completed.stderr.decode(errors='replace')}"
        )
        outputs.append(completed.stdout.decode(errors="replace"))
    example.namespace["shell_output"] = "".join(outputs)


def collect() -> list[Any]:
    parser = ExampleParser()
    params = []
    for path in documents():
        document = Document.parse(str(path), parser)
        for example in document.examples():
            name = path.relative_to(ROOT).as_posix()
            params.append(pytest.param(example, id=f"{name}:{example.line}"))
    return params


class DocumentRuns:
    """At most one document's broker alive at a time: the next document stops it."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.current: tuple[str, DocumentRun] | None = None

    def for_example(self, example: Example) -> DocumentRun:
        if self.current is not None and self.current[0] != example.path:
            self.finish()
        if self.current is None:
            workdir = self.tmp_path_factory.mktemp(Path(example.path).stem)
            self.current = (example.path, DocumentRun(workdir))
        return self.current[1]

    def finish(self) -> None:
        if self.current is not None:
            path, run = self.current
            self.current = None
            problems = run.close()
            assert not problems, f"{path}: {problems}"


@pytest.fixture(scope="module")
def document_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DocumentRuns]:
    runs = DocumentRuns(tmp_path_factory)
    yield runs
    runs.finish()


@pytest.mark.parametrize("example", collect())
def test_example(example: Example, document_runs: DocumentRuns) -> None:
    run = document_runs.for_example(example)
    run.namespace = example.namespace
    example.namespace["document_run"] = run
    example.evaluate()


def test_every_fence_names_its_language_and_every_exception_its_reason() -> None:
    """An untagged fence would escape the tests silently; a skipped block must say why."""
    problems = []
    not_runnable = []
    for path in documents():
        text = path.read_text()
        for match in _FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            where = f"{path.relative_to(ROOT)}:{line}"
            if not match.group(1).strip():
                problems.append(f"{where}: tag the fence (python/sh to run it, text if not code)")
            directive = directive_before(text, match.start())
            if directive is not None and directive.startswith("not runnable"):
                if not directive.removeprefix("not runnable").strip(" ,"):
                    problems.append(f"{where}: `example: not runnable` needs a reason")
                not_runnable.append(where)
            elif directive not in (None, "background"):
                problems.append(f"{where}: unknown directive `example: {directive}`")
    assert problems == []
    # 6: the two PostgreSQL examples (docs/postgres.md, docs/cluster.md) need a database
    # server at a real address; the rest start servers in the foreground or install things
    assert len(not_runnable) <= 6, f"few blocks may be exempt, found: {not_runnable}"
