"""Refusals the Kafka authorization answers with, for every API Conveyor serves.

Goal: ``refusal`` builds a response of each API and version whose top-level error
fields carry the code and that kio's writer encodes and its reader reads back (so a
refused request is answered in the protocol, never with a crash); ``topics_denied``
finds the topics each admin/share API names, by name or by topic id.
Method: every (api_key, version) of SUPPORTED_VERSIONS; a model with a user who may
read topic ``a`` only.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from types import SimpleNamespace

import pytest
from kio.serial import entity_reader

from conveyor.protocols.kafka import error_codes
from conveyor.protocols.kafka.authorization import Access, refusal, topics_denied
from conveyor.protocols.kafka.messages import SUPPORTED_VERSIONS, encode_entity
from conveyor.security.model import open_model

ALL_VERSIONS = [(key, version) for key, (low, high) in sorted(SUPPORTED_VERSIONS.items())
                for version in range(low, high + 1)]


@pytest.mark.parametrize(("api_key", "version"), ALL_VERSIONS)
def test_refusal_encodes_for_every_api(api_key: int, version: int) -> None:
    response = refusal(api_key, version, error_codes.TOPIC_AUTHORIZATION_FAILED, "no")
    data = encode_entity(response)
    decoded, size = entity_reader(type(response))(io.BytesIO(data).getvalue(), 0)
    assert size == len(data)
    if hasattr(decoded, "error_code"):
        assert int(decoded.error_code) == error_codes.TOPIC_AUTHORIZATION_FAILED


def test_topics_denied_by_name_and_by_id() -> None:
    model = open_model()

    async def user() -> None:
        await model.admin.add_user("alice", "pw")
        await model.admin.set_permissions("alice", "/", "", "", "^a$")

    asyncio.run(user())
    alice = model.principal("alice")
    assert alice is not None
    access = Access(model, alice, "/")
    ids = {uuid.UUID(int=1): "a", uuid.UUID(int=2): "b"}
    topics = lambda *names: SimpleNamespace(topics=[SimpleNamespace(name=name)  # noqa: E731
                                                    for name in names])
    assert topics_denied(21, topics("a"), access, ids.get)  # DeleteRecords: configure
    assert not topics_denied(47, topics("a"), access, ids.get)  # OffsetDelete: read
    assert topics_denied(47, topics("a", "b"), access, ids.get)
    share = SimpleNamespace(topics=[SimpleNamespace(topic_id=uuid.UUID(int=1))])
    assert not topics_denied(78, share, access, ids.get)
    share.topics.append(SimpleNamespace(topic_id=uuid.UUID(int=2)))
    assert topics_denied(78, share, access, ids.get)
    configs = SimpleNamespace(resources=[SimpleNamespace(resource_type=2, resource_name="a"),
                                         SimpleNamespace(resource_type=4, resource_name="0")])
    assert not topics_denied(32, configs, access, ids.get)  # describe: granted by read
    assert topics_denied(44, configs, access, ids.get)  # alter: configure
    assert not topics_denied(3, topics("b"), access, ids.get)  # Metadata: its handler's
