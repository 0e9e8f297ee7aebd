"""What authentication and authorization cost: the model's calls, and HTTP requests.

What:
- the model in process: ``check`` (a cached decision, and a fresh one through the
  regexes), ``verify_password`` (first: one scrypt; then: the per-process HMAC cache),
  ``verify_token`` (one SHA-256 and a dict lookup);
- HTTP requests/s over one keep-alive connection (GET /topics/t/messages of one 1 KiB
  record) against one server: anonymous loopback guest (auth off) beside Basic and
  Bearer (auth required), the same client code for all three.
The peer is Conveyor itself without credentials: the ratio is the price of auth.

Run: ``python -m bench.security.auth_cost [--seconds 2] [--rounds 3]``; writes
bench/results/security.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from conveyor.security.model import Security
from conveyor.server.app import Server
from conveyor.testing.server import test_config

RESULTS = Path(__file__).resolve().parents[1] / "results" / "security.json"
BASIC = {"Authorization": "Basic " + base64.b64encode(b"admin:admin-pw").decode()}


def per_call_us(function: Callable[[], object], seconds: float) -> float:
    calls = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        for _ in range(100):
            function()
        calls += 100
    return (time.perf_counter() - started) / calls * 1e6


async def model_costs(seconds: float) -> dict[str, float]:
    security = Security(None)
    await security.admin.add_vhost("/")
    await security.admin.add_user("alice", "alice-pw")
    await security.admin.set_permissions("alice", "/", "^q-[0-9]+$", "^q-[0-9]+$", "^q-")
    _, token = await security.admin.create_token("alice", "bench")
    alice = security.principal("alice")
    assert alice is not None
    names = [f"q-{n}" for n in range(100_000)]
    position = iter(range(10**9))

    def fresh() -> None:
        security.check(alice, "/", "read", "queue", names[next(position) % len(names)])
        security.state.decisions.clear()

    started = time.perf_counter()
    security.verify_password("alice", "alice-pw")
    first_password_ms = (time.perf_counter() - started) * 1000
    return {
        "check_cached_us": per_call_us(
            lambda: security.check(alice, "/", "read", "queue", "q-1"), seconds),
        "check_fresh_us": per_call_us(fresh, seconds),
        "verify_password_first_ms": first_password_ms,
        "verify_password_cached_us": per_call_us(
            lambda: security.verify_password("alice", "alice-pw"), seconds),
        "verify_token_us": per_call_us(lambda: security.verify_token(token), seconds),
    }


async def http_rate(url: str, headers: dict[str, str], seconds: float) -> float:
    async with httpx.AsyncClient(base_url=url, headers=headers) as client:
        requests = 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            response = await client.get("/topics/t/messages", params={"offset": 0,
                                                                      "limit": 1})
            response.raise_for_status()
            requests += 1
        return requests / seconds


async def _start(data_dir: Path, auth: str) -> Server:
    config = dataclasses.replace(test_config(data_dir, ("http",)), auth=auth)
    environ = {"CONVEYOR_ADMIN_USER": "admin", "CONVEYOR_ADMIN_PASSWORD": "admin-pw"}
    server = Server(config, environ=environ if auth == "required" else {})
    await server.start()
    await server.broker.create_topic("t")
    headers = BASIC if auth == "required" else {}
    async with httpx.AsyncClient(base_url=_url(server), headers=headers) as client:
        (await client.post("/topics/t/messages", json={
            "messages": [{"value": "x" * 1024}]})).raise_for_status()
    return server


def _url(server: Server) -> str:
    return f"http://127.0.0.1:{server.ports['http']}"


async def http_costs(seconds: float, rounds: int) -> dict[str, float]:
    """Both servers run at once; the three clients take turns, ``rounds`` times, and the
    median of each is kept (the machine is shared: interleaving spreads the noise)."""
    with tempfile.TemporaryDirectory() as off_dir, tempfile.TemporaryDirectory() as on_dir:
        open_server = await _start(Path(off_dir), "off")
        secured = await _start(Path(on_dir), "required")
        try:
            _, token = await secured.security.admin.create_token("admin", "bench")
            cases = {"http_anonymous_rps": (open_server, {}),
                     "http_basic_rps": (secured, BASIC),
                     "http_bearer_rps": (secured, {"Authorization": f"Bearer {token}"})}
            samples: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(rounds):
                for name, (server, headers) in cases.items():
                    samples[name].append(await http_rate(_url(server), headers, seconds))
        finally:
            await open_server.stop()
            await secured.stop()
    return {name: statistics.median(values) for name, values in samples.items()}


async def main_async(seconds: float, rounds: int) -> dict[str, Any]:
    model = await model_costs(seconds)
    http = await http_costs(seconds, rounds)
    return {"machine": platform.platform(), "seconds": seconds, "rounds": rounds,
            "model": model, "http": http,
            "ratios": {"basic_over_anonymous": http["http_basic_rps"] /
                       http["http_anonymous_rps"],
                       "bearer_over_anonymous": http["http_bearer_rps"] /
                       http["http_anonymous_rps"]}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    document = asyncio.run(main_async(arguments.seconds, arguments.rounds))
    RESULTS.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    print(json.dumps(document, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
