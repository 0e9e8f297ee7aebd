"""AMQP queue names -> Conveyor topic names.

Owns: ``topic_name_for``, the escaping of an AMQP queue name (any UTF-8 up to 255
bytes) into a legal topic name (``[a-zA-Z0-9._-]``, at most 249 characters). The
broker speaks topic names only; the AMQP handlers map every queue name through this
before calling it, and the server hands it to the broker as the default exchange's
alias so a dead-lettered message routed by its original AMQP routing key finds its
queue. Pure; no I/O.
"""

from __future__ import annotations

import hashlib
import re

from conveyor.broker.topics import TOPIC_NAME_BYTES_MAX

_LEGAL_NAME = re.compile(r"[a-zA-Z0-9._-]+")
_ILLEGAL_CHARACTER = re.compile(r"[^a-zA-Z0-9._-]")
ESCAPED_PREFIX = "amqp.q."
LEGAL_PART_CHARACTERS_MAX = 200  # leaves room for the prefix and the digest under 249


def topic_name_for(name: str) -> str:
    """The topic behind a queue name that Kafka's rules may not accept: a legal name is
    itself; any other maps, deterministically, to
    ``amqp.q.<legal characters>.<8 hex of its SHA-1>``."""
    if len(name) <= TOPIC_NAME_BYTES_MAX and name not in (".", "..") and \
            _LEGAL_NAME.fullmatch(name):
        return name
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]
    legal = _ILLEGAL_CHARACTER.sub("_", name)[:LEGAL_PART_CHARACTERS_MAX]
    return f"{ESCAPED_PREFIX}{legal}.{digest}"
