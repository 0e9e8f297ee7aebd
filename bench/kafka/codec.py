"""Micro-benchmark: kio's writer vs Conveyor's hand-written Produce/Fetch encoders,
and kio's native reader on requests. Run: .venv/bin/python bench/kafka/codec.py

Prints microseconds per call and writes bench/results/kafka_codec.json.
"""

from __future__ import annotations

import datetime
import json
import platform
import struct
import timeit
from pathlib import Path
from typing import Any

from kio.schema.errors import ErrorCode

from conveyor.protocols.kafka.encoders import (
    FetchPartitionResult,
    ProducePartitionResult,
    encode_fetch_response,
    encode_produce_response,
)
from conveyor.protocols.kafka.messages import encode_entity, parse_body, response_class

ZERO = datetime.timedelta(0)
RESULTS = Path(__file__).resolve().parent.parent / "results" / "kafka_codec.json"


def module_of(cls: type[Any]) -> Any:
    return __import__(cls.__module__, fromlist=["x"])


def kio_produce(version: int, partitions: int) -> Any:
    cls = response_class(0, version)
    module = module_of(cls)
    rows = tuple(
        module.PartitionProduceResponse(
            index=index, error_code=ErrorCode.none, base_offset=1000, log_append_time=None,
            log_start_offset=0,
            **({"record_errors": (), "error_message": None} if version >= 8 else {}),
        )
        for index in range(partitions)
    )
    return cls(responses=(module.TopicProduceResponse(name="bench", partition_responses=rows),),
               throttle_time=ZERO)


def kio_fetch(version: int, partitions: int, records: bytes) -> Any:
    cls = response_class(1, version)
    module = module_of(cls)
    rows = tuple(
        module.PartitionData(
            partition_index=index, error_code=ErrorCode.none, high_watermark=1000,
            last_stable_offset=1000, log_start_offset=0, aborted_transactions=(),
            records=records,
        )
        for index in range(partitions)
    )
    return cls(responses=(module.FetchableTopicResponse(topic="bench", partitions=rows),),
               throttle_time=ZERO, error_code=ErrorCode.none)


def e2e_requests() -> tuple[bytes, bytes]:
    """A flexible Produce v9 body with one 170 B batch (one 100 B record) and a Fetch
    v12 body for one partition, as librdkafka sends them in the e2e phase."""
    produce = b"\x00" + struct.pack(">hi", -1, 30000)  # null transactional_id, acks, timeout
    produce += b"\x02\x06bench\x02" + struct.pack(">i", 0)  # one topic, one partition
    produce += bytes([171]) + b"\x01" + b"r" * 170 + b"\x00\x00\x00"  # records; tag sections
    fetch = struct.pack(">iiiibii", -1, 500, 1, 52428800, 0, 0, -1)
    fetch += b"\x02\x06bench\x02" + struct.pack(">iiqiqi", 0, -1, 100, -1, -1, 1048576)
    fetch += b"\x00\x00\x01\x01\x00"  # tag sections, no forgotten topics, rack "", tags
    return produce, fetch


def per_call_us(function: Any, number: int) -> float:
    best = min(timeit.repeat(function, number=number, repeat=5))
    return round(best / number * 1e6, 2)


def main() -> None:
    results: dict[str, float] = {}
    records = b"r" * (1 << 20)
    for version in (7, 11):
        for partitions in (1, 10):
            produce_entity = kio_produce(version, partitions)
            ours_rows = [ProducePartitionResult(index, 0, 1000, -1, 0)
                         for index in range(partitions)]
            results[f"produce_v{version}_p{partitions}_kio_us"] = per_call_us(
                lambda e=produce_entity: encode_entity(e), 2000)
            results[f"produce_v{version}_p{partitions}_handwritten_us"] = per_call_us(
                lambda r=ours_rows, v=version: encode_produce_response(1, v, [("bench", r)]), 2000)
    for version in (11, 12):
        for partitions in (1, 10):
            fetch_entity = kio_fetch(version, partitions, records)
            rows = [FetchPartitionResult(index, 0, 1000, 1000, 0, [(3, 0, len(records))])
                    for index in range(partitions)]
            results[f"fetch_v{version}_p{partitions}_1MiB_kio_us"] = per_call_us(
                lambda e=fetch_entity: encode_entity(e), 50)
            results[f"fetch_v{version}_p{partitions}_1MiB_handwritten_sendfile_us"] = per_call_us(
                lambda r=rows, v=version: encode_fetch_response(1, v, [("bench", r)]), 2000)
    produce_request = bytes.fromhex("ffff") + b"\x00\x01\x00\x00\x75\x30\x00\x00\x00\x01"
    produce_request += b"\x00\x05bench\x00\x00\x00\x01\x00\x00\x00\x00"
    produce_request += len(records).to_bytes(4, "big") + records
    results["produce_v7_parse_1MiB_kio_us"] = per_call_us(
        lambda: parse_body(0, 7, produce_request), 200)
    # The e2e phase's two requests per record (bounds check + kio's reader).
    small_produce, small_fetch = e2e_requests()
    results["produce_v9_parse_170B_us"] = per_call_us(
        lambda: parse_body(0, 9, small_produce), 20000)
    results["fetch_v12_parse_us"] = per_call_us(lambda: parse_body(1, 12, small_fetch), 20000)
    for name, value in results.items():
        print(f"{name:55s} {value:10.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(
        {"machine": platform.machine(), "python": platform.python_version(),
         "unit": "microseconds per call", "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
