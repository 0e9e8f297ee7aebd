"""PostgreSQL connection URLs, one host or several.

``postgresql://user[:password]@host[:port][,host[:port]...]/database[?options]``: libpq's
and asyncpg's multi-host form. With ``target_session_attrs=read-write`` a client tries
the hosts in order and keeps the one that accepts writes, which is how a node finds the
new primary after a standby is promoted (docs/postgres.md, "Failover"). ``urlsplit``
cannot read a port out of such a netloc, so the hosts are split here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import asyncpg

# asyncpg raises this when it reached hosts but none matched target_session_attrs (the
# standby is not promoted yet): a passing state of the database, retried like a dropped
# connection (it derives from neither OSError nor asyncpg's connection errors)
NO_PRIMARY_YET: Final = asyncpg.exceptions.TargetServerAttributeNotMatched

# Every connection a node opens (log store, state engine, membership, wake-ups). A node
# cut off mid-transaction by a network that silently stops forwarding (no FIN, no RST)
# would otherwise keep its transaction open on the server for ever, holding the
# partition-head row locks, and every other node's appends to those partitions would
# queue behind it (tests/cluster/test_cluster_cutoff.py, the stall case): the server
# ends a session idle inside a transaction after this long, which rolls it back.
SESSION_SETTINGS: Final = {"idle_in_transaction_session_timeout": "5000"}
# The log store's statements, for the same reason while the server waits for the rest
# of a COPY's data (an active statement, not idle). Generous for a loaded machine.
LOG_SESSION_SETTINGS: Final = {**SESSION_SETTINGS, "statement_timeout": "10000"}
# Client side: a statement the server never answers (the stalled link) fails after this
# long, with a timeout that the callers treat as a lost connection (retried, read back).
COMMAND_TIMEOUT_S: Final = 15
CONNECT_TIMEOUT_S: Final = 10


@dataclass(frozen=True, slots=True)
class PostgresUrl:
    scheme: str
    user: str | None
    hosts: tuple[tuple[str, int | None], ...]  # (host, port or None: 5432)
    database: str  # without the leading "/"
    query: str

    def where(self) -> str:
        """host:port[,host:port]/database: no user, no password (for messages)."""
        hosts = ",".join(f"{host}:{port or 5432}" for host, port in self.hosts)
        return f"{hosts}/{self.database}"

    def describe(self) -> str:
        """The URL without its password (for logs)."""
        user = f"{self.user}@" if self.user else ""
        hosts = ",".join(f"{host}:{port}" if port else host for host, port in self.hosts)
        options = [item for item in self.query.split("&")
                   if item and not item.lower().startswith("password=")]
        query = f"?{'&'.join(options)}" if options else ""
        return f"{self.scheme}://{user}{hosts}/{self.database}{query}"


def parse_postgres_url(text: str) -> PostgresUrl:
    """Split ``text``; ValueError on a port that is not a number."""
    parts = urlsplit(text)
    userinfo, at, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0] if at else None
    hosts: list[tuple[str, int | None]] = []
    for item in hostinfo.split(","):
        if item.startswith("["):  # [ipv6]:port
            host, _, rest = item[1:].partition("]")
            port_text = rest.removeprefix(":")
        else:
            host, _, port_text = item.partition(":")
        if port_text and not port_text.isdigit():
            raise ValueError(f"port {port_text!r} is not a number")
        if host:
            hosts.append((host, int(port_text) if port_text else None))
    return PostgresUrl(parts.scheme, user or None, tuple(hosts), parts.path.lstrip("/"),
                       parts.query)
