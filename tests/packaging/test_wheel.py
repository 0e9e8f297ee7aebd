"""The built wheel works without the repository: what ``pip install conveyor`` gives a user.

Goal: a module, data file or runtime dependency that only the checkout provides (a
package missing from the wheel, a dependency that only the dev extra brings in) fails
here instead of on a user's machine. Method: copy the tracked source to a temporary
directory, build the wheel there (``pip wheel``, build isolation as a user's build),
install it with its runtime dependencies into a fresh venv, pinned by constraints.txt
like ``make serve``; then run that venv's ``conveyor serve`` from an empty directory
with no PYTHONPATH, every listener on a port the OS picks (read back from the
``conveyor ready`` line), and pass one message through each protocol it speaks: HTTP
with the wheel's own client, Kafka with confluent-kafka, AMQP with pika, SQS with boto3.

Cost: about 10 s (wheel build, install, start; more on a loaded machine). Wheels come
from make's wheel cache (CONVEYOR_WHEELS) without asking the index, as ``make`` installs;
only a wheel missing there is fetched from the index.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LISTENERS = ("http", "kafka", "amqp", "sqs")
PIP_TIMEOUT_S = 600
STARTUP_TIMEOUT_S = 30
_READY = re.compile(r"^conveyor ready: (.*)$")

pytestmark = pytest.mark.timeout(PIP_TIMEOUT_S)


@dataclass(frozen=True)
class Installed:
    wheel: Path
    python: Path
    conveyor: Path
    workdir: Path  # empty directory outside the repository: where commands run


def tracked_files() -> list[Path]:
    """The files a clone has (git's list; every file when this is not a git checkout)."""
    if (ROOT / ".git").exists():
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout.decode()
        return [Path(name) for name in listed.split("\0") if name and (ROOT / name).is_file()]
    ignored = {".venv", ".git", "build", "dist", "conveyor-data", "__pycache__"}
    return [
        path.relative_to(ROOT)
        for path in ROOT.rglob("*")
        if path.is_file() and not ignored.intersection(path.relative_to(ROOT).parts)
    ]


def clean_environment() -> dict[str, str]:
    """The caller's environment minus whatever could put the repository on sys.path."""
    hidden = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"}
    return {key: value for key, value in os.environ.items() if key not in hidden}


def wheel_cache() -> Path:
    """Where make keeps the pinned wheels (see the Makefile's CONVEYOR_WHEELS)."""
    if os.environ.get("CONVEYOR_WHEELS"):
        return Path(os.environ["CONVEYOR_WHEELS"])
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "conveyor" / "wheels"


def run_pip(arguments: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", *arguments], capture_output=True, text=True,
        timeout=PIP_TIMEOUT_S, check=False, env=clean_environment(),
    )


def pip(*arguments: str) -> None:
    """pip from make's wheel cache without the index, as make does; from the index on a miss."""
    cache = ["--find-links", str(wheel_cache())]
    completed = run_pip([*arguments, "--no-index", *cache])
    if completed.returncode != 0:
        completed = run_pip([*arguments, *cache])
    assert completed.returncode == 0, (
        f"pip {arguments[0]} failed:\n{completed.stdout}\n{completed.stderr}"
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    for relative in tracked_files():
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, source / relative)
    pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(base / "dist"), str(source))
    [wheel] = (base / "dist").glob("conveyor-*.whl")
    venv = base / "venv"
    # No pip inside: this interpreter's pip installs into it (``--python``), which saves
    # seeding a pip the user would have anyway.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip("--python", str(python), "install", "--quiet", "--no-compile",
        "--constraint", str(ROOT / "constraints.txt"), str(wheel))
    workdir = base / "elsewhere"
    workdir.mkdir()
    return Installed(wheel, python, venv / "bin" / "conveyor", workdir)


def test_wheel_holds_every_file_of_the_package(installed: Installed) -> None:
    """Data files too (py.typed, anything a listener serves): not only the .py modules."""
    in_wheel = set(zipfile.ZipFile(installed.wheel).namelist())
    package_files = [
        path.as_posix() for path in tracked_files()
        if path.parts[0] == "conveyor" and path.suffix != ".pyc"
    ]
    assert package_files, "no tracked files under conveyor/"
    assert [name for name in package_files if name not in in_wheel] == []


