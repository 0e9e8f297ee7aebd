"""FaultyProxy: a TCP proxy between a node and its database that can cut the link.

Test-only (``tests/cluster/test_cluster_cutoff.py``). It listens on a free loopback port
and forwards every connection to ``upstream``. Three modes:

- ``heal()`` (the start): bytes flow both ways.
- ``drop()``: every open connection is closed (both sides) and new ones are accepted
  and closed at once, as when a firewall resets the node's traffic.
- ``stall()``: connections stay open but nothing is forwarded either way; new ones are
  accepted and never connected upstream, as when packets are silently dropped. Each
  direction holds at most one read chunk while stalled (it stops reading), so the
  kernel's socket buffers fill and the sender blocks: no pile-up in the proxy.

The proxy runs its own event loop in a thread so that tests with blocking clients can
drive it; every method is called from the test's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from conveyor.tasks import Supervisor

CHUNK_BYTES = 64 * 1024
T = TypeVar("T")


class FaultyProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = "127.0.0.1"
        self.port = 0  # set by start()
        self.mode = "pass"
        self.accepted = 0  # connections accepted (tests, diagnostics)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="faulty-proxy")
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._pumps = Supervisor("faulty-proxy")

    # --- the test's side ---------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self._call(self._start())

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def drop(self) -> None:
        self._call(self._set_mode("drop"))

    def stall(self) -> None:
        self._call(self._set_mode("stall"))

    def heal(self) -> None:
        self._call(self._set_mode("pass"))

    def dsn_for(self, dsn: str) -> str:
        """``dsn`` (one host) with its host:port replaced by the proxy's."""
        scheme, _, rest = dsn.partition("://")
        userinfo, at, hostpath = rest.rpartition("@")
        _, slash, path = hostpath.partition("/")
        return f"{scheme}://{userinfo}{at}{self.host}:{self.port}{slash}{path}"

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)

    # --- the proxy's loop ------------------------------------------------------------------
    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._reset_links()
        await self._pumps.close(cancel=True)

    async def _set_mode(self, mode: str) -> None:
        assert self._flowing is not None
        self.mode = mode
        if mode == "pass":
            self._flowing.set()
            return
        self._flowing.clear()
        if mode == "drop":
            self._reset_links()

    def _reset_links(self) -> None:
        for writer in list(self._links):
            with contextlib.suppress(OSError, RuntimeError):
                writer.transport.abort()
        self._links.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == "drop":
            writer.transport.abort()
            return
        self._links.add(writer)
        assert self._flowing is not None
        await self._flowing.wait()  # stalled: the client waits for its connection
        if self.mode != "pass" or writer.transport.is_closing():
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._links.add(up_writer)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            self._pumps.start(self._pump(source, sink), name="faulty-proxy pump")

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while True:
                chunk = await source.read(CHUNK_BYTES)
                if not chunk:
                    break
                await self._flowing.wait()  # stalled: hold this chunk, read no more
                if sink.transport.is_closing():
                    break
                sink.write(chunk)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._links.discard(sink)
            sink.transport.abort()
