"""The in-memory security state and its validation rules.

Owns: the users, credentials, vhosts, compiled permissions, tokens, access keys and ACL
bindings as the model reads them on every check (dicts, no I/O), and the rules for
names and permission patterns. ``conveyor/security/model.py`` mutates it and persists
each change through ``SecurityStateStore``.

Permission patterns follow RabbitMQ: an unanchored regular-expression search over the
resource name (``^q-`` for names starting ``q-``, ``.*`` for everything), and the empty
pattern matches nothing. Patterns are compiled once when set; they are written by
administrators, bounded in length, and matched against names that are themselves
bounded, with the decisions cached per (user, vhost, action, name) so a hot path pays
one dict lookup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from conveyor.errors import InvalidNameError, InvalidRequestError
from conveyor.security.api import TAGS, AclBinding, Principal, ScramCredential

PATTERN_CHARACTERS_MAX = 1024
NAME_CHARACTERS_MAX = 255
DECISIONS_MAX = 65_536  # cached permission decisions, cleared when full or on any change
_VHOST_NAME = re.compile(r"[a-zA-Z0-9._-]{1,64}")
_USER_NAME_ILLEGAL = re.compile(r"[\x00-\x1f\x7f:,]")


def validate_user_name(name: str) -> None:
    """1..255 characters, no control characters, no ':' (HTTP Basic splits on it) or ','."""
    if not name or len(name) > NAME_CHARACTERS_MAX or _USER_NAME_ILLEGAL.search(name):
        raise InvalidNameError("illegal user name: 1..255 characters without ':' ',' or"
                               " control characters", name=name[:64])


def validate_vhost_name(name: str) -> None:
    """``/`` or 1..64 of ``[a-zA-Z0-9._-]`` (the name becomes a prefix of broker names)."""
    if name != "/" and not _VHOST_NAME.fullmatch(name):
        raise InvalidNameError("illegal vhost name: '/' or 1..64 of [a-zA-Z0-9._-]",
                               name=name[:64])


def validate_tags(tags: tuple[str, ...]) -> None:
    unknown = [tag for tag in tags if tag not in TAGS]
    if unknown:
        raise InvalidRequestError("unknown tags", tags=unknown, known=list(TAGS))


@dataclass(frozen=True, slots=True)
class Pattern:
    """One compiled permission pattern (RabbitMQ: unanchored search; "" matches nothing)."""

    text: str
    compiled: re.Pattern[str] | None

    @classmethod
    def compile(cls, text: str) -> Pattern:
        if len(text) > PATTERN_CHARACTERS_MAX:
            raise InvalidRequestError("permission pattern too long",
                                      length_max=PATTERN_CHARACTERS_MAX)
        if text == "":
            return cls(text, None)
        try:
            return cls(text, re.compile(text))
        except re.error as error:
            raise InvalidRequestError("invalid permission pattern", pattern=text[:100],
                                      error=str(error)) from None

    def matches(self, name: str) -> bool:
        return self.compiled is not None and self.compiled.search(name) is not None


@dataclass(frozen=True, slots=True)
class Permission:
    configure: Pattern
    write: Pattern
    read: Pattern

    @classmethod
    def compile(cls, configure: str, write: str, read: str) -> Permission:
        return cls(Pattern.compile(configure), Pattern.compile(write), Pattern.compile(read))

    def allows(self, action: str, name: str) -> bool:
        if action == "describe":
            return any(p.matches(name) for p in (self.configure, self.write, self.read))
        pattern: Pattern = getattr(self, action)
        return pattern.matches(name)


@dataclass(slots=True)
class User:
    name: str
    password_hash: str
    tags: tuple[str, ...]
    principal: Principal


@dataclass(frozen=True, slots=True)
class Token:
    token_hash: str
    user: str
    name: str
    created_ms: int

    @property
    def token_id(self) -> str:
        """What lists and deletes name a token by: a prefix of its hash, never the token."""
        return self.token_hash[:16]


@dataclass(frozen=True, slots=True)
class AccessKey:
    key_id: str
    user: str
    secret: str
    created_ms: int


@dataclass(slots=True)
class SecurityState:
    users: dict[str, User] = field(default_factory=dict)
    scram: dict[tuple[str, str], ScramCredential] = field(default_factory=dict)
    vhosts: set[str] = field(default_factory=set)
    permissions: dict[tuple[str, str], Permission] = field(default_factory=dict)
    # (user, vhost, exchange) -> routing-key patterns
    topic_permissions: dict[tuple[str, str, str], tuple[Pattern, Pattern]] = field(
        default_factory=dict)
    tokens: dict[str, Token] = field(default_factory=dict)  # by token hash
    access_keys: dict[str, AccessKey] = field(default_factory=dict)
    acls: list[AclBinding] = field(default_factory=list)
    decisions: dict[tuple[str, str, str, str, str], bool] = field(default_factory=dict)

    def changed(self) -> None:
        """Any mutation forgets the cached decisions."""
        self.decisions.clear()
