"""Typed Kafka request bodies and cold-path responses, through kio's generated schema.

Owns: the table of API versions Conveyor serves (what ApiVersions advertises),
finding kio's request/response class for an (api_key, version), parsing a body
with kio's native reader, and writing a response entity with kio's writer.
Knows nothing of the broker; sans-IO.

Why kio: its native reader parses any request in about a microsecond (20 us
with a 1 MiB batch), and its schema covers every API and version. Its Python
writer is slow (11-70 us per response), so the two hot responses (Produce and
Fetch) are written by ``encoders`` instead; see docs/kafka.md for the numbers.

kio raises ``KeyError`` on a tagged field it does not know; the spec says to
skip them, so ``parse_body`` then drops unknown tags (tagged_fields.py) and
parses again. Every other parse failure becomes an ``InvalidRequestError``: a
bad body is an operating error, never a crash.
Bytes after a complete body are ignored, as Kafka's broker ignores them.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from pkgutil import resolve_name
from typing import Any, Final

from kio.schema.index import api_key_map, schema_name_map
from kio.serial import entity_reader, entity_writer
from kio.static.constants import EntityType

from conveyor.errors import InvalidRequestError
from conveyor.protocols.kafka.bounds import check_bounds
from conveyor.protocols.kafka.tagged_fields import without_unknown_tags

# API key -> (min version, max version) that Conveyor serves and advertises.
# Minimums are the oldest versions kio's schema carries (Kafka 4 dropped older
# ones); maximums stop before topic ids replace topic names (Produce v13,
# Fetch v13) and before features Conveyor does not implement.
SUPPORTED_VERSIONS: Final[dict[int, tuple[int, int]]] = {
    0: (3, 12),  # Produce (v12: transaction.version 2 adds partitions implicitly)
    1: (4, 12),  # Fetch
    2: (1, 11),  # ListOffsets (v7-v11: max timestamp, earliest local, tiered: none)
    3: (0, 12),  # Metadata
    8: (2, 8),  # OffsetCommit
    9: (1, 10),  # OffsetFetch (v8: several groups; v9: KIP-848 member; v10: topic ids)
    10: (0, 4),  # FindCoordinator
    11: (0, 9),  # JoinGroup
    12: (0, 4),  # Heartbeat
    13: (0, 5),  # LeaveGroup
    14: (0, 5),  # SyncGroup
    15: (0, 6),  # DescribeGroups (v6: GROUP_ID_NOT_FOUND for non-classic and unknown ids)
    16: (0, 5),  # ListGroups (v5: types_filter)
    17: (1, 1),  # SaslHandshake (v0 sends raw SASL tokens after it: not served)
    18: (0, 3),  # ApiVersions
    19: (2, 7),  # CreateTopics
    20: (1, 6),  # DeleteTopics
    21: (0, 2),  # DeleteRecords
    22: (0, 4),  # InitProducerId
    23: (2, 4),  # OffsetForLeaderEpoch (one epoch, 0: its end is the log end)
    24: (0, 5),  # AddPartitionsToTxn (v4+: batched, v5 verify-only: KIP-890)
    25: (0, 4),  # AddOffsetsToTxn
    26: (0, 5),  # EndTxn (v5: transaction.version 2, the epoch bumped and answered)
    28: (0, 5),  # TxnOffsetCommit (v5: transaction.version 2, the group added implicitly)
    29: (1, 3),  # DescribeAcls (onto the security model's ACLs)
    30: (1, 3),  # CreateAcls
    31: (1, 3),  # DeleteAcls
    32: (1, 4),  # DescribeConfigs
    33: (0, 2),  # AlterConfigs
    34: (1, 2),  # AlterReplicaLogDirs (one log dir)
    35: (1, 4),  # DescribeLogDirs
    36: (0, 2),  # SaslAuthenticate
    37: (0, 3),  # CreatePartitions
    42: (0, 2),  # DeleteGroups
    43: (0, 2),  # ElectLeaders (one replica: ELECTION_NOT_NEEDED)
    44: (0, 1),  # IncrementalAlterConfigs
    45: (0, 1),  # AlterPartitionReassignments (one replica: nothing to move)
    46: (0, 0),  # ListPartitionReassignments (never any)
    47: (0, 0),  # OffsetDelete
    48: (0, 1),  # DescribeClientQuotas (none: no quotas)
    49: (0, 1),  # AlterClientQuotas (refused per entry)
    50: (0, 0),  # DescribeUserScramCredentials (KIP-554)
    51: (0, 0),  # AlterUserScramCredentials
    55: (0, 2),  # DescribeQuorum (one voter, this node: Conveyor is not KRaft)
    57: (0, 2),  # UpdateFeatures (the features are fixed: confirming them is a no-op)
    60: (0, 1),  # DescribeCluster
    61: (0, 0),  # DescribeProducers
    65: (0, 0),  # DescribeTransactions
    66: (0, 1),  # ListTransactions (v1: duration filter)
    68: (0, 1),  # ConsumerGroupHeartbeat (KIP-848; v1: client-generated member ids)
    69: (0, 1),  # ConsumerGroupDescribe
    74: (0, 1),  # ListConfigResources (v1: topics, brokers, groups)
    75: (0, 0),  # DescribeTopicPartitions (paged by a cursor)
    76: (1, 1),  # ShareGroupHeartbeat (KIP-932; Kafka 4.2 serves v1 only)
    77: (1, 1),  # ShareGroupDescribe
    78: (1, 2),  # ShareFetch (v2: renew acknowledgements)
    79: (1, 2),  # ShareAcknowledge
    90: (0, 1),  # DescribeShareGroupOffsets
    91: (0, 0),  # AlterShareGroupOffsets (the group must be empty)
    92: (0, 0),  # DeleteShareGroupOffsets
}

API_NAMES: Final[dict[int, str]] = {key: api_key_map[key] for key in SUPPORTED_VERSIONS}


def is_supported(api_key: int, api_version: int) -> bool:
    versions = SUPPORTED_VERSIONS.get(api_key)
    return versions is not None and versions[0] <= api_version <= versions[1]


@functools.cache
def entity_class(api_key: int, api_version: int, kind: EntityType) -> type[Any]:
    """kio's generated dataclass for a request or response of this API version."""
    name = api_key_map[api_key]
    path = schema_name_map[name][api_version][kind]  # type: ignore[index]
    resolved = resolve_name(path)
    assert isinstance(resolved, type)
    return resolved


