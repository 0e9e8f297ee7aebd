"""Command line: ``conveyor serve`` (more commands live beside it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _add_serve(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help="run the broker")
    serve.add_argument("--config", type=Path, help="TOML config file")
    serve.add_argument("--data-dir", dest="data_dir", help="data directory (./conveyor-data)")
    serve.add_argument("--host", help="address to listen on (127.0.0.1)")
    serve.add_argument("--advertised-host", dest="advertised_host")
    serve.add_argument("--listeners", help="comma-separated listeners to enable")
    serve.add_argument("--kafka-port", type=int)
    serve.add_argument("--amqp-port", type=int)
    serve.add_argument("--http-port", type=int)
    serve.add_argument("--log-level", dest="log_level")
    serve.add_argument("--log-format", dest="log_format", choices=("text", "json"))


def _serve(arguments: argparse.Namespace) -> int:
    from conveyor.config import load_config
    from conveyor.errors import ConveyorError
    from conveyor.server.app import run
    from conveyor.server.logging import configure_logging

    ports = {
        name: getattr(arguments, f"{name}_port")
        for name in ("kafka", "amqp", "http")
        if getattr(arguments, f"{name}_port") is not None
    }
    flags = {
        "data_dir": arguments.data_dir,
        "host": arguments.host,
        "advertised_host": arguments.advertised_host,
        "log_level": arguments.log_level,
        "log_format": arguments.log_format,
        "listeners": arguments.listeners.split(",") if arguments.listeners else None,
        "ports": ports,
    }
    try:
        config = load_config(arguments.config, flags=flags)
        configure_logging(config.log_level, config.log_format)
        run(config)
    except ConveyorError as error:
        print(f"conveyor: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conveyor", description="Conveyor message broker")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_serve(subparsers)
    arguments = parser.parse_args(argv)
    if arguments.command == "serve":
        return _serve(arguments)
    parser.error(f"unknown command {arguments.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
