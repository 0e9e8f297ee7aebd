"""The security interface every protocol listener calls (issue 10).

Owns: the protocol-free vocabulary of authentication and authorization —
``Principal``, ``ScramCredential``, ``AclBinding`` / ``AclFilter`` and the
``SecurityModel`` Protocol — plus the small pure helpers protocols share
(``is_loopback``, ``qualify`` / ``unqualify`` for vhost names). The model behind it
lives in ``conveyor/security/model.py``; listeners never import that, they take the
model from ``ListenerContext.security`` through ``security_of(context)``.

Must not know: any wire format. Kafka's integer codes for ACL operations, resource and
pattern types are mapped by the Kafka handlers onto the upper-case names used here
(Kafka's own enum names); AMQP reply codes, SQS error shapes and HTTP statuses likewise
stay in their protocols.

How a protocol uses it (see docs/security.md for the per-protocol mapping):

1. Who is this? With credentials: ``verify_password`` (PLAIN, AMQPLAIN, HTTP Basic),
   ``scram_credential`` (SCRAM-SHA-256/512; the protocol runs RFC 5802 itself),
   ``access_key`` (SQS SigV4: the protocol recomputes the signature with the secret),
   ``verify_token`` (HTTP Bearer), ``principal_for_certificate`` (AMQP EXTERNAL, Kafka
   mTLS). Without credentials: ``anonymous(peer_host)`` — the guest principal from a
   loopback peer when ``auth_required`` is false, otherwise None (refuse).
2. A failed login: ``await login_failed(peer_host, user, protocol)`` before answering
   with the protocol's error. It logs (rate-limited, with the peer address) and sleeps a
   per-peer delay that grows with consecutive failures (asyncio.sleep: the event loop
   keeps serving everyone else). ``login_succeeded(peer_host)`` resets the count.
3. May it? ``may_use_vhost`` on AMQP ``connection.open`` (530 NOT_ALLOWED when false),
   then ``check(principal, vhost, action, resource_kind, name)`` per operation, and
   ``check_routing_key`` for AMQP topic permissions on routing keys.

Actions (RabbitMQ's three, plus Kafka's DESCRIBE):

- ``configure``: declare / create / delete / alter (AMQP declare and delete; Kafka
  CREATE, DELETE, ALTER, ALTER_CONFIGS, CLUSTER_ACTION; SQS CreateQueue/DeleteQueue/
  SetQueueAttributes; HTTP PUT/DELETE of queues, topics, exchanges).
- ``write``: publish into the resource (AMQP publish = write on the exchange, bind =
  write on the queue; Kafka WRITE, IDEMPOTENT_WRITE; SQS SendMessage; HTTP publish).
- ``read``: consume / get / ack / purge (AMQP consume, get, purge; bind = read on the
  exchange; Kafka READ; SQS ReceiveMessage/DeleteMessage/ChangeMessageVisibility).
- ``describe``: see that it exists (Kafka DESCRIBE, DESCRIBE_CONFIGS; SQS GetQueueUrl,
  GetQueueAttributes; metadata listings). Granted by any of the three above.

Resource kinds: ``queue``, ``exchange`` and ``topic`` are matched against the user's
permission regexes in the vhost (a queue *is* a topic, so both kinds share the same
names); ``group`` and ``transactional_id`` are allowed to any user with access to the
vhost unless an ACL denies them; ``cluster`` allows ``describe`` and ``write``
(idempotent produce) with vhost access and ``configure`` only to administrators or an
ALLOW ACL. Kafka ACL bindings are consulted by ``check`` on every protocol: a matching
DENY refuses even what a permission regex allows, a matching ALLOW grants what the
regexes do not. Users tagged ``administrator`` are Kafka's super users: always allowed.

Kafka ACL operations map onto actions as: ALL -> every action; READ -> read;
WRITE, IDEMPOTENT_WRITE -> write; CREATE, DELETE, ALTER, ALTER_CONFIGS,
CLUSTER_ACTION -> configure; DESCRIBE, DESCRIBE_CONFIGS -> describe; and, as in
Kafka, an ALLOW of READ, WRITE, DELETE or ALTER implies DESCRIBE.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Literal, Protocol

Action = Literal["configure", "write", "read", "describe"]
ResourceKind = Literal["queue", "exchange", "topic", "group", "cluster", "transactional_id"]
ScramMechanism = Literal["SCRAM-SHA-256", "SCRAM-SHA-512"]

ACTIONS: tuple[Action, ...] = ("configure", "write", "read", "describe")
RESOURCE_KINDS: tuple[ResourceKind, ...] = (
    "queue", "exchange", "topic", "group", "cluster", "transactional_id")
SCRAM_MECHANISMS: tuple[ScramMechanism, ...] = ("SCRAM-SHA-256", "SCRAM-SHA-512")

DEFAULT_VHOST = "/"
GUEST_USER = "guest"  # RabbitMQ's default user: usable from loopback peers only
TAGS = ("administrator", "monitoring", "management")  # RabbitMQ's management tags

# Kafka's names (org.apache.kafka.common.acl / resource enums), as strings.
ACL_RESOURCE_TYPES = ("TOPIC", "GROUP", "CLUSTER", "TRANSACTIONAL_ID")
ACL_PATTERN_TYPES = ("LITERAL", "PREFIXED")
ACL_OPERATIONS = ("ALL", "READ", "WRITE", "CREATE", "DELETE", "ALTER", "DESCRIBE",
                  "CLUSTER_ACTION", "DESCRIBE_CONFIGS", "ALTER_CONFIGS", "IDEMPOTENT_WRITE")
ACL_PERMISSIONS = ("ALLOW", "DENY")
ACL_CLUSTER_NAME = "kafka-cluster"  # Kafka's only CLUSTER resource name


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated (or anonymous) identity. Cheap to keep per connection."""

    name: str
    tags: frozenset[str] = frozenset()
    is_anonymous: bool = False

    @property
    def is_administrator(self) -> bool:
        return "administrator" in self.tags

    def has_tag(self, *tags: str) -> bool:
        """True when the principal carries any of ``tags`` (administrator implies all)."""
        return self.is_administrator or any(tag in self.tags for tag in tags)

    @property
    def kafka_principal(self) -> str:
        """Kafka's spelling, ``User:NAME`` (``User:ANONYMOUS`` for the anonymous one)."""
        return "User:ANONYMOUS" if self.is_anonymous else f"User:{self.name}"


