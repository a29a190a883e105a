"""Contract test of the InfluxDB sink's HTTP behaviour against a scripted local server.

Real InfluxDB 1.6 cannot be made to answer 429 or 413 on demand; these answers are what
the InfluxDB 1.x/2.x docs specify (Retry-After on 429/503, 413 for an oversize body).
"""

from __future__ import annotations

import asyncio
import gzip
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway.config import InfluxConfig
from gateway.dead_letter import DeadLetterStore
from gateway.durable_log import DurableLog
from gateway.metrics import GatewayMetrics, HealthState
from gateway.sink_influx import InfluxSink, InfluxWriter, Retryable


class Scripted:
    def __init__(self) -> None:
        self.requests: list[tuple[float, list[bytes], dict[str, str]]] = []
        self.answers: list[tuple[int, dict[str, str], str]] = []
        self.max_lines = 10**9
        self.bad = b"BAD"

    async def write(self, req: web.Request) -> web.Response:
        body = await req.read()  # aiohttp has already inflated a gzip body
        if body[:2] == b"\x1f\x8b":
            body = gzip.decompress(body)
        self.gzipped = req.headers.get("Content-Encoding") == "gzip"
        lines = body.rstrip(b"\n").split(b"\n")
        self.requests.append((time.monotonic(), lines, dict(req.query)))
        if self.answers:
            status, headers, text = self.answers.pop(0)
            return web.Response(status=status, headers=headers, text=text)
        if len(lines) > self.max_lines:
            return web.Response(status=413, text="Request Entity Too Large")
        if any(self.bad in ln for ln in lines):
            return web.Response(status=400, text='{"error":"partial write: unable to parse \'BAD\'"}')
        return web.Response(status=204)


@pytest.fixture
async def server() -> Scripted:  # type: ignore[misc]
    s = Scripted()
    app = web.Application()
    app.router.add_post("/write", s.write)
    app.router.add_post("/api/v2/write", s.write)
    async def query(_r: web.Request) -> web.Response:
        return web.Response(status=200, text="{}")

    app.router.add_post("/query", query)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    s.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[attr-defined,union-attr]
    yield s
    await runner.cleanup()


async def test_413_splits_and_400_isolates_the_bad_line(server: Scripted) -> None:
    server.max_lines = 3
    cfg = InfluxConfig(url=server.url, gzip=True)
    async with aiohttp.ClientSession() as session:
        w = InfluxWriter(cfg, session)
        lines = [f"m,node=n{i} v={i} {i}" for i in range(8)]
        lines[5] = "BAD line"
        rejected = await w.write(lines)
    assert [r.line for r in rejected] == ["BAD line"] and "unable to parse" in rejected[0].detail
    written = {ln for _, ls, _ in server.requests for ln in ls if len(ls) <= 3 and b"BAD" not in b"".join(ls)}
    assert written == {ln.encode() for i, ln in enumerate(lines) if i != 5}
    assert server.requests[0][2] == {"db": "twinedge", "precision": "s"} and server.gzipped


async def test_429_and_503_are_retried_honouring_retry_after(server: Scripted, tmp_path: Path) -> None:
    server.answers = [(429, {"Retry-After": "1"}, "slow down"), (503, {}, "busy")]
    cfg = InfluxConfig(url=server.url, max_backoff_s=0.5, flush_interval_s=0.01)
    log = DurableLog(tmp_path / "log", 64 * 1024 * 1024, 1024 * 1024)
    from gateway import records

    log.append([records.encode({"a": time.time(), "m": "marine", "tags": {"node": "b1"},
                                "rows": [[1764237600, {"ph": 8.1}, 1, 0]]})])
    cond = asyncio.Condition()
    metrics = GatewayMetrics("c", "i")
    sink = InfluxSink(cfg, log, cond, DeadLetterStore(tmp_path / "dl.sqlite3"), metrics, HealthState(), lambda: None)
    task = asyncio.create_task(sink.run())
    deadline = time.monotonic() + 20
    while sink.points_written < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    sink.stop()
    await task
    assert sink.points_written == 1
    t = [r[0] for r in server.requests]
    assert len(t) == 3 and t[1] - t[0] >= 1.0  # waited at least Retry-After
    assert log.cursor("influx") == log.end
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for m in metrics.registry.collect() for s in m.samples}
    assert samples[("twinedge_sink_errors_total", (("kind", "http_429"), ("sink", "influx")))] == 1.0
    assert samples[("twinedge_sink_errors_total", (("kind", "http_503"), ("sink", "influx")))] == 1.0


async def test_auth_failure_and_v2_parameters(server: Scripted) -> None:
    server.answers = [(401, {}, "unauthorized")]
    cfg = InfluxConfig(url=server.url, api="v2", org="city", bucket="b", token="s3cr3t")  # type: ignore[arg-type]
    async with aiohttp.ClientSession() as session:
        w = InfluxWriter(cfg, session)
        with pytest.raises(Retryable) as e:
            await w.write(["m v=1 1"])
        assert e.value.kind == "auth" and "s3cr3t" not in str(e.value)
        assert await w.write(["m v=1 1"]) == []
    assert server.requests[-1][2] == {"org": "city", "bucket": "b", "precision": "s"}


async def test_auto_gzip_only_off_the_host(server: Scripted) -> None:
    """gzip = "auto" (the default) sends plain text to a loopback InfluxDB and compresses to any other host."""
    async with aiohttp.ClientSession() as session:
        await InfluxWriter(InfluxConfig(url=server.url), session).write(["m,node=n v=1 1"])
    assert server.requests and not server.gzipped
    assert InfluxConfig(url="http://localhost:8086").compress is False
    assert InfluxConfig(url="http://[::1]:8086").compress is False
    assert InfluxConfig(url="https://influx.tongyeong.example:8086").compress is True
    assert InfluxConfig(url="http://10.0.0.5:8086").compress is True
    assert InfluxConfig(url="http://127.0.0.1:8086", gzip=False).compress is False
