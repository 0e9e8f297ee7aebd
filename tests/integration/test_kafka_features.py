"""Goal: the Kafka feature flags (KIP-584) are answered truthfully: ApiVersions v3 lists
group.version and share.version as supported and finalized at 1 (transaction.version at
2), and UpdateFeatures confirms that level and refuses any other, changing nothing.

Method: kafka-python's KafkaAdminClient (describe_features, update_features, which sends
UpdateFeatures to the controller Metadata names) against a BrokerThread, plus a raw
UpdateFeatures v2 (the request-level error that version has).
"""

from __future__ import annotations

import asyncio
import datetime
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from kio.schema.update_features.v2.request import FeatureUpdateKey, UpdateFeaturesRequest

from conveyor.protocols.kafka import error_codes
from conveyor.testing.server import BrokerThread
from tests.integration.test_kafka_share_wire import Client

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka.admin import KafkaAdminClient
    from kafka.errors import InvalidUpdateVersionError


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    data = tmp_path_factory.mktemp("features") / "data"
    with BrokerThread(Path(data), listeners=("kafka",)) as running:
        yield running


@pytest.fixture
def admin(server: BrokerThread) -> Iterator[KafkaAdminClient]:
    client = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{server.ports['kafka']}")
    yield client
    client.close()


def test_describe_features(admin: KafkaAdminClient) -> None:
    features = admin.describe_features()
    assert features == {
        "group.version": {"supported": (0, 1), "finalized": (1, 1), "finalized_epoch": 0},
        "share.version": {"supported": (0, 1), "finalized": (1, 1), "finalized_epoch": 0},
        "transaction.version": {"supported": (0, 2), "finalized": (2, 2),
                                "finalized_epoch": 0},
    }


def test_update_features_confirms_and_refuses(admin: KafkaAdminClient) -> None:
    """kafka-python sends v2, whose error is the request's: a level other than the
    finalized one, or an unknown feature, raises InvalidUpdateVersionError."""
    assert admin.update_features({"group.version": 1, "share.version": 1}) == {
        "group.version": "OK", "share.version": "OK"}
    with pytest.raises(InvalidUpdateVersionError, match="fixed at level 1"):
        admin.update_features({"share.version": ("UPGRADE", 2)})
    with pytest.raises(InvalidUpdateVersionError, match="not supported"):
        admin.update_features({"metadata.version": 27}, validate_only=True)
    with pytest.raises(InvalidUpdateVersionError):
        admin.update_features({"group.version": ("SAFE_DOWNGRADE", 0)})
    assert admin.describe_features()["group.version"]["finalized"] == (1, 1)


def test_update_features_v2_answers_for_the_request(server: BrokerThread) -> None:
    async def call(level: int) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.ports["kafka"])
        try:
            answer = await Client(reader, writer).call(UpdateFeaturesRequest(
                timeout=datetime.timedelta(seconds=5), validate_only=False,
                feature_updates=(FeatureUpdateKey(feature="share.version",
                                                  max_version_level=level, upgrade_type=1),)))
            return int(answer.error_code)
        finally:
            writer.close()

    assert asyncio.run(call(1)) == error_codes.NONE
    assert asyncio.run(call(3)) == error_codes.INVALID_UPDATE_VERSION