def request_class(api_key: int, api_version: int) -> type[Any]:
    return entity_class(api_key, api_version, EntityType.request)


def response_class(api_key: int, api_version: int) -> type[Any]:
    return entity_class(api_key, api_version, EntityType.response)


_Reader = Callable[[Any, int], tuple[Any, int]]
# (api_key, version) -> its request class and kio's reader, for served versions only (a
# bounded table): one dict lookup per request instead of three cached calls.
_PARSERS: dict[tuple[int, int], tuple[type[Any], _Reader]] = {}


def _parser(api_key: int, api_version: int) -> tuple[type[Any], _Reader]:
    parser = _PARSERS.get((api_key, api_version))
    if parser is None:
        if not is_supported(api_key, api_version):
            raise InvalidRequestError("unsupported api version", api_key=api_key,
                                      version=api_version)
        cls = request_class(api_key, api_version)
        reader: _Reader = entity_reader(cls)
        parser = _PARSERS[api_key, api_version] = (cls, reader)
    return parser


_WRITERS: dict[type[Any], Callable[[Any, Any], None]] = {}


def _writer(cls: type[Any]) -> Callable[[Any, Any], None]:
    writer = _WRITERS.get(cls)
    if writer is None:
        writer = _WRITERS[cls] = entity_writer(cls)
    return writer


def parse_body(api_key: int, api_version: int, body: bytes | memoryview) -> Any:
    """Parse a request body (read-only buffer) into kio's typed request."""
    cls, reader = _parser(api_key, api_version)
    # Before kio's native reader: a count it cannot satisfy aborts the process (bounds.py).
    check_bounds(cls, body)
    try:
        try:
            entity, size = reader(body, 0)
        except KeyError:  # kio: a tagged field it does not know; the spec says skip it
            cleaned, _ = without_unknown_tags(cls, body)
            entity, size = reader(cleaned, 0)
            body = cleaned
    except KeyError as error:
        raise InvalidRequestError(
            "unparseable request body", api_key=api_key, version=api_version, reason=str(error)
        ) from None
    except InvalidRequestError:
        raise
    except (ValueError, TypeError, IndexError, OverflowError, UnicodeDecodeError) as error:
        raise InvalidRequestError(
            "unparseable request body", api_key=api_key, version=api_version, reason=str(error)
        ) from None
    except Exception as error:  # kio's native reader raises its own exception types
        raise InvalidRequestError(
            "unparseable request body", api_key=api_key, version=api_version,
            reason=f"{type(error).__name__}: {error}",
        ) from None
    # Trailing bytes are ignored, as Kafka's own broker does: librdkafka 2.x sends three
    # extra bytes after some Metadata v12 bodies.
    assert size <= len(body)
    return entity


def encode_entity(entity: Any) -> bytes:
    """Write a kio entity (a response body) to bytes."""
    buffer = io.BytesIO()
    _writer(type(entity))(buffer, entity)
    return buffer.getvalue()
