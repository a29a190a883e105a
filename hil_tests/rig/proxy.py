"""A TCP fault proxy between a node and its broker (loopback by default).

Modes, switchable while connections are open:
  pass            forward both ways
  delay           forward, each chunk held back `delay_ms` (order kept)
  blackhole       accept and keep connections open but swallow the bytes; `direction`
                  "both", "down" (broker -> node only: publishes arrive, PUBACKs vanish)
                  or "up" (node -> broker only)
  reset           abort every connection with a TCP RST, and new ones as they come
  refuse          stop listening (connects get ECONNREFUSED) and abort open connections

The event loop runs in a daemon thread; the public methods are thread-safe.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["pass", "delay", "blackhole", "reset", "refuse"]
Direction = Literal["both", "down", "up"]


@dataclass
class ProxyStats:
    connections: int = 0
    up_bytes: int = 0  # node -> broker, forwarded
    down_bytes: int = 0  # broker -> node, forwarded
    swallowed: int = 0
    resets: int = 0
    connected_at: list[float] = field(default_factory=list)  # wall time of each accepted connection
    mode_log: list[tuple[float, str]] = field(default_factory=list)  # (wall time, mode)


class _Conn:
    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self) -> None:
        for w in (self.client, self.upstream):
            _rst(w)
        for t in self.tasks:
            t.cancel()


def _rst(w: asyncio.StreamWriter) -> None:
    sock = w.get_extra_info("socket")
    if sock is not None:
        try:
            # linger 0: close() sends RST instead of FIN, like a middlebox dropping state
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    w.transport.abort()


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", listen_host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.listen_host = listen_host
        self.port = port
        self.mode: Mode = "pass"
        self.direction: Direction = "both"
        self.delay_ms = 0
        self.stats = ProxyStats()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_Conn] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> "FaultProxy":
        self._thread.start()
        self._call(self._listen())
        self.stats.mode_log.append((time.time(), "pass"))
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: "asyncio.Future[object] | object") -> object:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        return fut.result(timeout=10)

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._on_client, self.listen_host, self.port or None,
                                                      reuse_address=True)
            self.port = self._server.sockets[0].getsockname()[1]

    async def _unlisten(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _shutdown(self) -> None:
        await self._unlisten()
        for c in list(self._conns):
            c.abort()
        self._conns.clear()

    # -- modes -------------------------------------------------------------------------
    def set(self, mode: Mode, *, delay_ms: int = 0, direction: Direction = "both") -> None:
        self._call(self._set(mode, delay_ms, direction))

    async def _set(self, mode: Mode, delay_ms: int, direction: Direction) -> None:
        self.mode, self.delay_ms, self.direction = mode, delay_ms, direction
        self.stats.mode_log.append((time.time(), mode if mode != "blackhole" else f"blackhole-{direction}"))
        if mode in ("reset", "refuse"):
            for c in list(self._conns):
                c.abort()
                self.stats.resets += 1
            self._conns.clear()
        if mode == "refuse":
            await self._unlisten()
        else:
            await self._listen()

    def passthrough(self) -> None:
        self.set("pass")

    def delay(self, ms: int) -> None:
        self.set("delay", delay_ms=ms)

    def blackhole(self, direction: Direction = "both") -> None:
        self.set("blackhole", direction=direction)

    def reset(self) -> None:
        self.set("reset")

    def refuse(self) -> None:
        self.set("refuse")

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    # -- data path ---------------------------------------------------------------------
    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connected_at.append(time.time())
        if self.mode in ("reset", "refuse"):
            self.stats.resets += 1
            _rst(writer)
            return
        try:
            ur, uw = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 5)
        except (OSError, asyncio.TimeoutError):
            _rst(writer)  # broker down: the node sees the connection die at once
            return
        self.stats.connections += 1
        conn = _Conn(writer, uw)
        self._conns.add(conn)
        conn.tasks = [asyncio.create_task(self._pump(reader, uw, conn, "up")),
                      asyncio.create_task(self._pump(ur, writer, conn, "down"))]

    def _swallow(self, way: str) -> bool:
        return self.mode == "blackhole" and self.direction in ("both", way)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, conn: _Conn, way: str) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                if self._swallow(way):
                    self.stats.swallowed += len(data)
                    continue
                if self.mode == "delay" and self.delay_ms:
                    # hold this chunk back; later chunks wait behind it, so order is kept
                    await asyncio.sleep(self.delay_ms / 1000)
                dst.write(data)
                await dst.drain()
                if way == "up":
                    self.stats.up_bytes += len(data)
                else:
                    self.stats.down_bytes += len(data)
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            return
        # one side closed: close both (a half-open MQTT link is useless)
        if conn in self._conns:
            self._conns.discard(conn)
            for w in (conn.client, conn.upstream):
                try:
                    w.close()
                except OSError:
                    pass
            for t in conn.tasks:
                if t is not asyncio.current_task():
                    t.cancel()
