"""Command line for the security model, over the HTTP API (docs/security.md).

    conveyor users add NAME [PASSWORD] [--tags administrator,...] [--data-dir DIR]
    conveyor users list | delete NAME | passwd NAME [PASSWORD]
    conveyor users keys create|list NAME | delete NAME KEY_ID
    conveyor tokens create [--name N] [--for USER] | list | delete ID
    conveyor permissions set USER [--vhost V] --configure RE --write RE --read RE
    conveyor permissions list [--vhost V] [--user U] | clear USER [--vhost V]
    conveyor vhosts add|delete NAME | list
    conveyor acls list

Credentials: ``--user``/``--password`` or ``--token``, else the URL's ``user:pass@``,
else ``CONVEYOR_TOKEN`` / ``CONVEYOR_USER`` + ``CONVEYOR_PASSWORD``. A missing PASSWORD
argument is read from the terminal (no echo) or the first line of stdin.
``users add --data-dir DIR`` writes the user straight into a stopped server's data
directory (the first administrator before ``serve --auth required``). Every command
takes ``--json``. Exit codes as cli.py's, plus 6 for 401/403.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any, TypedDict

from conveyor.client.core import admin_call, segment

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_REFUSED = 0, 1, 2, 5, 6
COMMANDS = frozenset({"users", "tokens", "permissions", "vhosts", "acls"})


# --- flags shared with cli.py --------------------------------------------------------------
def add_serve_flags(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--auth", choices=("required", "off"),
                       help="required: every listener demands credentials (CONVEYOR_AUTH)")
    serve.add_argument("--insecure", action="store_true", default=None,
                       help="allow a non-loopback --host with --auth off")


def serve_flags(arguments: argparse.Namespace) -> dict[str, Any]:
    return {"auth": arguments.auth, "insecure": arguments.insecure}


def add_credential_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="server URL (CONVEYOR_URL, http://localhost:8080)")
    parser.add_argument("--user", help="user name (CONVEYOR_USER)")
    parser.add_argument("--password", help="password (CONVEYOR_PASSWORD)")
    parser.add_argument("--token", help="API token (CONVEYOR_TOKEN)")
    parser.add_argument("--vhost", help="vhost of the request (default /)")


def server_url(arguments: argparse.Namespace) -> str:
    url: str = arguments.url or os.environ.get("CONVEYOR_URL") or "http://localhost:8080"
    return url


class Credentials(TypedDict):
    user: str | None
    password: str | None
    token: str | None
    vhost: str | None


def client_credentials(arguments: argparse.Namespace) -> Credentials:
    return Credentials(user=getattr(arguments, "user", None),
                       password=getattr(arguments, "password", None),
                       token=getattr(arguments, "token", None),
                       vhost=getattr(arguments, "vhost", None))


# --- parsers -------------------------------------------------------------------------------
def _json_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--json", action="store_true", help="print JSON")
    return parser


def add_parsers(subparsers: Any) -> None:
    users = subparsers.add_parser("users", help="add, list, delete users; passwords; keys")
    actions = users.add_subparsers(dest="action", required=True)
    add = _json_flag(actions.add_parser("add", help="add a user"))
    add.add_argument("name")
    add.add_argument("new_password", nargs="?", metavar="PASSWORD")
    add.add_argument("--tags", default="", help="comma-separated: administrator,monitoring,"
                                                "management")
    add.add_argument("--data-dir", dest="data_dir", type=Path,
                     help="write into a stopped server's data directory instead of the API")
    _json_flag(actions.add_parser("list", help="list users"))
    _json_flag(actions.add_parser("delete", help="delete a user")).add_argument("name")
    passwd = _json_flag(actions.add_parser("passwd", help="change a password"))
    passwd.add_argument("name")
    passwd.add_argument("new_password", nargs="?", metavar="PASSWORD")
    keys = actions.add_parser("keys", help="SQS access keys of a user")
    key_actions = keys.add_subparsers(dest="key_action", required=True)
    _json_flag(key_actions.add_parser("create", help="print a new key id and secret")
               ).add_argument("name")
    _json_flag(key_actions.add_parser("list", help="list key ids")).add_argument("name")
    delete_key = _json_flag(key_actions.add_parser("delete", help="delete a key"))
    delete_key.add_argument("name")
    delete_key.add_argument("key_id")

    tokens = subparsers.add_parser("tokens", help="API tokens (Authorization: Bearer)")
    token_actions = tokens.add_subparsers(dest="action", required=True)
    create = _json_flag(token_actions.add_parser("create", help="print a new token"))
    create.add_argument("--name", default="")
    create.add_argument("--for", dest="owner", help="another user (administrators)")
    _json_flag(token_actions.add_parser("list", help="list tokens (ids, never the tokens)"))
    _json_flag(token_actions.add_parser("delete", help="delete a token")).add_argument("id")

    permissions = subparsers.add_parser("permissions", help="configure/write/read patterns")
    permission_actions = permissions.add_subparsers(dest="action", required=True)
    set_ = _json_flag(permission_actions.add_parser("set", help="set a user's permissions"))
    set_.add_argument("name")
    for action in ("configure", "write", "read"):
        set_.add_argument(f"--{action}", default="", help=f"{action} regex ('' = nothing)")
    listing = _json_flag(permission_actions.add_parser("list", help="list permissions"))
    listing.add_argument("--for", dest="owner", help="only this user")
    clear = _json_flag(permission_actions.add_parser("clear", help="remove permissions"))
    clear.add_argument("name")

    vhosts = subparsers.add_parser("vhosts", help="add, list, delete vhosts")
    vhost_actions = vhosts.add_subparsers(dest="action", required=True)
    _json_flag(vhost_actions.add_parser("add", help="add a vhost")).add_argument("name")
    _json_flag(vhost_actions.add_parser("list", help="list vhosts"))
    _json_flag(vhost_actions.add_parser("delete", help="delete a vhost")).add_argument("name")

    acls = subparsers.add_parser("acls", help="the Kafka ACL bindings")
    acl_actions = acls.add_subparsers(dest="action", required=True)
    _json_flag(acl_actions.add_parser("list", help="list ACL bindings"))


# --- running -------------------------------------------------------------------------------
def _read_password(given: str | None) -> str:
    if given is not None:
        return given
    if sys.stdin.isatty():
        return getpass.getpass("password: ")
    return sys.stdin.readline().rstrip("\r\n")


def _vhost(arguments: argparse.Namespace) -> str:
    return str(arguments.vhost or "/")


def _call(arguments: argparse.Namespace) -> tuple[str, str, Any]:
    """(method, path, body) of the HTTP request for a command."""
    command, action = arguments.command, arguments.action
    name = getattr(arguments, "name", "")
    if command == "users":
        if action == "keys":
            base = f"/api/conveyor/users/{segment(name)}/keys"
            return {"create": ("POST", base, None), "list": ("GET", base, None),
                    "delete": ("DELETE", f"{base}/{segment(getattr(arguments, 'key_id', ''))}",
                               None)}[arguments.key_action]
        if action == "list":
            return "GET", "/api/users", None
        if action == "delete":
            return "DELETE", f"/api/users/{segment(name)}", None
        password = _read_password(arguments.new_password)
        body: dict[str, Any] = {"password": password}
        if action == "add":
            body["tags"] = arguments.tags
        return "PUT", f"/api/users/{segment(name)}", body
    if command == "tokens":
        if action == "create":
            token_body = {"name": arguments.name}
            if arguments.owner:
                token_body["user"] = arguments.owner
            return "POST", "/api/conveyor/tokens", token_body
        if action == "list":
            return "GET", "/api/conveyor/tokens", None
        return "DELETE", f"/api/conveyor/tokens/{segment(arguments.id)}", None
    if command == "permissions":
        if action == "list":
            owner = arguments.owner
            return "GET", (f"/api/users/{segment(owner)}/permissions" if owner
                           else "/api/permissions"), None
        path = f"/api/permissions/{segment(_vhost(arguments))}/{segment(name)}"
        if action == "clear":
            return "DELETE", path, None
        return "PUT", path, {"configure": arguments.configure, "write": arguments.write,
                             "read": arguments.read}
    if command == "vhosts":
        if action == "list":
            return "GET", "/api/vhosts", None
        return ("PUT" if action == "add" else "DELETE"), f"/api/vhosts/{segment(name)}", None
    return "GET", "/api/conveyor/acls", None


def _print(result: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result if result is not None else {"ok": True}, sort_keys=True))
        return
    if result is None:
        print("ok")
        return
    rows = result if isinstance(result, list) else [result]
    for row in rows:
        if isinstance(row, dict):
            print("\t".join(f"{key}={_text(value)}" for key, value in row.items()))
        else:
            print(row)


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)


def run(arguments: argparse.Namespace) -> int:
    from conveyor.client import Client, ConnectionFailedError
    from conveyor.errors import ConveyorError

    if arguments.command == "users" and arguments.action == "add" and arguments.data_dir:
        return _add_user_offline(arguments)
    url = server_url(arguments)
    try:
        method, path, body = _call(arguments)
        with Client(url, **client_credentials(arguments)) as client:
            result = client.request(admin_call(method, path, body))
    except ConnectionFailedError as error:
        print(f"conveyor: cannot reach {url}: {error.details.get('reason', error)}",
              file=sys.stderr)
        return EXIT_UNAVAILABLE
    except ConveyorError as error:
        print(f"conveyor: {error.code}: {error}", file=sys.stderr)
        return _exit_code(error.http_status)
    _print(result, arguments.json)
    return EXIT_OK


def _exit_code(status: int) -> int:
    """cli.py's codes (3 not found, 4 conflict, 2 other 4xx) plus 6 for 401/403."""
    codes = {401: EXIT_REFUSED, 403: EXIT_REFUSED, 404: 3, 409: 4, 503: EXIT_UNAVAILABLE}
    return codes.get(status, EXIT_USAGE if 400 <= status < 500 else EXIT_ERROR)