@dataclass(frozen=True, slots=True)
class ScramCredential:
    """RFC 5802 / RFC 7677 server-side credential: never the password itself."""

    mechanism: ScramMechanism
    salt: bytes
    iterations: int
    stored_key: bytes  # H(ClientKey), ClientKey = HMAC(SaltedPassword, "Client Key")
    server_key: bytes  # HMAC(SaltedPassword, "Server Key")


@dataclass(frozen=True, slots=True)
class AclBinding:
    """One Kafka ACL: ``principal`` is ``User:NAME`` (or ``User:*``), host ``*`` or an IP."""

    principal: str
    resource_type: str  # ACL_RESOURCE_TYPES
    resource_name: str
    pattern_type: str  # ACL_PATTERN_TYPES
    operation: str  # ACL_OPERATIONS
    permission: str  # ACL_PERMISSIONS
    host: str = "*"


@dataclass(frozen=True, slots=True)
class AclFilter:
    """DescribeAcls / DeleteAcls filter: None matches anything. ``pattern_type`` may also be
    ``ANY`` (same as None) or ``MATCH`` (the bindings that would apply to
    ``resource_name``: literal equal, ``*`` wildcard, or prefixed prefix of it)."""

    principal: str | None = None
    resource_type: str | None = None
    resource_name: str | None = None
    pattern_type: str | None = None
    operation: str | None = None  # None or "ANY"
    permission: str | None = None  # None or "ANY"
    host: str | None = None


@dataclass(frozen=True, slots=True)
class FailedLogin:
    """What ``login_failed`` decided: how long it waited (already slept) and whether it
    logged (the log is rate-limited per peer)."""

    delay_ms: int
    logged: bool
    failures: int = field(default=1)


