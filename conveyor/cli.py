"""Command line: ``conveyor serve`` runs the broker; the other commands are clients.

    conveyor [--url URL] topics|queues|exchanges|groups list|create|describe|delete
    conveyor [--url URL] exchanges bind|unbind EXCHANGE DESTINATION
    conveyor [--url URL] publish TOPIC [VALUE ...] [--file PATH ...]   (else stdin lines)
    conveyor [--url URL] consume TOPIC [--group G] [--mode shared|ordered] [--follow] ...
    conveyor [--url URL] dlq list|redrive QUEUE [--group G]
    conveyor [--url URL] top [--once] | definitions export|import   (cli_management.py)

The server URL comes from ``--url``, else ``CONVEYOR_URL``, else http://localhost:8080;
credentials from ``--user``/``--password``/``--token``, the URL, or the environment
(users, permissions, vhosts, acls: cli_security.py).
Listings print a table (rich) or, with ``--json``, JSON. Exit codes: 0 ok, 1 other
error, 2 usage or bad request (400/413/415), 3 not found (404), 4 conflict (409),
5 server unreachable or unavailable (503), 6 refused (401/403), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from conveyor import cli_security, cli_verify

if TYPE_CHECKING:
    from conveyor.client import Client


def _add_serve(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help="run the broker")
    serve.add_argument("--config", type=Path, help="TOML config file")
    serve.add_argument("--data-dir", dest="data_dir", help="data directory (./conveyor-data)")
    serve.add_argument("--storage", help="file:[PATH] (default) or postgresql://user@host/db")
    serve.add_argument("--host", help="address to listen on (127.0.0.1)")
    serve.add_argument("--advertised-host", dest="advertised_host")
    serve.add_argument("--node-id", help="several nodes on one PostgreSQL: N or auto")
    serve.add_argument("--workers", type=int, help="N node processes (needs postgresql://)")
    serve.add_argument("--reuse-port", dest="reuse_port", action="store_true", default=None,
                       help="AMQP/HTTP/SQS ports shared by several processes (SO_REUSEPORT)")
    serve.add_argument("--listeners", help="comma-separated listeners to enable")
    serve.add_argument("--kafka-port", type=int)
    serve.add_argument("--amqp-port", type=int)
    serve.add_argument("--http-port", type=int)
    serve.add_argument("--sqs-port", type=int, help="SQS API port (9324)")
    serve.add_argument("--internal-port", dest="internal_port", type=int,
                       help="a cluster node's node-to-node port (0: any free port)")
    serve.add_argument("--log-level", dest="log_level")
    serve.add_argument("--log-format", dest="log_format", choices=("text", "json"))
    cli_security.add_serve_flags(serve)
    for flag, text in (("cert", "PEM certificate chain: TLS on every listener"),
                       ("key", "PEM private key"), ("ca", "PEM CA for client certificates")):
        serve.add_argument(f"--tls-{flag}", metavar="FILE", help=text + " (docs/security.md)")
    serve.add_argument("--tls-verify", choices=("none", "optional", "required"),
                       help="client certificates (optional when --tls-ca is given)")


def _serve(arguments: argparse.Namespace) -> int:
    from conveyor.config import load_config
    from conveyor.errors import ConveyorError
    from conveyor.server.app import run
    from conveyor.server.logging import configure_logging

    ports = {
        name: getattr(arguments, f"{name}_port")
        for name in ("kafka", "amqp", "http", "sqs")
        if getattr(arguments, f"{name}_port") is not None
    }
    # the serve flags by their dest names (data_dir, host, ..., tls_cert, tls_verify, auth)
    flags = {**vars(arguments), **cli_security.serve_flags(arguments), "ports": ports,
             "listeners": arguments.listeners.split(",") if arguments.listeners else None}
    try:
        config = load_config(arguments.config, flags=flags)
        configure_logging(config.log_level, config.log_format)
        if config.workers > 1:  # several node processes (conveyor/cluster/workers.py)
            from conveyor.cluster.workers import run_workers
            return run_workers(sys.argv[sys.argv.index("serve") + 1:], config)
        run(config)
    except ConveyorError as error:
        print(f"conveyor: {error}", file=sys.stderr)
        return 2
    return 0


EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_UNAVAILABLE = 5
EXIT_REFUSED = 6  # 401 / 403: credentials missing or wrong, or not permitted
EXIT_INTERRUPTED = 130
PUBLISH_BATCH_DEFAULT = 500  # messages per request when publishing many
PROGRESS_THRESHOLD = 1000  # show a progress bar from this many messages on


def exit_code_for(status: int) -> int:
    if status in (401, 403):
        return EXIT_REFUSED
    if status == 404:
        return EXIT_NOT_FOUND
    if status == 409:
        return EXIT_CONFLICT
    if status in (503, 429):
        return EXIT_UNAVAILABLE
    if 400 <= status < 500:
        return EXIT_USAGE
    return EXIT_ERROR


# --- parsers ------------------------------------------------------------------------------
def _pairs(values: list[str] | None, what: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in values or ():
        name, separator, value = item.partition("=")
        if not separator:
            raise argparse.ArgumentTypeError(f"{what} must be NAME=VALUE, got {item!r}")
        result[name] = value
    return result


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_admin(subparsers: Any) -> None:
    topics = subparsers.add_parser("topics", help="list, create, describe, delete topics")
    actions = topics.add_subparsers(dest="action", required=True)
    _add_json(actions.add_parser("list", help="list topics"))
    create = actions.add_parser("create", help="create a topic")
    create.add_argument("name")
    create.add_argument("--partitions", type=int, default=1)
    create.add_argument("--config", action="append", metavar="NAME=VALUE",
                        help="topic setting, e.g. retention.ms=3600000 (repeatable)")
    _add_json(create)
    describe = actions.add_parser("describe", help="a topic's partitions and config")
    describe.add_argument("name")
    _add_json(describe)
    actions.add_parser("delete", help="delete a topic").add_argument("name")

    queues = subparsers.add_parser("queues", help="list, create, describe, delete queues")
    actions = queues.add_subparsers(dest="action", required=True)
    _add_json(actions.add_parser("list", help="list queues"))
    create = actions.add_parser("create", help="declare a queue")
    create.add_argument("name")
    create.add_argument("--visibility-timeout-ms", type=int)
    create.add_argument("--max-deliveries", type=int)
    create.add_argument("--dead-letter-topic")
    create.add_argument("--delay-ms", type=int)
    create.add_argument("--message-ttl-ms", type=int)
    create.add_argument("--max-length", type=int)
    create.add_argument("--max-priority", type=int)
    create.add_argument("--partitions", type=int)
    _add_json(create)
    describe = actions.add_parser("describe", help="a queue's counts and config")
    describe.add_argument("name")
    _add_json(describe)
    actions.add_parser("delete", help="delete a queue").add_argument("name")

    exchanges = subparsers.add_parser("exchanges", help="exchanges and bindings")
    actions = exchanges.add_subparsers(dest="action", required=True)
    _add_json(actions.add_parser("list", help="list exchanges"))
    create = actions.add_parser("create", help="declare an exchange")
    create.add_argument("name")
    create.add_argument("--type", required=True, choices=("direct", "topic", "fanout",
                                                           "headers"))
    _add_json(create)
    describe = actions.add_parser("describe", help="an exchange and its bindings")
    describe.add_argument("name")
    _add_json(describe)
    actions.add_parser("delete", help="delete an exchange").add_argument("name")
    for verb in ("bind", "unbind"):
        binding = actions.add_parser(verb, help=f"{verb} a queue, topic or exchange")
        binding.add_argument("name", help="source exchange")
        binding.add_argument("destination")
        binding.add_argument("--kind", default="queue", choices=("queue", "topic", "exchange"))
        binding.add_argument("--routing-key", default="")
        binding.add_argument("--argument", action="append", metavar="NAME=VALUE")

    groups = subparsers.add_parser("groups", help="consumer groups and their lag")
    actions = groups.add_subparsers(dest="action", required=True)
    _add_json(actions.add_parser("list", help="list groups"))
    create = actions.add_parser("create", help="create a shared or ordered group on a topic")
    create.add_argument("name")
    create.add_argument("--topic", required=True)
    create.add_argument("--kind", choices=("shared", "ordered"), default="shared")
    create.add_argument("--start", choices=("earliest", "latest"), default="earliest")
    create.add_argument("--max-deliveries", type=int)
    create.add_argument("--visibility-timeout-ms", type=int)
    _add_json(create)
    describe = actions.add_parser("describe", help="an ordered group's lag per partition")
    describe.add_argument("name")
    _add_json(describe)
    actions.add_parser("delete", help="delete an empty ordered group").add_argument("name")

    dlq = subparsers.add_parser("dlq", help="dead-lettered messages")
    actions = dlq.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="messages in a queue's dead-letter queue")
    listing.add_argument("name", help="queue (or topic, with --group)")
    listing.add_argument("--group")
    listing.add_argument("--limit", type=int, default=100)
    _add_json(listing)
    redrive = actions.add_parser("redrive", help="move dead-lettered messages back")
    redrive.add_argument("name", help="queue (or topic, with --group)")
    redrive.add_argument("--group")
    redrive.add_argument("--limit", type=int, default=1000)
    _add_json(redrive)


def _add_publish(subparsers: Any) -> None:
    publish = subparsers.add_parser(
        "publish", help="publish messages: arguments, --file, or one per stdin line")
    publish.add_argument("topic")
    publish.add_argument("values", nargs="*", help="message values (UTF-8)")
    publish.add_argument("--file", action="append", type=Path, default=[],
                         help="a file whose bytes are one message (repeatable)")
    publish.add_argument("--key")
    publish.add_argument("--header", action="append", metavar="NAME=VALUE")
    publish.add_argument("--partition", type=int)
    publish.add_argument("--priority", type=int)
    publish.add_argument("--delay-s", type=float)
    publish.add_argument("--batch-size", type=int, default=PUBLISH_BATCH_DEFAULT)
    publish.add_argument("--progress", choices=("auto", "always", "never"), default="auto")
    _add_json(publish)


def _add_consume(subparsers: Any) -> None:
    consume = subparsers.add_parser("consume", help="print messages (one per line or JSON)")
    consume.add_argument("topic")
    consume.add_argument("--group", help="consumer group (a queue's default: its name)")
    consume.add_argument("--mode", choices=("shared", "ordered"),
                         help="shared: locked + acked per message; ordered: by offset")
    consume.add_argument("--follow", "-f", action="store_true", help="keep waiting")
    consume.add_argument("--from-beginning", action="store_true")
    consume.add_argument("--from-timestamp-ms", type=int)
    consume.add_argument("--max-messages", "-n", type=int, help="stop after this many")
    consume.add_argument("--wait-s", type=float, default=1.0,
                         help="long-poll time; without --follow, stop after one empty poll")
    consume.add_argument("--no-ack", action="store_true",
                         help="shared mode: release instead of ack (peek)")
    consume.add_argument("--json", action="store_true", help="one JSON document per line")


# --- output -------------------------------------------------------------------------------
def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, sort_keys=True))


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    Console().print(table)


def _show(document: Any, as_json: bool, title: str, columns: list[str],
          rows: list[list[Any]]) -> None:
    if as_json:
        _print_json(document)
    else:
        _table(title, columns, rows)


def _show_mapping(document: dict[str, Any], as_json: bool, title: str) -> None:
    if as_json:
        _print_json(document)
        return
    rows = [[name, json.dumps(value) if isinstance(value, dict | list) else value]
            for name, value in document.items()]
    _table(title, ["field", "value"], rows)


# --- commands -----------------------------------------------------------------------------
def _topics(client: Client, arguments: argparse.Namespace) -> int:
    action = arguments.action
    if action == "list":
        topics = client.list_topics()
        _show(topics, arguments.json, "topics", ["name", "kind", "partitions", "messages"],
              [[t["name"], t["kind"], t["partitions"], t.get("messages")] for t in topics])
    elif action == "create":
        config = _pairs(arguments.config, "--config")
        created = client.create_topic(arguments.name, arguments.partitions, config)
        _show_mapping(created, arguments.json, f"topic {arguments.name}")
    elif action == "describe":
        described = client.describe_topic(arguments.name)
        if arguments.json:
            _print_json(described)
        else:
            _table(f"topic {arguments.name}",
                   ["partition", "log start offset", "high watermark"],
                   [[p["partition"], p["log_start_offset"], p["high_watermark"]]
                    for p in described.get("partition_offsets", [])])
            _table("config", ["name", "value"], sorted(
                [name, value] for name, value in described.get("config", {}).items()))
    elif action == "delete":
        client.delete_topic(arguments.name)
    return EXIT_OK


def _queues(client: Client, arguments: argparse.Namespace) -> int:
    action = arguments.action
    if action == "list":
        queues = client.list_queues()
        _show(queues, arguments.json, "queues", ["name", "ready", "in flight", "delayed"],
              [[q["name"], q.get("ready"), q.get("in_flight"), q.get("delayed")]
               for q in queues])
    elif action == "create":
        options = {
            name: getattr(arguments, name)
            for name in ("visibility_timeout_ms", "max_deliveries", "dead_letter_topic",
                         "delay_ms", "message_ttl_ms", "max_length", "max_priority",
                         "partitions")
            if getattr(arguments, name) is not None
        }
        _show_mapping(client.create_queue(arguments.name, **options), arguments.json,
                      f"queue {arguments.name}")
    elif action == "describe":
        _show_mapping(client.describe_queue(arguments.name), arguments.json,
                      f"queue {arguments.name}")
    elif action == "delete":
        client.delete_queue(arguments.name)
    return EXIT_OK


def _exchanges(client: Client, arguments: argparse.Namespace) -> int:
    action = arguments.action
    if action == "list":
        exchanges = client.list_exchanges()
        _show(exchanges, arguments.json, "exchanges", ["name", "type", "durable"],
              [[e["name"] or "(default)", e["type"], e.get("durable")] for e in exchanges])
    elif action == "create":
        _show_mapping(client.create_exchange(arguments.name, arguments.type), arguments.json,
                      f"exchange {arguments.name}")
    elif action == "describe":
        described = client.describe_exchange(arguments.name)
        if arguments.json:
            _print_json(described)
        else:
            _table(f"exchange {arguments.name} ({described['type']})",
                   ["destination", "kind", "routing key", "arguments"],
                   [[b["destination"], b["destination_kind"], b.get("routing_key"),
                     json.dumps(b.get("arguments") or {})]
                    for b in described.get("bindings", [])])
    elif action == "delete":
        client.delete_exchange(arguments.name)
    elif action in ("bind", "unbind"):
        method = client.bind if action == "bind" else client.unbind
        method(arguments.name, arguments.destination, destination_kind=arguments.kind,
               routing_key=arguments.routing_key,
               arguments=_pairs(arguments.argument, "--argument"))
    return EXIT_OK


def _groups(client: Client, arguments: argparse.Namespace) -> int:
    action = arguments.action
    if action == "list":
        groups = client.list_groups()
        _show(groups, arguments.json, "groups", ["group", "kind", "state", "topic"],
              [[g["group"], g["kind"], g.get("state"), g.get("topic")] for g in groups])
    elif action == "create":
        options = {
            name: getattr(arguments, name)
            for name in ("max_deliveries", "visibility_timeout_ms")
            if getattr(arguments, name) is not None
        }
        created = client.create_group(arguments.topic, arguments.name, kind=arguments.kind,
                                      start=arguments.start, **options)
        _show_mapping(created, arguments.json, f"group {arguments.name}")
    elif action == "describe":
        described = client.describe_group(arguments.name)
        _show(described, arguments.json,
              f"group {arguments.name} ({described.get('state')}, "
              f"lag {described.get('total_lag')})",
              ["topic", "partition", "committed", "high watermark", "lag"],
              [[p["topic"], p["partition"], p["committed_offset"], p["high_watermark"],
                p["lag"]] for p in described["partitions"]])
    elif action == "delete":
        client.delete_group(arguments.name)
    return EXIT_OK


def _dlq(client: Client, arguments: argparse.Namespace) -> int:
    if arguments.action == "redrive":
        count = client.redrive(arguments.name, arguments.group, arguments.limit)
        if arguments.json:
            _print_json({"redriven": count})
        else:
            print(f"redrove {count} message(s)")
        return EXIT_OK
    messages = client.dlq(arguments.name, arguments.group, limit=arguments.limit)
    documents = [m.to_document() for m in messages]
    _show(documents, arguments.json, f"dead letters of {arguments.name}",
          ["offset", "reason", "source", "value"],
          [[m.offset, _header_text(m.headers.get("conveyor.dead-reason")),
            _header_text(m.headers.get("conveyor.source")), _preview(m.value)]
           for m in messages])
    return EXIT_OK


def _header_text(raw: bytes | None) -> str:
    return "" if raw is None else raw.decode("utf-8", "replace")


def _preview(value: bytes | None, length: int = 60) -> str:
    if value is None:
        return "(null)"
    text = value.decode("utf-8", "replace")
    return text if len(text) <= length else text[: length - 1] + "…"


def _publish_inputs(arguments: argparse.Namespace) -> tuple[Iterator[bytes], int | None]:
    """The message values and, when known up front, how many there are."""
    if arguments.values or arguments.file:
        values = [v.encode("utf-8") for v in arguments.values]
        values.extend(path.read_bytes() for path in arguments.file)
        return iter(values), len(values)
    lines = (line.rstrip(b"\r\n") for line in sys.stdin.buffer)
    return (line for line in lines if line), None


def _publish(client: Client, arguments: argparse.Namespace) -> int:
    from conveyor.client import encode_message

    headers = _pairs(arguments.header, "--header") or None
    values, total = _publish_inputs(arguments)
    show_progress = arguments.progress == "always" or (
        arguments.progress == "auto" and sys.stderr.isatty()
        and (total is None or total >= PROGRESS_THRESHOLD)
    )
    results: list[dict[str, Any]] = []
    published = 0

    def batches() -> Iterator[list[dict[str, Any]]]:
        batch: list[dict[str, Any]] = []
        for value in values:
            batch.append(encode_message(
                value, key=arguments.key, headers=headers, partition=arguments.partition,
                priority=arguments.priority, delay_s=arguments.delay_s,
            ))
            if len(batch) >= max(1, arguments.batch_size):
                yield batch
                batch = []
        if batch:
            yield batch

    progress = _progress(show_progress, total)
    with progress:
        task = progress.add_task(f"publishing to {arguments.topic}", total=total)
        for batch in batches():
            for result in client.publish_batch(arguments.topic, batch):
                results.append({"partition": result.partition, "offset": result.offset,
                                "duplicate": result.duplicate})
            published += len(batch)
            progress.update(task, completed=published)
    if arguments.json:
        _print_json({"topic": arguments.topic, "published": published, "results": results})
    else:
        print(f"published {published} message(s) to {arguments.topic}", file=sys.stderr)
    return EXIT_OK


def _progress(enabled: bool, total: int | None) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), disable=not enabled)


def _consume(client: Client, arguments: argparse.Namespace) -> int:
    count = 0
    mode: Literal["shared", "ordered"] | None = arguments.mode
    if arguments.max_messages is not None and arguments.max_messages <= 0:
        return EXIT_OK
    limit = 100 if arguments.max_messages is None else min(100, arguments.max_messages)
    messages = client.consume(
        arguments.topic, group=arguments.group, mode=mode, wait_s=arguments.wait_s,
        follow=arguments.follow, limit=limit, from_beginning=arguments.from_beginning,
        from_timestamp_ms=arguments.from_timestamp_ms,
    )
    try:
        for message in messages:
            if arguments.json:
                print(json.dumps(message.to_document(), sort_keys=True), flush=True)
            else:
                sys.stdout.buffer.write((message.value or b"") + b"\n")
                sys.stdout.flush()
            if message.receipt is not None and arguments.no_ack:
                message.release()
            else:
                message.ack()
            count += 1
            if arguments.max_messages is not None and count >= arguments.max_messages:
                break
    finally:
        close = getattr(messages, "close", None)
        if close is not None:
            close()  # commits ordered acks; releases shared messages never printed
    return EXIT_OK


CLIENT_COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "topics": _topics,
    "queues": _queues,
    "exchanges": _exchanges,
    "groups": _groups,
    "dlq": _dlq,
    "publish": _publish,
    "consume": _consume,
}


def _run_client(arguments: argparse.Namespace) -> int:
    from conveyor.client import Client, ConnectionFailedError
    from conveyor.errors import ConveyorError

    url = cli_security.server_url(arguments)
    try:
        with Client(url, **cli_security.client_credentials(arguments)) as client:
            return CLIENT_COMMANDS[arguments.command](client, arguments)
    except ConnectionFailedError as error:
        print(f"conveyor: cannot reach {url}: {error.details.get('reason', error)}",
              file=sys.stderr)
        return EXIT_UNAVAILABLE
    except ConveyorError as error:
        print(f"conveyor: {error.code}: {error}", file=sys.stderr)
        return exit_code_for(error.http_status)
    except argparse.ArgumentTypeError as error:
        print(f"conveyor: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader (``| head``) went away: stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except OSError as error:
        print(f"conveyor: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conveyor", description="Conveyor message broker")
    cli_security.add_credential_flags(parser)  # --url, --user, --password, --token, --vhost
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_serve(subparsers)
    _add_admin(subparsers)
    _add_publish(subparsers)
    _add_consume(subparsers)
    cli_verify.add_parser(subparsers)
    from conveyor import cli_management

    cli_management.add_parsers(subparsers)
    cli_security.add_parsers(subparsers)
    arguments = parser.parse_args(argv)
    if arguments.command == "serve":
        return _serve(arguments)
    if arguments.command == "verify":
        return cli_verify.run(arguments)
    if arguments.command in ("top", "definitions", "cluster"):
        return cli_management.run(arguments, cli_security.server_url(arguments))
    if arguments.command in cli_security.COMMANDS:
        return cli_security.run(arguments)
    if arguments.command in CLIENT_COMMANDS:
        return _run_client(arguments)
    parser.error(f"unknown command {arguments.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
