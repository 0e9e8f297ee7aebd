"""Changes to the security model: users, vhosts, permissions, tokens, keys, ACLs.

Owns: every mutation of ``SecurityState`` and its persistence (each change is written
through ``SecurityStateStore`` and committed before the call returns, so a user added
over the HTTP API survives a crash right after the 200), the first-start bootstrap
(the ``/`` vhost, guest/guest when auth is off, the first administrator from
``CONVEYOR_ADMIN_USER`` / ``CONVEYOR_ADMIN_PASSWORD``). Slow hashing (scrypt, PBKDF2)
runs in a worker thread so the event loop keeps serving.

Must not know: protocols; who is allowed to call it (the HTTP layer checks tags).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, TypeVar

from conveyor.clock import Clock
from conveyor.errors import (
    AlreadyExistsError,
    InvalidConfigError,
    NotFoundError,
    PreconditionFailedError,
)
from conveyor.security import acls
from conveyor.security.api import (
    DEFAULT_VHOST,
    GUEST_USER,
    SCRAM_MECHANISMS,
    AclBinding,
    AclFilter,
    Principal,
    ScramCredential,
    ScramMechanism,
)
from conveyor.security.secrets_kdf import (
    decode_bytes,
    encode_bytes,
    hash_password,
    new_access_key,
    new_token,
    scram_from_password,
    scram_from_salted,
    token_hash,
)
from conveyor.security.state import (
    AccessKey,
    Pattern,
    Permission,
    SecurityState,
    Token,
    User,
    validate_tags,
    validate_user_name,
    validate_vhost_name,
)
from conveyor.storage.security_state import (
    AccessKeyRow,
    AclRow,
    PermissionRow,
    ScramRow,
    SecurityStateStore,
    TokenRow,
    TopicPermissionRow,
    UserRow,
)

Credentials = tuple[str, tuple[ScramCredential, ...]]
FULL = ".*"
Key = TypeVar("Key")


def _derive(password: str) -> Credentials:
    """(scrypt hash, SCRAM credentials of every mechanism) of a password: the slow part."""
    return hash_password(password), tuple(scram_from_password(m, password)
                                          for m in SCRAM_MECHANISMS)


@functools.cache
def _guest_credentials() -> Credentials:
    return _derive("guest")  # computed once per process for in-memory models


class SecurityAdmin:
    def __init__(self, state: SecurityState, tables: SecurityStateStore | None,
                 clock: Clock) -> None:
        self.state = state
        self.tables = tables
        self.clock = clock

    async def _commit(self) -> None:
        self.state.changed()
        if self.tables is not None:
            await self.tables.commit()

    # --- start --------------------------------------------------------------------------
    def load(self) -> None:
        tables = self.tables
        assert tables is not None, "load() needs a store"
        tables.create_schema()
        state = self.state
        for user in tables.load_users():
            state.users[user.name] = User(user.name, user.password_hash, user.tags,
                                          Principal(user.name, frozenset(user.tags)))
        for row in tables.load_scram():
            state.scram[(row.user, row.mechanism)] = scram_from_row(row)
        state.vhosts.update(tables.load_vhosts())
        for permission in tables.load_permissions():
            state.permissions[(permission.user, permission.vhost)] = Permission.compile(
                permission.configure, permission.write, permission.read)
        for topic in tables.load_topic_permissions():
            state.topic_permissions[(topic.user, topic.vhost, topic.exchange)] = (
                Pattern.compile(topic.write), Pattern.compile(topic.read))
        for token in tables.load_tokens():
            state.tokens[token.token_hash] = Token(token.token_hash, token.user, token.name,
                                                   token.created_ms)
        for key in tables.load_access_keys():
            state.access_keys[key.key_id] = AccessKey(key.key_id, key.user, key.secret,
                                                      key.created_ms)
        state.acls = [AclBinding(row.principal, row.resource_type, row.resource_name,
                                 row.pattern_type, row.operation, row.permission, row.host)
                      for row in tables.load_acls()]
        state.changed()

    async def bootstrap(self, auth_required: bool, admin_user: str | None,
                        admin_password: str | None) -> list[str]:
        """First start: the ``/`` vhost; the administrator named by the environment (when
        it does not exist yet); guest/guest when auth is off and there are no users.
        Returns what it did, for the log. Refuses ``auth required`` with no user at all."""
        done: list[str] = []
        if DEFAULT_VHOST not in self.state.vhosts:
            await self.add_vhost(DEFAULT_VHOST)
            done.append("created vhost /")
        if admin_user and admin_user not in self.state.users:
            if not admin_password:
                raise InvalidConfigError("CONVEYOR_ADMIN_USER needs CONVEYOR_ADMIN_PASSWORD")
            await self.add_user(admin_user, admin_password, ("administrator",))
            await self.set_permissions(admin_user, DEFAULT_VHOST, FULL, FULL, FULL)
            done.append(f"created administrator {admin_user}")
        if not self.state.users:
            if auth_required:
                raise InvalidConfigError(
                    "--auth required but there are no users, so nobody could log in: set"
                    " CONVEYOR_ADMIN_USER and CONVEYOR_ADMIN_PASSWORD for the first start, or"
                    " run `conveyor users add NAME --tags administrator --data-dir DIR`"
                    " while the server is down")
            await self.add_user(GUEST_USER, "guest", ("administrator",))
            await self.set_permissions(GUEST_USER, DEFAULT_VHOST, FULL, FULL, FULL)
            done.append("created guest/guest (usable from loopback only)")
        return done

    def bootstrap_memory_guest(self) -> None:
        """The in-memory model's vhost and guest (no store, no await)."""
        password_hash, credentials = _guest_credentials()
        self.state.vhosts.add(DEFAULT_VHOST)
        self._put_user(GUEST_USER, password_hash, credentials, ("administrator",))
        self.state.permissions[(GUEST_USER, DEFAULT_VHOST)] = Permission.compile(
            FULL, FULL, FULL)
        self.state.changed()

    # --- users ------------------------------------------------------------------------------
    def _user(self, name: str) -> User:
        found = self.state.users.get(name)
        if found is None:
            raise NotFoundError("no such user", user=name)
        return found

    def _put_user(self, name: str, password_hash: str,
                  credentials: tuple[ScramCredential, ...], tags: tuple[str, ...]) -> None:
        self.state.users[name] = User(name, password_hash, tags,
                                      Principal(name, frozenset(tags)))
        for credential in credentials:
            self.state.scram[(name, credential.mechanism)] = credential
        if self.tables is not None:
            self.tables.save_user(UserRow(name, password_hash, tags))
            for credential in credentials:
                self.tables.save_scram(scram_row(name, credential))

    async def add_user(self, name: str, password: str, tags: tuple[str, ...] = ()) -> None:
        validate_user_name(name)
        validate_tags(tags)
        if name in self.state.users:
            raise AlreadyExistsError("user exists", user=name)
        password_hash, credentials = await asyncio.to_thread(_derive, password)
        self._put_user(name, password_hash, credentials, tags)
        await self._commit()

    async def set_password(self, name: str, password: str) -> None:
        user = self._user(name)
        password_hash, credentials = await asyncio.to_thread(_derive, password)
        self._put_user(name, password_hash, credentials, user.tags)
        await self._commit()

    def _keep_an_administrator(self, name: str) -> None:
        """Refuse the change that would leave no administrator (nobody could undo it)."""
        others = [u for u in self.state.users.values()
                  if u.name != name and "administrator" in u.tags]
        user = self.state.users.get(name)
        if not others and user is not None and "administrator" in user.tags:
            raise PreconditionFailedError("refusing to remove the last administrator",
                                          user=name)

    async def set_tags(self, name: str, tags: tuple[str, ...]) -> None:
        validate_tags(tags)
        user = self._user(name)
        if "administrator" not in tags:
            self._keep_an_administrator(name)
        self.state.users[name] = User(name, user.password_hash, tags,
                                      Principal(name, frozenset(tags)))
        if self.tables is not None:
            self.tables.save_user(UserRow(name, user.password_hash, tags))
        await self._commit()

    async def delete_user(self, name: str) -> None:
        self._user(name)
        self._keep_an_administrator(name)
        state = self.state
        del state.users[name]
        _drop(state.scram, lambda key: key[0] == name)
        _drop(state.permissions, lambda key: key[0] == name)
        _drop(state.topic_permissions, lambda key: key[0] == name)
        for token in [t for t in state.tokens.values() if t.user == name]:
            del state.tokens[token.token_hash]
        for key_id in [k.key_id for k in state.access_keys.values() if k.user == name]:
            del state.access_keys[key_id]
        if self.tables is not None:
            self.tables.delete_user(name)
        await self._commit()

    def list_users(self) -> list[dict[str, Any]]:
        return [{"name": user.name, "tags": list(user.tags),
                 "scram_mechanisms": sorted(m for (n, m) in self.state.scram if n == user.name)}
                for user in sorted(self.state.users.values(), key=lambda u: u.name)]

    # --- vhosts and permissions -------------------------------------------------------------
    async def add_vhost(self, name: str) -> None:
        validate_vhost_name(name)
        self.state.vhosts.add(name)
        if self.tables is not None:
            self.tables.save_vhost(name)
        await self._commit()

    async def delete_vhost(self, name: str) -> None:
        if name not in self.state.vhosts:
            raise NotFoundError("no such vhost", vhost=name)
        self.state.vhosts.discard(name)
        _drop(self.state.permissions, lambda key: key[1] == name)
        _drop(self.state.topic_permissions, lambda key: key[1] == name)
        if self.tables is not None:
            self.tables.delete_vhost(name)
        await self._commit()

    def list_vhosts(self) -> list[str]:
        return sorted(self.state.vhosts)

    async def set_permissions(self, user: str, vhost: str, configure: str, write: str,
                              read: str) -> None:
        self._user(user)
        if vhost not in self.state.vhosts:
            raise NotFoundError("no such vhost", vhost=vhost)
        self.state.permissions[(user, vhost)] = Permission.compile(configure, write, read)
        if self.tables is not None:
            self.tables.save_permission(PermissionRow(user, vhost, configure, write, read))
        await self._commit()

    async def clear_permissions(self, user: str, vhost: str) -> None:
        if self.state.permissions.pop((user, vhost), None) is None:
            raise NotFoundError("no permissions for this user in this vhost", user=user,
                                vhost=vhost)
        if self.tables is not None:
            self.tables.delete_permission(user, vhost)
        await self._commit()

    def list_permissions(self, user: str | None = None,
                         vhost: str | None = None) -> list[dict[str, str]]:
        return [{"user": name, "vhost": host, "configure": p.configure.text,
                 "write": p.write.text, "read": p.read.text}
                for (name, host), p in sorted(self.state.permissions.items())
                if user in (None, name) and vhost in (None, host)]

    async def set_topic_permissions(self, user: str, vhost: str, exchange: str, write: str,
                                    read: str) -> None:
        self._user(user)
        self.state.topic_permissions[(user, vhost, exchange)] = (
            Pattern.compile(write), Pattern.compile(read))
        if self.tables is not None:
            self.tables.save_topic_permission(
                TopicPermissionRow(user, vhost, exchange, write, read))
        await self._commit()

    def list_topic_permissions(self) -> list[dict[str, str]]:
        return [{"user": user, "vhost": vhost, "exchange": exchange, "write": write.text,
                 "read": read.text}
                for (user, vhost, exchange), (write, read)
                in sorted(self.state.topic_permissions.items())]

    # --- tokens and access keys ------------------------------------------------------------
    async def create_token(self, user: str, name: str) -> tuple[str, str]:
        """(token id, token). The token is shown once; only its hash is kept."""
        self._user(user)
        token = new_token()
        row = Token(token_hash(token), user, name[:100], self.clock.wall_ms())
        self.state.tokens[row.token_hash] = row
        if self.tables is not None:
            self.tables.save_token(TokenRow(row.token_hash, user, row.name, row.created_ms))
        await self._commit()
        return row.token_id, token

    def list_tokens(self, user: str | None = None) -> list[dict[str, Any]]:
        return [{"id": t.token_id, "user": t.user, "name": t.name, "created_ms": t.created_ms}
                for t in sorted(self.state.tokens.values(), key=lambda t: t.created_ms)
                if user in (None, t.user)]

    async def delete_token(self, token_id: str, user: str | None = None) -> None:
        found = [t for t in self.state.tokens.values()
                 if t.token_id == token_id and user in (None, t.user)]
        if not found:
            raise NotFoundError("no such token", id=token_id)
        del self.state.tokens[found[0].token_hash]
        if self.tables is not None:
            self.tables.delete_token(found[0].token_hash)
        await self._commit()

    async def create_access_key(self, user: str) -> tuple[str, str]:
        """(access key id, secret access key) for SQS SigV4."""
        self._user(user)
        key_id, secret = new_access_key()
        key = AccessKey(key_id, user, secret, self.clock.wall_ms())
        self.state.access_keys[key_id] = key
        if self.tables is not None:
            self.tables.save_access_key(AccessKeyRow(key_id, user, secret, key.created_ms))
        await self._commit()
        return key_id, secret

    def list_access_keys(self, user: str | None = None) -> list[dict[str, Any]]:
        return [{"id": k.key_id, "user": k.user, "created_ms": k.created_ms}
                for k in sorted(self.state.access_keys.values(), key=lambda k: k.created_ms)
                if user in (None, k.user)]

    async def delete_access_key(self, key_id: str, user: str | None = None) -> None:
        key = self.state.access_keys.get(key_id)
        if key is None or user not in (None, key.user):
            raise NotFoundError("no such access key", id=key_id)
        del self.state.access_keys[key_id]
        if self.tables is not None:
            self.tables.delete_access_key(key_id)
        await self._commit()

    # --- Kafka ACLs and SCRAM (KIP-554) -------------------------------------------------------
    async def create_acls(self, bindings: list[AclBinding]) -> None:
        for binding in bindings:
            acls.validate(binding)
        for binding in bindings:
            if binding not in self.state.acls:
                self.state.acls.append(binding)
                if self.tables is not None:
                    self.tables.save_acl(acl_row(binding))
        await self._commit()

    async def delete_acls(self, acl_filter: AclFilter) -> list[AclBinding]:
        deleted = [b for b in self.state.acls if acls.matches_filter(b, acl_filter)]
        self.state.acls = [b for b in self.state.acls if b not in deleted]
        if self.tables is not None:
            for binding in deleted:
                self.tables.delete_acl(acl_row(binding))
        await self._commit()
        return deleted

    async def set_scram_credential(self, user: str, mechanism: str, iterations: int,
                                   salt: bytes, salted_password: bytes) -> None:
        self._user(user)
        credential = scram_from_salted(mechanism, salt, iterations, salted_password)
        self.state.scram[(user, credential.mechanism)] = credential
        if self.tables is not None:
            self.tables.save_scram(scram_row(user, credential))
        await self._commit()

    async def delete_scram_credential(self, user: str, mechanism: str) -> None:
        if self.state.scram.pop((user, mechanism), None) is None:
            raise NotFoundError("no such SCRAM credential", user=user, mechanism=mechanism)
        if self.tables is not None:
            self.tables.delete_scram(user, mechanism)
        await self._commit()


def scram_row(user: str, credential: ScramCredential) -> ScramRow:
    return ScramRow(user, credential.mechanism, encode_bytes(credential.salt),
                    credential.iterations, encode_bytes(credential.stored_key),
                    encode_bytes(credential.server_key))


def _drop(mapping: dict[Key, Any], doomed: Callable[[Key], bool]) -> None:
    for key in [key for key in mapping if doomed(key)]:
        del mapping[key]


def scram_from_row(row: ScramRow) -> ScramCredential:
    mechanism: ScramMechanism = (
        "SCRAM-SHA-512" if row.mechanism == "SCRAM-SHA-512" else "SCRAM-SHA-256")
    return ScramCredential(mechanism, decode_bytes(row.salt), row.iterations,
                           decode_bytes(row.stored_key), decode_bytes(row.server_key))


def acl_row(binding: AclBinding) -> AclRow:
    return AclRow(binding.principal, binding.resource_type, binding.resource_name,
                  binding.pattern_type, binding.operation, binding.permission, binding.host)