def _add_user_offline(arguments: argparse.Namespace) -> int:
    from conveyor.errors import ConveyorError

    password = _read_password(arguments.new_password)
    tags = tuple(tag.strip() for tag in arguments.tags.split(",") if tag.strip())
    arguments.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(_add_user_to(arguments.data_dir, arguments.name, password, tags))
    except ConveyorError as error:
        print(f"conveyor: {error.code}: {error}", file=sys.stderr)
        return EXIT_USAGE
    _print({"name": arguments.name, "tags": list(tags)}, arguments.json)
    return EXIT_OK


async def _add_user_to(data_dir: Path, name: str, password: str, tags: tuple[str, ...]) -> None:
    """Hold the data directory's lock (refused while a server runs), add the user, commit."""
    from conveyor.security.model import Security
    from conveyor.server.app import DataDirectoryLock
    from conveyor.storage.state_store import SqliteStateStore

    lock = DataDirectoryLock(data_dir)
    lock.acquire()
    try:
        store = SqliteStateStore(str(data_dir / "state.sqlite3"))
        await store.open()
        try:
            security = Security(store)
            security.load()
            if "/" not in security.admin.list_vhosts():
                await security.admin.add_vhost("/")
            await security.admin.add_user(name, password, tags)
        finally:
            await store.close()
    finally:
        lock.release()