def test_installed_package_is_the_wheel_not_the_checkout(installed: Installed) -> None:
    completed = subprocess.run(
        [str(installed.python), "-c", "import conveyor, sys; print(conveyor.__file__)"],
        cwd=installed.workdir, env=clean_environment(), capture_output=True, text=True,
        check=True,
    )
    location = Path(completed.stdout.strip())
    assert location.is_relative_to(installed.python.parent.parent), location
    assert not location.is_relative_to(ROOT)


@pytest.fixture(scope="module")
def served(installed: Installed) -> Iterator[dict[str, int]]:
    """``conveyor serve`` from the installed venv, run from an empty directory."""
    log_path = installed.workdir / "serve.log"
    arguments = [str(installed.conveyor), "serve", "--listeners", ",".join(LISTENERS),
                 *(f"--{name}-port=0" for name in LISTENERS)]
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            arguments, cwd=installed.workdir, env=clean_environment(),
            stdout=subprocess.PIPE, stderr=log_file, text=True,
        )
    try:
        assert process.stdout is not None
        ready = next((m for m in map(_READY.match, process.stdout) if m), None)
        assert ready is not None, f"conveyor serve exited:\n{log_path.read_text()}"
        ports = {
            name: int(address.rsplit(":", 1)[1])
            for name, address in (part.split("=", 1) for part in ready.group(1).split(", "))
        }
        yield ports
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=STARTUP_TIMEOUT_S) == 0, log_path.read_text()
        # The default data directory, relative to where the user ran it.
        assert (installed.workdir / "conveyor-data").is_dir()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_every_listener_is_up(served: dict[str, int]) -> None:
    assert sorted(served) == sorted(LISTENERS)


def test_http_with_the_installed_client(installed: Installed, served: dict[str, int]) -> None:
    script = f"""
from conveyor import Client
client = Client("http://127.0.0.1:{served['http']}")
client.publish("wheel-http", b"over http")
for message in client.consume("wheel-http", group="smoke", wait_s=10):
    message.ack()
    print(message.value.decode())
    break
"""
    completed = subprocess.run(
        [str(installed.python), "-c", script], cwd=installed.workdir, env=clean_environment(),
        capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S, check=False,
    )
    assert (completed.returncode, completed.stdout) == (0, "over http\n"), completed.stderr


def test_kafka(served: dict[str, int]) -> None:
    from confluent_kafka import Consumer, Producer, TopicPartition

    topic = unique("wheel-kafka")
    bootstrap = f"127.0.0.1:{served['kafka']}"
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, key=b"k", value=b"over kafka")
    assert producer.flush(10) == 0
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "smoke",
                         "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        message = consumer.poll(10)
        assert message is not None and message.error() is None
        assert (message.key(), message.value()) == (b"k", b"over kafka")
    finally:
        consumer.close()


def test_amqp(served: dict[str, int]) -> None:
    import pika

    queue = unique("wheel-amqp")
    connection = pika.BlockingConnection(
        pika.ConnectionParameters("127.0.0.1", served["amqp"], blocked_connection_timeout=10)
    )
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare(queue, durable=True)
        channel.basic_publish("", queue, b"over amqp", pika.BasicProperties(delivery_mode=2))
        method, _properties, body = channel.basic_get(queue)
        assert method is not None and body == b"over amqp"
        channel.basic_ack(method.delivery_tag)
    finally:
        connection.close()


def test_sqs(served: dict[str, int]) -> None:
    import boto3
    from botocore.config import Config

    sqs = boto3.client(
        "sqs", endpoint_url=f"http://127.0.0.1:{served['sqs']}", region_name="us-east-1",
        aws_access_key_id="any", aws_secret_access_key="any",
        config=Config(retries={"max_attempts": 1}),
    )
    url = sqs.create_queue(QueueName=unique("wheel-sqs"))["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="over sqs")
    [message] = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=10)["Messages"]
    assert message["Body"] == "over sqs"
    sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
