"""Kafka security admin APIs over the security model: CreateAcls, DescribeAcls,
DeleteAcls and KIP-554's DescribeUserScramCredentials / AlterUserScramCredentials.

Owns: Kafka's integer enums for ACL resource types, pattern types, operations and
permissions (org.apache.kafka.common.acl/resource) <-> the model's names, and the
per-entry answers. The ACLs themselves live in the model (conveyor/security), where
``check`` consults them for every protocol.

Rules: CreateAcls / DeleteAcls / AlterUserScramCredentials need ALTER on the cluster,
DescribeAcls / DescribeUserScramCredentials DESCRIBE on it (Kafka's rules); refused
with CLUSTER_AUTHORIZATION_FAILED. A binding with an unknown enum value answers
INVALID_REQUEST for that entry; other entries still apply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from conveyor.errors import NotFoundError, OperatingError
from conveyor.protocols.kafka import error_codes
from conveyor.protocols.kafka.messages import response_class
from conveyor.protocols.kafka.responses import build, nested
from conveyor.security.api import AclBinding, AclFilter

if TYPE_CHECKING:
    from conveyor.protocols.kafka.authorization import Access
    from conveyor.security.api import SecurityModel

RESOURCE_TYPES: Final = {1: "ANY", 2: "TOPIC", 3: "GROUP", 4: "CLUSTER", 5: "TRANSACTIONAL_ID"}
PATTERN_TYPES: Final = {1: "ANY", 2: "MATCH", 3: "LITERAL", 4: "PREFIXED"}
OPERATIONS: Final = {1: "ANY", 2: "ALL", 3: "READ", 4: "WRITE", 5: "CREATE", 6: "DELETE",
                     7: "ALTER", 8: "DESCRIBE", 9: "CLUSTER_ACTION", 10: "DESCRIBE_CONFIGS",
                     11: "ALTER_CONFIGS", 12: "IDEMPOTENT_WRITE"}
PERMISSIONS: Final = {1: "ANY", 2: "DENY", 3: "ALLOW"}
SCRAM_MECHANISMS: Final = {1: "SCRAM-SHA-256", 2: "SCRAM-SHA-512"}
_CODES: Final = {table_name: {name: number for number, name in table.items()}
                 for table_name, table in (("resource", RESOURCE_TYPES),
                                           ("pattern", PATTERN_TYPES),
                                           ("operation", OPERATIONS),
                                           ("permission", PERMISSIONS))}
DENIED: Final = "Cluster authorization failed."


class BadEnum(Exception):
    pass


def _name(table: dict[int, str], value: int, allow_any: bool) -> str | None:
    name = table.get(int(value))
    if name is None or (not allow_any and name in ("ANY", "MATCH")):
        raise BadEnum(f"unknown value {value}")
    return None if name == "ANY" else name


def _binding(creation: Any) -> AclBinding:
    return AclBinding(
        principal=creation.principal, host=creation.host,
        resource_type=str(_name(RESOURCE_TYPES, creation.resource_type, False)),
        resource_name=creation.resource_name,
        pattern_type=str(_name(PATTERN_TYPES, creation.resource_pattern_type, False)),
        operation=str(_name(OPERATIONS, creation.operation, False)),
        permission=str(_name(PERMISSIONS, creation.permission_type, False)))


def _filter(item: Any) -> AclFilter:
    pattern = PATTERN_TYPES.get(int(item.pattern_type_filter))
    if pattern is None:
        raise BadEnum("unknown pattern type")
    return AclFilter(
        principal=item.principal_filter, host=item.host_filter,
        resource_type=_name(RESOURCE_TYPES, item.resource_type_filter, True),
        resource_name=item.resource_name_filter,
        pattern_type=None if pattern == "ANY" else pattern,
        operation=_name(OPERATIONS, item.operation, True),
        permission=_name(PERMISSIONS, item.permission_type, True))


async def handle_create_acls(security: SecurityModel, access: Access, request: Any) -> Any:
    version = request.header.api_version
    response_type = response_class(30, version)
    result_type = nested(response_type, "AclCreationResult")
    allowed = access.cluster("configure")
    results = []
    for creation in request.body.creations:
        code, message = error_codes.NONE, None
        if not allowed:
            code, message = error_codes.CLUSTER_AUTHORIZATION_FAILED, DENIED
        else:
            try:
                await security.create_acls([_binding(creation)])
            except BadEnum as error:
                code, message = error_codes.INVALID_REQUEST, str(error)
            except OperatingError as error:
                code, message = error_codes.INVALID_REQUEST, error.message
        results.append(build(result_type, error_code=code, error_message=message))
    return build(response_type, results=tuple(results))


def handle_describe_acls(security: SecurityModel, access: Access, request: Any) -> Any:
    version = request.header.api_version
    response_type = response_class(29, version)
    if not access.cluster("describe"):
        return build(response_type, error_code=error_codes.CLUSTER_AUTHORIZATION_FAILED,
                     error_message=DENIED, resources=())
    try:
        bindings = security.describe_acls(_filter(request.body))
    except BadEnum as error:
        return build(response_type, error_code=error_codes.INVALID_REQUEST,
                     error_message=str(error), resources=())
    resource_type = nested(response_type, "DescribeAclsResource")
    description_type = nested(response_type, "AclDescription")
    grouped: dict[tuple[str, str, str], list[AclBinding]] = {}
    for binding in bindings:
        key = (binding.resource_type, binding.resource_name, binding.pattern_type)
        grouped.setdefault(key, []).append(binding)
    resources = tuple(
        build(resource_type, resource_type=_CODES["resource"][kind], resource_name=name,
              pattern_type=_CODES["pattern"][pattern], acls=tuple(
                  build(description_type, principal=binding.principal, host=binding.host,
                        operation=_CODES["operation"][binding.operation],
                        permission_type=_CODES["permission"][binding.permission])
                  for binding in members))
        for (kind, name, pattern), members in grouped.items())
    return build(response_type, error_code=error_codes.NONE, error_message=None,
                 resources=resources)


async def handle_delete_acls(security: SecurityModel, access: Access, request: Any) -> Any:
    version = request.header.api_version
    response_type = response_class(31, version)
    result_type = nested(response_type, "DeleteAclsFilterResult")
    matching_type = nested(response_type, "DeleteAclsMatchingAcl")
    allowed = access.cluster("configure")
    results = []
    for item in request.body.filters:
        if not allowed:
            results.append(build(result_type, error_code=error_codes.CLUSTER_AUTHORIZATION_FAILED,
                                 error_message=DENIED, matching_acls=()))
            continue
        try:
            deleted = await security.delete_acls(_filter(item))
        except BadEnum as error:
            results.append(build(result_type, error_code=error_codes.INVALID_REQUEST,
                                 error_message=str(error), matching_acls=()))
            continue
        results.append(build(result_type, error_code=error_codes.NONE, error_message=None,
                             matching_acls=tuple(
            build(matching_type, error_code=error_codes.NONE, error_message=None,
                  resource_type=_CODES["resource"][binding.resource_type],
                  resource_name=binding.resource_name,
                  pattern_type=_CODES["pattern"][binding.pattern_type],
                  principal=binding.principal, host=binding.host,
                  operation=_CODES["operation"][binding.operation],
                  permission_type=_CODES["permission"][binding.permission])
            for binding in deleted)))
    return build(response_type, filter_results=tuple(results))


def handle_describe_scram(security: SecurityModel, access: Access, request: Any) -> Any:
    response_type = response_class(50, request.header.api_version)
    if not access.cluster("describe"):
        return build(response_type, error_code=error_codes.CLUSTER_AUTHORIZATION_FAILED,
                     error_message=DENIED, results=())
    result_type = nested(response_type, "DescribeUserScramCredentialsResult")
    info_type = nested(response_type, "CredentialInfo")
    numbers = {name: number for number, name in SCRAM_MECHANISMS.items()}
    users = request.body.users
    names = [user.name for user in users] if users else None
    if names is None:
        names = security_users(security)
    results = []
    for name in names:
        mechanisms = security.scram_mechanisms(name)
        if not mechanisms:
            results.append(build(result_type, user=name,
                                 error_code=error_codes.RESOURCE_NOT_FOUND,
                                 error_message=f"Attempt to describe a user credential that "
                                               f"does not exist: {name}",
                                 credential_infos=()))
            continue
        results.append(build(result_type, user=name, error_code=error_codes.NONE,
                             error_message=None, credential_infos=tuple(
            build(info_type, mechanism=numbers[mechanism], iterations=iterations)
            for mechanism, iterations in mechanisms if mechanism in numbers)))
    return build(response_type, error_code=error_codes.NONE, error_message=None,
                 results=tuple(results))


def security_users(security: SecurityModel) -> list[str]:
    """Every user with a SCRAM credential, when the model can list them (describe-all:
    Kafka answers only the users that have one)."""
    admin = getattr(security, "admin", None)
    lister = getattr(admin, "list_users", None)
    if not callable(lister):
        return []
    return sorted(str(user["name"]) for user in lister() if user.get("scram_mechanisms"))


async def handle_alter_scram(security: SecurityModel, access: Access, request: Any) -> Any:
    response_type = response_class(51, request.header.api_version)
    result_type = nested(response_type, "AlterUserScramCredentialsResult")
    allowed = access.cluster("configure")
    results = []
    body = request.body
    for change, upsert in ([(item, False) for item in body.deletions]
                           + [(item, True) for item in body.upsertions]):
        code, message = error_codes.NONE, None
        mechanism = SCRAM_MECHANISMS.get(int(change.mechanism))
        if not allowed:
            code, message = error_codes.CLUSTER_AUTHORIZATION_FAILED, DENIED
        elif mechanism is None:
            code, message = error_codes.UNSUPPORTED_SASL_MECHANISM, "Unknown SCRAM mechanism"
        else:
            try:
                if upsert:
                    await security.set_scram_credential(
                        change.name, mechanism, int(change.iterations), bytes(change.salt),
                        bytes(change.salted_password))
                else:
                    await security.delete_scram_credential(change.name, mechanism)
            except NotFoundError as error:
                code, message = error_codes.RESOURCE_NOT_FOUND, error.message
            except OperatingError as error:
                code, message = error_codes.UNACCEPTABLE_CREDENTIAL, error.message
        results.append(build(result_type, user=change.name, error_code=code,
                             error_message=message))
    return build(response_type, results=tuple(results))
