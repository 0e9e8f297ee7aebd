"""Security state in the StateStore: users, vhosts, permissions, tokens, keys, ACLs.

Owns: the SQL of the security model (conveyor/security/), written once in the subset
SQLite and PostgreSQL share (``?`` placeholders, standard ``ON CONFLICT`` upserts, plain
TEXT/INTEGER/BIGINT columns; binary values are base64 TEXT so no dialect blob type is
needed):

- ``security_users``: name, the scrypt password hash (``scrypt$n$r$p$salt$hash``, never
  the password), tags (comma-separated).
- ``security_scram``: per (user, mechanism) salt, iterations, StoredKey, ServerKey.
- ``security_vhosts``: vhost names.
- ``security_permissions``: per (user, vhost) configure / write / read regexes.
- ``security_topic_permissions``: per (user, vhost, exchange) write / read regexes over
  routing keys.
- ``security_tokens``: SHA-256 of each API token (tokens are 256-bit random, so a fast
  hash is enough), its owner and a name.
- ``security_access_keys``: SQS access key id, owner, and the secret *as is* — SigV4
  verification recomputes an HMAC with the secret, so it cannot be hashed. Protect the
  data directory like a key file (docs/security.md).
- ``security_acls``: Kafka ACL bindings.

Must not know: how passwords are checked or what a permission means.
"""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.storage.state_store import StateStore, upsert_sql

SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS security_users (
        name TEXT PRIMARY KEY, password_hash TEXT NOT NULL, tags TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS security_scram (
        user_name TEXT NOT NULL, mechanism TEXT NOT NULL, salt TEXT NOT NULL,
        iterations INTEGER NOT NULL, stored_key TEXT NOT NULL, server_key TEXT NOT NULL,
        PRIMARY KEY (user_name, mechanism))""",
    "CREATE TABLE IF NOT EXISTS security_vhosts (name TEXT PRIMARY KEY)",
    """CREATE TABLE IF NOT EXISTS security_permissions (
        user_name TEXT NOT NULL, vhost TEXT NOT NULL, configure TEXT NOT NULL,
        write TEXT NOT NULL, read TEXT NOT NULL, PRIMARY KEY (user_name, vhost))""",
    """CREATE TABLE IF NOT EXISTS security_topic_permissions (
        user_name TEXT NOT NULL, vhost TEXT NOT NULL, exchange TEXT NOT NULL,
        write TEXT NOT NULL, read TEXT NOT NULL, PRIMARY KEY (user_name, vhost, exchange))""",
    """CREATE TABLE IF NOT EXISTS security_tokens (
        token_hash TEXT PRIMARY KEY, user_name TEXT NOT NULL, name TEXT NOT NULL,
        created_ms BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS security_access_keys (
        key_id TEXT PRIMARY KEY, user_name TEXT NOT NULL, secret TEXT NOT NULL,
        created_ms BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS security_acls (
        principal TEXT NOT NULL, resource_type TEXT NOT NULL, resource_name TEXT NOT NULL,
        pattern_type TEXT NOT NULL, operation TEXT NOT NULL, permission TEXT NOT NULL,
        host TEXT NOT NULL,
        PRIMARY KEY (principal, resource_type, resource_name, pattern_type, operation,
                     permission, host))""",
)


@dataclass(frozen=True, slots=True)
class UserRow:
    name: str
    password_hash: str
    tags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ScramRow:
    user: str
    mechanism: str
    salt: str  # base64
    iterations: int
    stored_key: str  # base64
    server_key: str  # base64


@dataclass(frozen=True, slots=True)
class PermissionRow:
    user: str
    vhost: str
    configure: str
    write: str
    read: str


@dataclass(frozen=True, slots=True)
class TopicPermissionRow:
    user: str
    vhost: str
    exchange: str
    write: str
    read: str


@dataclass(frozen=True, slots=True)
class TokenRow:
    token_hash: str
    user: str
    name: str
    created_ms: int


@dataclass(frozen=True, slots=True)
class AccessKeyRow:
    key_id: str
    user: str
    secret: str
    created_ms: int


@dataclass(frozen=True, slots=True)
class AclRow:
    principal: str
    resource_type: str
    resource_name: str
    pattern_type: str
    operation: str
    permission: str
    host: str


class SecurityStateStore:
    """Typed reads and writes of the security tables over a StateStore."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def create_schema(self) -> None:
        self.store.add_schema(SCHEMA)

    async def commit(self) -> None:
        await self.store.commit()

    # --- users ------------------------------------------------------------------------
    def save_user(self, row: UserRow) -> None:
        self.store.write(upsert_sql("security_users", ["name"], ["password_hash", "tags"]),
                         (row.name, row.password_hash, ",".join(row.tags)))

    def delete_user(self, name: str) -> None:
        """The user and everything it owns (credentials, permissions, tokens, keys)."""
        self.store.write("DELETE FROM security_users WHERE name = ?", (name,))
        for table in ("security_scram", "security_permissions", "security_topic_permissions",
                      "security_tokens", "security_access_keys"):
            self.store.write(f"DELETE FROM {table} WHERE user_name = ?", (name,))

    def load_users(self) -> list[UserRow]:
        rows = self.store.query("SELECT name, password_hash, tags FROM security_users")
        return [UserRow(str(r[0]), str(r[1]), tuple(t for t in str(r[2]).split(",") if t))
                for r in rows]

    def save_scram(self, row: ScramRow) -> None:
        self.store.write(
            upsert_sql("security_scram", ["user_name", "mechanism"],
                       ["salt", "iterations", "stored_key", "server_key"]),
            (row.user, row.mechanism, row.salt, row.iterations, row.stored_key,
             row.server_key))

    def delete_scram(self, user: str, mechanism: str) -> None:
        self.store.write("DELETE FROM security_scram WHERE user_name = ? AND mechanism = ?",
                         (user, mechanism))

    def load_scram(self) -> list[ScramRow]:
        rows = self.store.query("SELECT user_name, mechanism, salt, iterations, stored_key,"
                                " server_key FROM security_scram")
        return [ScramRow(str(r[0]), str(r[1]), str(r[2]), int(r[3]), str(r[4]), str(r[5]))
                for r in rows]

    # --- vhosts and permissions ------------------------------------------------------------
    def save_vhost(self, name: str) -> None:
        self.store.write(upsert_sql("security_vhosts", ["name"], []), (name,))

    def delete_vhost(self, name: str) -> None:
        self.store.write("DELETE FROM security_vhosts WHERE name = ?", (name,))
        for table in ("security_permissions", "security_topic_permissions"):
            self.store.write(f"DELETE FROM {table} WHERE vhost = ?", (name,))

    def load_vhosts(self) -> list[str]:
        return [str(r[0]) for r in self.store.query("SELECT name FROM security_vhosts")]

    def save_permission(self, row: PermissionRow) -> None:
        self.store.write(
            upsert_sql("security_permissions", ["user_name", "vhost"],
                       ["configure", "write", "read"]),
            (row.user, row.vhost, row.configure, row.write, row.read))

    def delete_permission(self, user: str, vhost: str) -> None:
        self.store.write("DELETE FROM security_permissions WHERE user_name = ? AND vhost = ?",
                         (user, vhost))

    def load_permissions(self) -> list[PermissionRow]:
        rows = self.store.query(
            "SELECT user_name, vhost, configure, write, read FROM security_permissions")
        return [PermissionRow(*(str(value) for value in r)) for r in rows]

    def save_topic_permission(self, row: TopicPermissionRow) -> None:
        self.store.write(
            upsert_sql("security_topic_permissions", ["user_name", "vhost", "exchange"],
                       ["write", "read"]),
            (row.user, row.vhost, row.exchange, row.write, row.read))

    def delete_topic_permission(self, user: str, vhost: str, exchange: str) -> None:
        self.store.write("DELETE FROM security_topic_permissions WHERE user_name = ?"
                         " AND vhost = ? AND exchange = ?", (user, vhost, exchange))

    def load_topic_permissions(self) -> list[TopicPermissionRow]:
        rows = self.store.query("SELECT user_name, vhost, exchange, write, read"
                                " FROM security_topic_permissions")
        return [TopicPermissionRow(*(str(value) for value in r)) for r in rows]

    # --- tokens and access keys --------------------------------------------------------------
    def save_token(self, row: TokenRow) -> None:
        self.store.write(
            upsert_sql("security_tokens", ["token_hash"], ["user_name", "name", "created_ms"]),
            (row.token_hash, row.user, row.name, row.created_ms))

    def delete_token(self, token_hash: str) -> None:
        self.store.write("DELETE FROM security_tokens WHERE token_hash = ?", (token_hash,))

    def load_tokens(self) -> list[TokenRow]:
        rows = self.store.query(
            "SELECT token_hash, user_name, name, created_ms FROM security_tokens")
        return [TokenRow(str(r[0]), str(r[1]), str(r[2]), int(r[3])) for r in rows]

    def save_access_key(self, row: AccessKeyRow) -> None:
        self.store.write(
            upsert_sql("security_access_keys", ["key_id"], ["user_name", "secret", "created_ms"]),
            (row.key_id, row.user, row.secret, row.created_ms))

    def delete_access_key(self, key_id: str) -> None:
        self.store.write("DELETE FROM security_access_keys WHERE key_id = ?", (key_id,))

    def load_access_keys(self) -> list[AccessKeyRow]:
        rows = self.store.query(
            "SELECT key_id, user_name, secret, created_ms FROM security_access_keys")
        return [AccessKeyRow(str(r[0]), str(r[1]), str(r[2]), int(r[3])) for r in rows]

    # --- Kafka ACLs ------------------------------------------------------------------------
    def save_acl(self, row: AclRow) -> None:
        self.store.write(
            upsert_sql("security_acls", ["principal", "resource_type", "resource_name",
                                         "pattern_type", "operation", "permission", "host"], []),
            (row.principal, row.resource_type, row.resource_name, row.pattern_type,
             row.operation, row.permission, row.host))

    def delete_acl(self, row: AclRow) -> None:
        self.store.write(
            "DELETE FROM security_acls WHERE principal = ? AND resource_type = ?"
            " AND resource_name = ? AND pattern_type = ? AND operation = ? AND permission = ?"
            " AND host = ?",
            (row.principal, row.resource_type, row.resource_name, row.pattern_type,
             row.operation, row.permission, row.host))

    def load_acls(self) -> list[AclRow]:
        rows = self.store.query(
            "SELECT principal, resource_type, resource_name, pattern_type, operation,"
            " permission, host FROM security_acls")
        return [AclRow(*(str(value) for value in r)) for r in rows]
