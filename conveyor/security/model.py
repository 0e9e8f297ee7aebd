"""The security model: who a client is and what it may do, for every protocol.

Owns: ``Security``, the implementation of ``conveyor.security.api.SecurityModel`` —
authentication (passwords, SCRAM credentials, tokens, access keys, certificates, the
loopback-only guest), authorization (``check``: permissions + Kafka ACLs, super users
= the ``administrator`` tag) and the failed-login back-off. Reads are in-memory.
Mutations live in ``conveyor/security/admin.py`` (``security.admin``), which persists
each one through ``conveyor/storage/security_state.py``.

Must not know: any protocol's wire format.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from typing import Literal

from conveyor.clock import Clock, SystemClock
from conveyor.security import acls
from conveyor.security.admin import SecurityAdmin
from conveyor.security.api import (
    DEFAULT_VHOST,
    GUEST_USER,
    VHOST_SEPARATOR,
    AclBinding,
    AclFilter,
    Action,
    FailedLogin,
    HasSecurity,
    Principal,
    ResourceKind,
    ScramCredential,
    SecurityModel,
    is_loopback,
)
from conveyor.security.secrets_kdf import check_password, hash_password, token_hash
from conveyor.security.state import DECISIONS_MAX, SecurityState
from conveyor.security.throttle import LoginThrottle
from conveyor.storage.state_store import StateStore

# Checked against when the user is unknown, so that unknown users and wrong passwords
# cost the same time (no user enumeration by timing).
_DUMMY_HASH = hash_password("conveyor-dummy-password")
_MEMBER_KINDS = ("group", "transactional_id")
_NAMED_KINDS = ("queue", "exchange", "topic")


class Security:
    """One per server. ``auth_required`` is fixed at start (``--auth required``)."""

    def __init__(self, store: StateStore | None, clock: Clock | None = None,
                 auth_required: bool = False) -> None:
        self.auth_required = auth_required
        self.state = SecurityState()
        self.clock: Clock = clock or SystemClock()
        self.throttle = LoginThrottle(self.clock)
        self.tables = store.security if store is not None else None
        self.admin = SecurityAdmin(self.state, self.tables, self.clock)
        # user -> HMAC(process key, password) of the last password that verified, with
        # the hash it verified against: HTTP Basic on every request costs one HMAC, not
        # one scrypt. The key never leaves the process.
        self._verified_key = secrets.token_bytes(32)
        self._verified: dict[str, tuple[bytes, str]] = {}

    async def load(self) -> None:
        """Create the tables and read them (once, at start)."""
        await self.admin.load()

    # --- who ----------------------------------------------------------------------------
    def anonymous(self, peer_host: str | None) -> Principal | None:
        if self.auth_required or not is_loopback(peer_host):
            return None
        guest = self.state.users.get(GUEST_USER)
        if guest is None:
            return None
        return Principal(GUEST_USER, guest.principal.tags, is_anonymous=True)

    def principal(self, user: str) -> Principal | None:
        found = self.state.users.get(user)
        return found.principal if found is not None else None

    def _password_digest(self, user: str, password: str) -> bytes:
        return hmac.new(self._verified_key, f"{user}\x00{password}".encode(),
                        hashlib.sha256).digest()

    def _cached(self, user: str, password: str, peer_host: str | None) -> tuple[
            Principal | None, bool]:
        """(principal, decided): decided without scrypt when refused early or cached."""
        if user == GUEST_USER and not is_loopback(peer_host):
            return None, True  # RabbitMQ's loopback_users: guest only from loopback
        found = self.state.users.get(user)
        if found is None:
            return None, False
        cached = self._verified.get(user)
        if cached is not None and cached[1] == found.password_hash and hmac.compare_digest(
                cached[0], self._password_digest(user, password)):
            return found.principal, True
        return None, False

    def _verify_slow(self, user: str, password: str) -> Principal | None:
        found = self.state.users.get(user)
        if found is None:
            check_password(password, _DUMMY_HASH)
            return None
        if not check_password(password, found.password_hash):
            return None
        self._verified[user] = (self._password_digest(user, password), found.password_hash)
        return found.principal

    def verify_password(self, user: str, password: str,
                        peer_host: str | None = None) -> Principal | None:
        principal, decided = self._cached(user, password, peer_host)
        return principal if decided else self._verify_slow(user, password)

    async def authenticate_password(self, user: str, password: str,
                                    peer_host: str | None = None) -> Principal | None:
        """``verify_password`` with the scrypt in a worker thread (hashlib releases the
        GIL), so a login never stalls the event loop."""
        principal, decided = self._cached(user, password, peer_host)
        if decided:
            return principal
        return await asyncio.to_thread(self._verify_slow, user, password)

    def scram_credential(self, user: str, mechanism: str) -> ScramCredential | None:
        return self.state.scram.get((user, mechanism))

    def access_key(self, key_id: str) -> tuple[Principal, str] | None:
        key = self.state.access_keys.get(key_id)
        if key is None:
            return None
        principal = self.principal(key.user)
        return (principal, key.secret) if principal is not None else None

    def verify_token(self, token: str) -> Principal | None:
        if len(token) > 512:
            return None
        found = self.state.tokens.get(token_hash(token))
        return self.principal(found.user) if found is not None else None

    def principal_for_certificate(self, subject_cn: str) -> Principal | None:
        return self.principal(subject_cn)

    # --- failed logins ----------------------------------------------------------------------
    async def login_failed(self, peer_host: str | None, user: str, protocol: str) -> FailedLogin:
        return await self.throttle.failed(peer_host, user, protocol)

    def login_succeeded(self, peer_host: str | None) -> None:
        self.throttle.succeeded(peer_host)

    # --- may it -------------------------------------------------------------------------------
    def may_use_vhost(self, principal: Principal, vhost: str) -> bool:
        if vhost not in self.state.vhosts:
            return False
        return principal.is_administrator or (principal.name, vhost) in self.state.permissions

    def check(self, principal: Principal, vhost: str, action: Action,
              resource_kind: ResourceKind, name: str) -> bool:
        if principal.is_administrator:
            return True  # Kafka's super.users
        key = (principal.name, vhost, action, resource_kind, name)
        decision = self.state.decisions.get(key)
        if decision is None:
            decision = self._decide(principal, vhost, action, resource_kind, name)
            if len(self.state.decisions) >= DECISIONS_MAX:
                self.state.decisions.clear()
            self.state.decisions[key] = decision
        return decision

    def _decide(self, principal: Principal, vhost: str, action: Action,
                kind: ResourceKind, name: str) -> bool:
        if VHOST_SEPARATOR in name:
            return False  # a vhost-qualified name: reaching into another vhost
        acl: bool | None = None
        if vhost == DEFAULT_VHOST and self.state.acls:  # Kafka has no vhosts: ACLs live in /
            acl = acls.decide(self.state.acls, principal.kafka_principal, None, kind, name,
                              action)
            if acl is False:
                return False
        permission = self.state.permissions.get((principal.name, vhost))
        if vhost in self.state.vhosts and permission is not None:
            if kind in _NAMED_KINDS and permission.allows(action, name):
                return True
            if kind in _MEMBER_KINDS:
                return True
            if kind == "cluster" and action in ("describe", "write"):
                return True
        return acl is True

    def check_routing_key(self, principal: Principal, vhost: str, exchange: str,
                          routing_key: str, action: Literal["write", "read"]) -> bool:
        if principal.is_administrator:
            return True
        patterns = self.state.topic_permissions.get((principal.name, vhost, exchange))
        if patterns is None:
            return True
        write, read = patterns
        return (write if action == "write" else read).matches(routing_key)

    # --- Kafka admin APIs (delegated to the admin) -------------------------------------------
    def describe_acls(self, acl_filter: AclFilter) -> list[AclBinding]:
        return [b for b in self.state.acls if acls.matches_filter(b, acl_filter)]

    async def create_acls(self, bindings: list[AclBinding]) -> None:
        await self.admin.create_acls(bindings)

    async def delete_acls(self, acl_filter: AclFilter) -> list[AclBinding]:
        return await self.admin.delete_acls(acl_filter)

    def scram_mechanisms(self, user: str) -> list[tuple[str, int]]:
        return sorted((mechanism, credential.iterations)
                      for (name, mechanism), credential in self.state.scram.items()
                      if name == user)

    async def set_scram_credential(self, user: str, mechanism: str, iterations: int,
                                   salt: bytes, salted_password: bytes) -> None:
        await self.admin.set_scram_credential(user, mechanism, iterations, salt,
                                              salted_password)

    async def delete_scram_credential(self, user: str, mechanism: str) -> None:
        await self.admin.delete_scram_credential(user, mechanism)


def open_model() -> Security:
    """An in-memory model with auth off and RabbitMQ's guest/guest (loopback only): what
    a listener started alone (a protocol's own tests) runs with."""
    security = Security(None)
    security.admin.bootstrap_memory_guest()
    return security


def security_of(context: HasSecurity) -> SecurityModel:
    """The server's model from the listener context; a listener started alone (tests of one
    protocol) gets an in-memory model with auth off and the loopback-only guest."""
    if context.security is not None:
        return context.security
    return open_model()
