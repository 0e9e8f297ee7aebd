"""Command line for the management API: ``conveyor top`` and ``conveyor definitions``.

    conveyor [--url URL] top [--once] [--interval SECONDS]
    conveyor [--url URL] definitions export [--file PATH]
    conveyor [--url URL] definitions import PATH|-

``top`` is a live terminal view (rich's Live display) of the broker's message rates,
the queues by depth with their rates and consumers, and the consumer groups by lag,
read from ``/api/overview``, ``/api/queues`` and ``/api/conveyor/groups`` every
``--interval`` seconds; ``--once`` prints one frame and exits (scripts, tests).
``definitions`` exports or imports RabbitMQ-format definitions
(``GET/POST /api/definitions``); an import with a wrong entry imports nothing and
prints each wrong entry. Exit codes as the other commands (cli.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Final

import httpx
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

ROWS_MAX: Final = 20  # queues and groups shown per frame, the busiest first
TIMEOUT_S: Final = 10.0

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_UNAVAILABLE = 0, 1, 2, 3, 5
EXIT_INTERRUPTED = 130


def add_parsers(subparsers: Any) -> None:
    top = subparsers.add_parser("top", help="live view of rates, queue depths and group lag")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between frames")
    definitions = subparsers.add_parser(
        "definitions", help="export or import queues, exchanges, bindings (RabbitMQ format)")
    actions = definitions.add_subparsers(dest="action", required=True)
    export = actions.add_parser("export", help="print (or write) the definitions as JSON")
    export.add_argument("--file", type=Path, help="write here instead of stdout")
    load = actions.add_parser("import", help="import a definitions file (all or nothing)")
    load.add_argument("path", help="a JSON file, or - for stdin")
    cluster = subparsers.add_parser(
        "cluster", help="several nodes on one PostgreSQL: nodes, leases, owners and lag")
    cluster_actions = cluster.add_subparsers(dest="action", required=True)
    status = cluster_actions.add_parser(
        "status", help="nodes, leases, partition/group owners, group lag, queue backlog")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--partitions", action="store_true",
                        help="each group's lag per partition as well")


def _cluster_status(client: httpx.Client, arguments: argparse.Namespace,
                    console: Console) -> int:
    """``conveyor cluster status``: GET /cluster of the node ``--url`` names."""
    status = _get(client, "/cluster?lag=true")
    if arguments.json:
        print(json.dumps(status, sort_keys=True))
        return EXIT_OK
    if not status.get("clustered"):
        print("a single node (no --node-id): it leads and coordinates everything")
        return EXIT_OK
    owned: dict[int, list[str]] = {}
    for row in status["owners"]:
        if row["owner"] is not None:
            owned.setdefault(row["owner"], []).append(
                f"{row['kind']} {row['name']} (epoch {row['epoch']})")
    nodes = Table("node", "state", "lease until", "addresses", "owns")
    for node in status["nodes"]:
        state = "draining" if node["draining"] else ("live" if node["live"] else "dead")
        addresses = ", ".join(f"{name}={value}" for name, value in
                              sorted(node["addresses"].items()))
        nodes.add_row(f"node {node['node_id']}", state, node["lease_until"], addresses,
                      str(len(owned.get(node["node_id"], []))))
    console.print(nodes)
    owners = Table("item", "owner")
    for node_id, items in sorted(owned.items()):
        for item in sorted(items):
            owners.add_row(item, f"node {node_id}")
    console.print(owners)
    _print_lag(status.get("lag") or {}, arguments.partitions, console)
    return EXIT_OK


def _print_lag(lag: dict[str, Any], partitions: bool, console: Console) -> None:
    """Per group its total lag (``--partitions``: per partition too), per queue its
    backlog (ready + unacked), each with the node that owns it."""
    groups = Table("group", "coordinator", "lag", title="Consumer groups")
    for group in lag.get("groups", []):
        groups.add_row(Text(group["group"]), _node(group["owner"]), f"{group['lag']:,}")
    console.print(groups)
    if partitions:
        per_partition = Table("group", "topic", "partition", "committed", "end", "lag",
                              title="Lag per partition")
        for group in lag.get("groups", []):
            for row in group["partitions"]:
                per_partition.add_row(Text(group["group"]), Text(row["topic"]),
                                      str(row["partition"]), f"{row['committed']:,}",
                                      f"{row['end']:,}", f"{row['lag']:,}")
        console.print(per_partition)
    queues = Table("queue", "owner", "ready", "unacked", "delayed", "backlog",
                   title="Queues")
    for queue in lag.get("queues", []):
        queues.add_row(Text(queue["queue"]), _node(queue["owner"]), f"{queue['ready']:,}",
                       f"{queue['unacked']:,}", f"{queue['delayed']:,}",
                       f"{queue['backlog']:,}")
    console.print(queues)


def _node(node_id: int | None) -> str:
    return "-" if node_id is None else f"node {node_id}"


def _rate(details: dict[str, Any] | None) -> str:
    value = float((details or {}).get("rate", 0.0))
    return f"{value:,.1f}/s"


def render_frame(client: httpx.Client) -> Group:
    """One frame of ``top``: a summary line, the queues table and the groups table."""
    overview = _get(client, "/api/overview")
    queues = _get(client, "/api/queues")
    groups = _get(client, "/api/conveyor/groups")["groups"]
    stats, totals = overview["message_stats"], overview["object_totals"]
    summary = Text.assemble(
        ("Conveyor ", "bold"), f"{overview.get('product_version', '')}  ",
        ("publish ", "dim"), _rate(stats.get("publish_details")), "  ",
        ("deliver ", "dim"), _rate(stats.get("deliver_get_details")), "  ",
        ("ready ", "dim"), f"{overview['queue_totals']['messages_ready']:,}", "  ",
        ("unacked ", "dim"), f"{overview['queue_totals']['messages_unacknowledged']:,}", "  ",
        ("connections ", "dim"), f"{totals['connections']:,}", "  ",
        ("consumers ", "dim"), f"{totals['consumers']:,}")
    queue_table = Table(title=f"Queues ({len(queues)}, deepest first)", expand=True)
    for column in ("queue", "ready", "unacked", "consumers", "publish", "deliver"):
        queue_table.add_column(column, justify="left" if column == "queue" else "right")
    for queue in sorted(queues, key=lambda q: -q["messages"])[:ROWS_MAX]:
        message_stats = queue.get("message_stats", {})
        queue_table.add_row(
            Text(queue["name"]), f"{queue['messages_ready']:,}",
            f"{queue['messages_unacknowledged']:,}", f"{queue['consumers']:,}",
            _rate(message_stats.get("publish_details")),
            _rate(message_stats.get("deliver_get_details")))
    ordered = [group for group in groups if group["kind"] == "ordered"]
    group_table = Table(title=f"Consumer groups ({len(ordered)}, most lag first)", expand=True)
    for column in ("group", "state", "members", "topics", "lag"):
        group_table.add_column(column, justify="right" if column in ("members", "lag")
                               else "left")
    for group in sorted(ordered, key=lambda g: -g["total_lag"])[:ROWS_MAX]:
        group_table.add_row(Text(group["group"]), group["state"], f"{group['members']:,}",
                            Text(", ".join(group["topics"])), f"{group['total_lag']:,}")
    return Group(summary, queue_table, group_table)


def _get(client: httpx.Client, path: str) -> Any:
    response = client.get(path)
    response.raise_for_status()
    return response.json()


def _top(client: httpx.Client, arguments: argparse.Namespace, console: Console) -> int:
    if arguments.once:
        console.print(render_frame(client))
        return EXIT_OK
    from rich.live import Live

    with Live(render_frame(client), console=console, screen=False,
              auto_refresh=False) as live:
        while True:
            time.sleep(max(0.25, arguments.interval))  # a terminal view: wall-clock pacing
            live.update(render_frame(client), refresh=True)


def _definitions(client: httpx.Client, arguments: argparse.Namespace) -> int:
    if arguments.action == "export":
        text = json.dumps(_get(client, "/api/definitions"), indent=2, sort_keys=True) + "\n"
        if arguments.file is not None:
            arguments.file.write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)
        return EXIT_OK
    raw = sys.stdin.read() if arguments.path == "-" else Path(arguments.path).read_text(
        encoding="utf-8")
    try:
        document = json.loads(raw)
    except ValueError as error:
        print(f"conveyor: {arguments.path}: not JSON: {error}", file=sys.stderr)
        return EXIT_USAGE
    response = client.post("/api/definitions", json=document)
    body = response.json() if response.content else {}
    if response.status_code >= 400:
        print(f"conveyor: import refused: {body.get('reason', response.text)}", file=sys.stderr)
        for entry in body.get("errors", []):
            print(f"  {entry['entry']} {entry['name']!r}: {entry['reason']}", file=sys.stderr)
        return EXIT_USAGE if response.status_code == 400 else EXIT_ERROR
    imported = ", ".join(f"{count} {kind}" for kind, count in body["imported"].items())
    print(f"imported {imported}")
    for section, count in body.get("ignored", {}).items():
        print(f"ignored {count} {section} (no security model yet)")
    return EXIT_OK


def run(arguments: argparse.Namespace, url: str, console: Console | None = None) -> int:
    from conveyor.cli_security import client_credentials
    from conveyor.client.core import credentials

    console = console or Console()
    url, headers = credentials(url, environ=os.environ, **client_credentials(arguments))
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=TIMEOUT_S) as client:
            if arguments.command == "top":
                return _top(client, arguments, console)
            if arguments.command == "cluster":
                return _cluster_status(client, arguments, console)
            return _definitions(client, arguments)
    except httpx.TransportError as error:
        print(f"conveyor: cannot reach {url}: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except httpx.HTTPStatusError as error:
        print(f"conveyor: {error.response.status_code} from {error.request.url.path}",
              file=sys.stderr)
        return EXIT_NOT_FOUND if error.response.status_code == 404 else EXIT_ERROR
    except OSError as error:
        print(f"conveyor: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
