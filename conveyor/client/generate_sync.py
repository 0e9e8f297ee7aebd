"""Generates ``sync.py`` (the blocking client) from ``aio.py`` (the asyncio client).

Owns: the rewrite rules, unasync-style (as httpcore builds its sync code): ``async``
and ``await`` go, the asyncio names become their blocking twins (``asyncio.Lock`` ->
``threading.Lock``, ``asyncio.sleep`` -> ``time.sleep``, ``httpx.AsyncClient`` ->
``httpx.Client``, ``AsyncIterator`` -> ``Iterator``). aio.py is the one source: edit
it, then run ``python -m conveyor.client.generate_sync``; tests/client/test_sync_generated.py
fails while sync.py is stale. Pure text in, text out; nothing is imported or run.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "aio.py"
TARGET = HERE / "sync.py"

# Whole lines that differ in words, not just in colour (docstrings, the import line).
LINES: dict[str, str] = {
    '"""``conveyor.AsyncClient``: the asyncio client over the HTTP API (httpx.AsyncClient).':
        '"""``conveyor.Client``: the blocking client over the HTTP API (httpx.Client).',
    "This module is the one source of both clients: sync.py is generated from it by":
        "GENERATED from aio.py by generate_sync.py: edit aio.py, then run",
    "generate_sync.py (run ``python -m conveyor.client.generate_sync`` after editing).":
        "``python -m conveyor.client.generate_sync``; a test fails while this file is stale.",
    "import asyncio": "import threading",
    "from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, "
    "Mapping":
        "from collections.abc import Callable, Generator, Iterable, Iterator, Mapping",
    '    """asyncio Conveyor client; one per event loop."""':
        '    """Blocking Conveyor client. Thread-safe for concurrent calls (httpx pools)."""',
}

# Blocks that have a shorter blocking form, or one of the blocking client's own: its
# plain-HTTP calls skip httpx's request and response objects (transport.PlainSender).
BLOCKS: dict[str, str] = {
    "        self._reply_queue: str | None = None\n":
        "        self._plain = transports.plain_sender(self._http)  # None: httpx sends all\n"
        "        self._reply_queue: str | None = None\n",
    '        """One exchange: the answer\'s status, Retry-After and body."""\n':
        '        """One exchange: the answer\'s status, Retry-After and body."""\n'
        "        answer = self._plain.exchange(call, content, headers, timeouts) "
        "if self._plain else None\n"
        "        if answer is not None:  # a plain-HTTP call sent without httpx's objects\n"
        "            return answer\n",
    "            async for message in inner:\n                yield message\n":
        "            yield from inner\n",
}

# Token rewrites, applied in order with word boundaries.
TOKENS: list[tuple[str, str]] = [
    (r"\bAsyncMessage\b", "Message"),
    (r"\bAsyncClient\b", "Client"),
    (r"\bhttpx\.AsyncBaseTransport\b", "httpx.BaseTransport"),
    (r"\bdefault_async_transport\b", "default_transport"),
    (r"\bAsyncGenerator\[(\w+), None\]", r"Generator[\1, None, None]"),
    (r"\bAsyncGenerator\b", "Generator"),
    (r"\bAsyncIterator\b", "Iterator"),
    (r"\bAwaitable\[(\w+)\]", r"\1"),
    (r"\basyncio\.Lock\b", "threading.Lock"),
    (r"\basyncio\.Event\b", "threading.Event"),
    (r"\basyncio\.sleep\b", "time.sleep"),
    (r"\b__aenter__\b", "__enter__"),
    (r"\b__aexit__\b", "__exit__"),
    (r"\.aclose\(\)", ".close()"),
    (r"\basync def\b", "def"),
    (r"\basync for\b", "for"),
    (r"\basync with\b", "with"),
    (r"\(await ([^()]*(?:\([^()]*\))?)\)", r"\1"),
    (r"\bawait ", ""),
]
_COMPILED = [(re.compile(pattern), replacement) for pattern, replacement in TOKENS]


def generate(source: str) -> str:
    """The blocking client's source for the asyncio client's ``source``."""
    for block, replacement in BLOCKS.items():
        source = source.replace(block, replacement)
    output = []
    for line in source.splitlines():
        if line in LINES:
            output.append(LINES[line])
            continue
        for pattern, replacement in _COMPILED:
            line = pattern.sub(replacement, line)
        output.append(line)
    return "\n".join(output) + "\n"


def main() -> int:
    TARGET.write_text(generate(SOURCE.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
