"""Kafka feature flags (KIP-584) as Conveyor has them: fixed by its code.

Owns: the features ApiVersions v3 advertises (supported range and finalized level) and
UpdateFeatures (57), which can only confirm them.

Rules: ``group.version`` 1 (KIP-848 consumer groups), ``share.version`` 1 (KIP-932
share groups) and ``transaction.version`` 2 (KIP-890 part 2: EndTxn v5 bumps the epoch,
Produce v12 and TxnOffsetCommit v5 add to the transaction implicitly; Kafka 4 Java
clients read this level to choose that protocol, older clients ignore it) are what this
code serves, finalized at that level; other features Kafka has (``metadata.version``,
``kraft.version``...) describe a KRaft cluster, so they are not claimed. An update to
the finalized level is a no-op; any other level, a downgrade, or an unknown feature is
INVALID_UPDATE_VERSION for that feature (v2: for the request), nothing changing.
"""

from __future__ import annotations

import sys
from typing import Any, Final

from conveyor.protocols.kafka import error_codes
from conveyor.protocols.kafka.codec import Request
from conveyor.protocols.kafka.messages import response_class
from conveyor.protocols.kafka.responses import build, nested

# name -> (lowest supported, highest supported, finalized level)
FEATURES: Final[dict[str, tuple[int, int, int]]] = {
    "group.version": (0, 1, 1),
    "share.version": (0, 1, 1),
    "transaction.version": (0, 2, 2),
}
FEATURES_EPOCH: Final = 0  # they never change on a running node


def supported_features(response_type: type[Any]) -> tuple[Any, ...]:
    """ApiVersions v3+ (older versions have no feature fields: none)."""
    if not hasattr(sys.modules[response_type.__module__], "SupportedFeatureKey"):
        return ()
    key_type = nested(response_type, "SupportedFeatureKey")
    return tuple(build(key_type, name=name, min_version=low, max_version=high)
                 for name, (low, high, _) in sorted(FEATURES.items()))


def finalized_features(response_type: type[Any]) -> tuple[Any, ...]:
    if not hasattr(sys.modules[response_type.__module__], "FinalizedFeatureKey"):
        return ()
    key_type = nested(response_type, "FinalizedFeatureKey")
    return tuple(build(key_type, name=name, min_version_level=level, max_version_level=level)
                 for name, (_, _, level) in sorted(FEATURES.items()))


def _refusal(feature: str, level: int) -> str | None:
    known = FEATURES.get(feature)
    if known is None:
        return f"Feature {feature} is not supported by Conveyor."
    if level != known[2]:
        return (f"Feature {feature} is fixed at level {known[2]} by this Conveyor version "
                f"(asked {level}).")
    return None


def handle_update_features(request: Request) -> Any:
    version = request.header.api_version
    response_type = response_class(57, version)
    refusals = [(update.feature, _refusal(update.feature, update.max_version_level))
                for update in request.body.feature_updates]
    if version >= 2:
        first = next((message for _, message in refusals if message is not None), None)
        return build(response_type, error_code=error_codes.NONE if first is None
                     else error_codes.INVALID_UPDATE_VERSION, error_message=first)
    result_type = nested(response_type, "UpdatableFeatureResult")
    results = tuple(
        build(result_type, feature=feature, error_message=message,
              error_code=error_codes.NONE if message is None
              else error_codes.INVALID_UPDATE_VERSION)
        for feature, message in refusals)
    return build(response_type, error_code=error_codes.NONE, error_message=None,
                 results=results)
