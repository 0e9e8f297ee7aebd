"""Schemathesis against /openapi.json of a real server.

Goal: for generated requests to every operation (valid and invalid), the server
never answers 5xx, only with documented status codes and content types, and its
bodies match the response schemas. Method: the document the server serves,
loaded from the live server; a bounded number of examples per operation
(CONVEYOR_FUZZ_EXAMPLES, default 12) so the file runs in well under a minute.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from conveyor.protocols.http.openapi import build_document
from conveyor.testing.server import BrokerThread

EXAMPLES = int(os.environ.get("CONVEYOR_FUZZ_EXAMPLES", "12"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]



def narrowed_document() -> dict[str, Any]:
    """The served document with partition counts capped at 4 for generation only:
    creating thousands of partitions (each a directory and fsynced files) is valid
    but would spend the whole time budget on the file system."""
    document = copy.deepcopy(build_document())
    for path_item in document["paths"].values():
        for operation in path_item.values():
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            properties = (body or {}).get("schema", {}).get("properties", {})
            if "partitions" in properties:
                properties["partitions"]["maximum"] = 4
    return document


schema = schemathesis.openapi.from_dict(narrowed_document())
# The coverage phase enumerates every boundary of every field (hundreds of cases per
# operation); the bounded random phases below keep the file under a minute.
schema.config.phases.coverage.enabled = False


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # tmpfs when there is one: the fuzzer creates hundreds of topics, and their
    # fsyncs would dominate the run on a real disk.
    shm = Path("/dev/shm")
    parent = str(shm) if shm.is_dir() else str(tmp_path_factory.getbasetemp())
    with tempfile.TemporaryDirectory(dir=parent) as data_dir, BrokerThread(
        Path(data_dir), listeners=("http",)
    ) as server:
        url = f"http://127.0.0.1:{server.ports['http']}"
        served = httpx.get(url + "/openapi.json").json()
        assert served == build_document()  # the fuzzed document is the served one
        yield url


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_document(case: schemathesis.Case, base_url: str) -> None:
    case.call_and_validate(base_url=base_url, checks=CHECKS)
