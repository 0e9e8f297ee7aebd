"""AMQP queue and exchange names -> the broker's names, per vhost.

Owns: ``topic_name_for``, the escaping of an AMQP queue name (any UTF-8 up to 255
bytes) into a legal topic name (``[a-zA-Z0-9._-]``, at most 249 characters); and
the vhost qualification at the protocol boundary (``queue_topic``,
``broker_exchange``): a queue ``q`` of vhost ``v`` is the broker topic
``v~topic_name_for(q)``, an exchange ``x`` is the broker exchange ``v~x`` (vhost
``/`` adds no prefix, so its names are unchanged; the default exchange ``""`` of ``v``
is ``v~``, which the broker routes to ``v``'s queues only). The broker speaks these
names only; the AMQP handlers map every name through them before calling it, check
permissions and answer the client with the unqualified names, and the server hands
``topic_name_for`` to the broker as the default exchange's alias so a dead-lettered
message routed by its original AMQP routing key finds its queue. The built-in
exchanges (``amq.direct`` ...) of a vhost other than ``/`` are created in the broker
(``v~amq.direct`` ...) when the first channel opens in it. Pure; no I/O.
"""

from __future__ import annotations

import hashlib
import re

from conveyor.broker.topics import TOPIC_NAME_BYTES_MAX
from conveyor.security.api import DEFAULT_VHOST, VHOST_SEPARATOR

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


def queue_topic(vhost: str, name: str) -> str:
    """The broker topic behind queue ``name`` of ``vhost`` (a string concat per method)."""
    topic = topic_name_for(name)
    return topic if vhost == DEFAULT_VHOST else f"{vhost}{VHOST_SEPARATOR}{topic}"


class QualifiedNameError(ValueError):
    """An exchange name holding the vhost separator: it would name another vhost's
    exchange in the broker (the channel answers 403 ACCESS_REFUSED)."""


def broker_exchange(vhost: str, name: str) -> str:
    """The broker exchange behind exchange ``name`` of ``vhost`` ("" of ``v``: ``v~``).
    Raises QualifiedNameError for a name with ``~`` in it (AMQP's exchange-name domain
    has no ``~``; queue names need no check: ``topic_name_for`` escapes it)."""
    if VHOST_SEPARATOR in name:
        raise QualifiedNameError(f"ACCESS_REFUSED - exchange name '{name}' may not "
                                 f"contain '{VHOST_SEPARATOR}'")
    return name if vhost == DEFAULT_VHOST else f"{vhost}{VHOST_SEPARATOR}{name}"


def local_name(broker_name: str) -> str:
    """A broker exchange or queue name without its vhost prefix (what a client sees)."""
    vhost, separator, name = broker_name.partition(VHOST_SEPARATOR)
    return name if separator else vhost