class SecurityModel(Protocol):
    """What listeners call. Reads are synchronous and in-memory (safe on hot paths);
    mutations are async because they persist through the StateStore."""

    auth_required: bool  # True: every listener demands credentials; no anonymous guest

    # --- who ---------------------------------------------------------------------
    def anonymous(self, peer_host: str | None) -> Principal | None:
        """The principal of a client that sent no credentials: the guest principal when
        auth is not required and the peer is loopback; None (refuse) otherwise."""
        ...

    def verify_password(self, user: str, password: str,
                        peer_host: str | None = None) -> Principal | None:
        """PLAIN / AMQPLAIN / HTTP Basic. None for an unknown user, a wrong password, or
        the guest user from a non-loopback peer (RabbitMQ's loopback_users). Costs one
        scrypt (tens of ms): call it once per connection, not per request."""
        ...

    async def authenticate_password(self, user: str, password: str,
                                    peer_host: str | None = None) -> Principal | None:
        """``verify_password`` with the scrypt run in a worker thread: prefer it in async
        code (a wrong password then never stalls the event loop for ~50 ms)."""
        ...

    def scram_credential(self, user: str, mechanism: str) -> ScramCredential | None:
        """The stored SCRAM credential, or None (unknown user or mechanism). A protocol
        that gets None should still run the exchange with a fake credential so that
        unknown users and wrong passwords look alike."""
        ...

    def principal(self, user: str) -> Principal | None:
        """The principal of a known user (after SCRAM or SigV4 succeeded)."""
        ...

    def access_key(self, key_id: str) -> tuple[Principal, str] | None:
        """SQS SigV4: the owner and the secret access key, or None for an unknown key id."""
        ...

    def verify_token(self, token: str) -> Principal | None:
        """HTTP ``Authorization: Bearer``: the token's owner, or None."""
        ...

    def principal_for_certificate(self, subject_cn: str) -> Principal | None:
        """AMQP EXTERNAL / Kafka mTLS: the user whose name is the certificate's subject CN
        (the TLS layer has already verified the chain), or None."""
        ...

    # --- failed logins -----------------------------------------------------------------
    async def login_failed(self, peer_host: str | None, user: str, protocol: str) -> FailedLogin:
        """Log (rate-limited, with the peer) and sleep the per-peer back-off. Call before
        sending the protocol's authentication error."""
        ...

    def login_succeeded(self, peer_host: str | None) -> None:
        """Forget the peer's failure count."""
        ...

    # --- may it ------------------------------------------------------------------------
    def may_use_vhost(self, principal: Principal, vhost: str) -> bool:
        """True when the vhost exists and the principal has permissions in it."""
        ...

    def check(self, principal: Principal, vhost: str, action: Action,
              resource_kind: ResourceKind, name: str) -> bool:
        """Permissions (regexes) and Kafka ACLs, as described in this module's docstring."""
        ...

    def check_routing_key(self, principal: Principal, vhost: str, exchange: str,
                          routing_key: str, action: Literal["write", "read"]) -> bool:
        """RabbitMQ topic permissions for topic exchanges: true when the user has no topic
        permission for ``exchange`` in ``vhost`` or its regex matches ``routing_key``."""
        ...

    # --- Kafka admin APIs (ACLs, KIP-554) -----------------------------------------------
    def describe_acls(self, acl_filter: AclFilter) -> list[AclBinding]:
        ...

    async def create_acls(self, bindings: list[AclBinding]) -> None:
        """Validates names (InvalidRequestError on an unknown type/operation/pattern)."""
        ...

    async def delete_acls(self, acl_filter: AclFilter) -> list[AclBinding]:
        """Deletes and returns the matching bindings."""
        ...

    def scram_mechanisms(self, user: str) -> list[tuple[str, int]]:
        """DescribeUserScramCredentials: (mechanism, iterations) of the user's credentials."""
        ...

    async def set_scram_credential(self, user: str, mechanism: str, iterations: int,
                                   salt: bytes, salted_password: bytes) -> None:
        """AlterUserScramCredentials upsertion: derives and stores StoredKey/ServerKey.
        Raises NotFoundError for an unknown user, InvalidRequestError for a bad mechanism
        or iterations outside 4096..16384."""
        ...

    async def delete_scram_credential(self, user: str, mechanism: str) -> None:
        ...


@functools.lru_cache(maxsize=4096)  # pure; asked per HTTP request (~4 us to parse)
def is_loopback(peer_host: str | None) -> bool:
    """127.0.0.0/8, ::1 and IPv4-mapped loopback; None (a UNIX socket) counts as loopback."""
    if peer_host is None:
        return True
    host = peer_host.split("%", 1)[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


# --- vhosts as name prefixes at the protocol boundary ------------------------------------
# The broker has one namespace. A name ``n`` in vhost ``v`` is the broker name ``v~n``
# (``/`` is no prefix, so every existing name is unchanged). ``~`` is illegal in Kafka
# topic names and vhost names, so no name of the default vhost collides with a prefixed one.
VHOST_SEPARATOR = "~"


def qualify(vhost: str, name: str) -> str:
    """The broker-wide name of ``name`` in ``vhost``. Apply it to the broker (topic) name,
    after any protocol escaping (AMQP: ``qualify(vhost, topic_name_for(queue))``), and
    authorize with the protocol's own, unqualified name: ``check`` refuses any name that
    contains the separator, so a client cannot reach another vhost by spelling it."""
    return name if vhost == DEFAULT_VHOST else f"{vhost}{VHOST_SEPARATOR}{name}"


def unqualify(broker_name: str) -> tuple[str, str]:
    """(vhost, name) of a broker-wide name: the inverse of ``qualify``."""
    vhost, separator, name = broker_name.partition(VHOST_SEPARATOR)
    return (vhost, name) if separator else (DEFAULT_VHOST, broker_name)


class HasSecurity(Protocol):
    """What ``security_of`` reads: ``conveyor.server.listeners.ListenerContext``."""

    @property
    def security(self) -> SecurityModel | None: ...
