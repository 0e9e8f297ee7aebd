"""Kafka ACL bindings: validation, filters, and what a binding grants.

Owns: which bindings apply to (principal, resource kind, name, action) and the mapping
of Kafka's operations onto the model's four actions (see conveyor/security/api.py).
Pure; no I/O, no state beyond the list it is given.
"""

from __future__ import annotations

from collections.abc import Iterable

from conveyor.errors import InvalidRequestError
from conveyor.security.api import (
    ACL_OPERATIONS,
    ACL_PATTERN_TYPES,
    ACL_PERMISSIONS,
    ACL_RESOURCE_TYPES,
    AclBinding,
    AclFilter,
    Action,
    ResourceKind,
)

# Kafka operation -> the actions it grants (DESCRIBE implied as Kafka does).
OPERATION_ACTIONS: dict[str, frozenset[str]] = {
    "ALL": frozenset({"configure", "write", "read", "describe"}),
    "READ": frozenset({"read", "describe"}),
    "WRITE": frozenset({"write", "describe"}),
    "IDEMPOTENT_WRITE": frozenset({"write"}),
    "CREATE": frozenset({"configure"}),
    "DELETE": frozenset({"configure", "describe"}),
    "ALTER": frozenset({"configure", "describe"}),
    "ALTER_CONFIGS": frozenset({"configure"}),
    "CLUSTER_ACTION": frozenset({"configure"}),
    "DESCRIBE": frozenset({"describe"}),
    "DESCRIBE_CONFIGS": frozenset({"describe"}),
}
# A DENY blocks exactly the operation's own actions (no implied DESCRIBE).
DENY_ACTIONS: dict[str, frozenset[str]] = {
    **{operation: frozenset(actions - {"describe"}) for operation, actions in
       OPERATION_ACTIONS.items()},
    "ALL": OPERATION_ACTIONS["ALL"],
    "DESCRIBE": frozenset({"describe"}),
    "DESCRIBE_CONFIGS": frozenset({"describe"}),
}
# resource kind of the model -> Kafka resource type
KIND_TYPES: dict[str, str] = {
    "topic": "TOPIC", "queue": "TOPIC", "exchange": "TOPIC", "group": "GROUP",
    "cluster": "CLUSTER", "transactional_id": "TRANSACTIONAL_ID",
}
NAME_BYTES_MAX = 1024


def validate(binding: AclBinding) -> None:
    checks = (("resource_type", binding.resource_type, ACL_RESOURCE_TYPES),
              ("pattern_type", binding.pattern_type, ACL_PATTERN_TYPES),
              ("operation", binding.operation, ACL_OPERATIONS),
              ("permission", binding.permission, ACL_PERMISSIONS))
    for field_name, value, known in checks:
        if value not in known:
            raise InvalidRequestError(f"unknown ACL {field_name}", value=value, known=list(known))
    if not binding.principal.startswith("User:") or len(binding.principal) <= len("User:"):
        raise InvalidRequestError("ACL principal must be User:NAME", principal=binding.principal)
    if not binding.resource_name or len(binding.resource_name) > NAME_BYTES_MAX:
        raise InvalidRequestError("ACL resource name is empty or too long")
    if binding.pattern_type == "PREFIXED" and binding.resource_name == "*":
        raise InvalidRequestError("a PREFIXED ACL cannot use the wildcard '*'")


def _name_matches(binding: AclBinding, name: str) -> bool:
    if binding.pattern_type == "PREFIXED":
        return name.startswith(binding.resource_name)
    return binding.resource_name in ("*", name)


def _principal_matches(binding: AclBinding, principal: str) -> bool:
    return binding.principal in ("User:*", principal)


def decide(bindings: Iterable[AclBinding], principal: str, peer_host: str | None,
           kind: ResourceKind, name: str, action: Action) -> bool | None:
    """False when a DENY applies, True when an ALLOW applies, None when no binding does."""
    resource_type = KIND_TYPES[kind]
    allowed = False
    for binding in bindings:
        if binding.resource_type != resource_type or not _principal_matches(binding, principal):
            continue
        if binding.host != "*" and binding.host != peer_host:
            continue
        if not _name_matches(binding, name):
            continue
        if binding.permission == "DENY" and action in DENY_ACTIONS[binding.operation]:
            return False
        if binding.permission == "ALLOW" and action in OPERATION_ACTIONS[binding.operation]:
            allowed = True
    return True if allowed else None


def matches_filter(binding: AclBinding, acl_filter: AclFilter) -> bool:
    def same(wanted: str | None, value: str) -> bool:
        return wanted is None or wanted in ("ANY", value)

    if not (same(acl_filter.principal, binding.principal)
            and same(acl_filter.resource_type, binding.resource_type)
            and same(acl_filter.operation, binding.operation)
            and same(acl_filter.permission, binding.permission)
            and same(acl_filter.host, binding.host)):
        return False
    pattern = acl_filter.pattern_type
    if pattern == "MATCH":
        return acl_filter.resource_name is None or _name_matches(binding,
                                                                 acl_filter.resource_name)
    if not same(pattern, binding.pattern_type):
        return False
    return acl_filter.resource_name is None or acl_filter.resource_name == binding.resource_name
