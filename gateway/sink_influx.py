"""InfluxDB sink: reads the durable log from its own cursor and writes batched line protocol
(gzipped unless InfluxDB is on loopback).

Written on aiohttp rather than `influxdb-client`: that client speaks only /api/v2/write
(InfluxDB 1.x answers 404 there) and hides per-point rejections and retry timing, which
the at-least-once contract needs under our control.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from gateway import records
from gateway.config import InfluxConfig
from gateway.dead_letter import DeadLetter, DeadLetterStore
from gateway.durable_log import DurableLog
from gateway.metrics import GatewayMetrics, HealthState

log = logging.getLogger("twinedge.gateway.influx")

SINK = "influx"
_IDLE_S = 0.005  # no append for this long: the burst is over, write what is pending
# Pending log bytes per batch point from which the pending records surely hold a full batch (a line is
# ~200 bytes, its frame adds the record: ~225 bytes for a compact reading, more for JSON rows).
_FULL_BATCH_BYTES_PER_POINT = 256
_CURSOR_SAVE_S = 1.0  # the cursor file is rewritten at most this often while points flow


class Retryable(Exception):
    def __init__(self, kind: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.retry_after = retry_after


@dataclass
class Rejection:
    line: str
    detail: str


class InfluxWriter:
    """One HTTP write path for both APIs; they differ only in URL, parameters and auth."""

    def __init__(self, cfg: InfluxConfig, session: aiohttp.ClientSession) -> None:
        self.cfg = cfg
        self.session = session
        if cfg.api == "v2":
            self.url = f"{cfg.url}/api/v2/write"
            self.params = {"org": cfg.org, "bucket": cfg.bucket, "precision": "s"}
        else:
            self.url = f"{cfg.url}/write"
            self.params = {"db": cfg.database, "precision": "s"}
            if cfg.retention_policy:
                self.params["rp"] = cfg.retention_policy
            if cfg.username:
                self.params["u"] = cfg.username
                self.params["p"] = cfg.password.get_secret_value()
        self.headers = {"Content-Type": "text/plain; charset=utf-8"}
        if cfg.token.get_secret_value():
            self.headers["Authorization"] = f"Token {cfg.token.get_secret_value()}"
        if cfg.compress:
            self.headers["Content-Encoding"] = "gzip"

    async def ensure_database(self) -> None:
        if self.cfg.api != "v1" or not self.cfg.create_database:
            return
        params = {"q": f'CREATE DATABASE "{self.cfg.database}"'}
        if self.cfg.username:
            params.update(u=self.cfg.username, p=self.cfg.password.get_secret_value())
        auth = {k: v for k, v in self.headers.items() if k == "Authorization"}
        try:
            async with self.session.post(f"{self.cfg.url}/query", data=params, headers=auth,
                                         timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s)) as r:
                if r.status >= 300:
                    raise Retryable("http", f"CREATE DATABASE answered {r.status}: {(await r.text())[:120]}")
        except asyncio.TimeoutError:
            raise Retryable("timeout", f"no answer within {self.cfg.timeout_s:g} s") from None
        except aiohttp.ClientError as e:
            raise Retryable("connection", f"{type(e).__name__}: {e}") from None

    async def _post(self, body: bytes) -> tuple[int, str, float | None]:
        if self.cfg.compress:
            body = gzip.compress(body, compresslevel=1)
        try:
            async with self.session.post(
                self.url, params=self.params, data=body, headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
            ) as r:
                text = await r.text()
                ra = r.headers.get("Retry-After")
                retry_after = float(ra) if ra and ra.replace(".", "", 1).isdigit() else None
                return r.status, text, retry_after
        except asyncio.TimeoutError:
            raise Retryable("timeout", f"no answer within {self.cfg.timeout_s:g} s") from None
        except aiohttp.ClientError as e:
            raise Retryable("connection", f"{type(e).__name__}: {e}") from None

    async def write(self, lines: list[str]) -> list[Rejection]:
        """Write all lines; returns the lines InfluxDB refuses as malformed. Raises Retryable."""
        return await self.write_body(("\n".join(lines) + "\n").encode())

    async def write_body(self, body: bytes) -> list[Rejection]:
        """Write newline-terminated line protocol; returns the lines refused as malformed. Raises Retryable."""
        status, text, retry_after = await self._post(body)
        if status < 300:
            return []
        if status == 413 or status == 400:
            lines = body.rstrip(b"\n").split(b"\n")
            if len(lines) == 1:
                return [Rejection(lines[0].decode(errors="replace"), f"InfluxDB {status}: {text.strip()[:200]}")]
            # Bisect so one malformed point does not cost the rest; rewrites are idempotent.
            mid = len(lines) // 2
            first = b"\n".join(lines[:mid]) + b"\n"
            second = b"\n".join(lines[mid:]) + b"\n"
            return await self.write_body(first) + await self.write_body(second)
        if status == 429 or status >= 500:
            raise Retryable(f"http_{status}", f"InfluxDB answered {status}: {text.strip()[:120]}", retry_after)
        if status in (401, 403):
            raise Retryable("auth", f"InfluxDB refused our credentials ({status}); check influx.token/username")
        if status == 404:
            raise Retryable("not_found", f"InfluxDB answered 404 at {self.url}: wrong api or database/bucket? {text.strip()[:120]}")
        raise Retryable(f"http_{status}", f"InfluxDB answered {status}: {text.strip()[:120]}")


class InfluxSink:
    name = SINK

    def __init__(self, cfg: InfluxConfig, dlog: DurableLog, appended: asyncio.Condition,
                 dead: DeadLetterStore, metrics: GatewayMetrics, health: HealthState,
                 on_commit: Callable[[], None]) -> None:
        self.cfg = cfg
        self.log = dlog
        self.appended = appended
        self.dead = dead
        self.metrics = metrics
        self.health = health
        self.on_commit = on_commit
        self.cursor = dlog.cursor(SINK)
        self._cursor_saved = self.cursor
        self._cursor_saved_at = 0.0
        self.points_written = 0
        self.oldest_pending_at: float | None = None
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()  # stop or drain: cut the flush wait short
        self.draining = False
        self.failing_since: float | None = None

    def stop(self) -> None:
        self._stop.set()
        self._hurry.set()

    async def drain(self) -> None:
        """Shutting down: write what is in the log now instead of waiting for the flush interval."""
        self.draining = True
        self._hurry.set()
        async with self.appended:
            self.appended.notify_all()

    async def _wait_for_data(self, timeout: float) -> None:
        async with self.appended:
            try:
                await asyncio.wait_for(self.appended.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def _collect(self) -> tuple[list[bytes], int, int, float | None]:
        """Whole records from the cursor until batch_points lines: (chunks, lines, next offset, oldest receive time)."""
        chunks: list[bytes] = []
        n = 0
        offset = self.cursor
        first_at: float | None = None
        while n < self.cfg.batch_points:
            recs = self.log.read(offset, max_bytes=1024 * 1024)
            if not recs:
                break
            for next_off, blob in recs:
                if first_at is None:
                    first_at = records.frame_received_at(blob)
                lines = records.frame_lines(blob)
                chunks.append(lines)
                n += lines.count(b"\n")
                offset = next_off
                if n >= self.cfg.batch_points:
                    break
        return chunks, n, offset, first_at

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self._save_cursor()

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as session:
            writer = InfluxWriter(self.cfg, session)
            await self._retry(writer.ensure_database, "create database")
            while not self._stop.is_set():
                chunks, n, offset, first_at = self._collect()
                self.oldest_pending_at = first_at
                if not n:
                    if offset != self.cursor:  # records without rows
                        self._commit(offset)
                    self._save_cursor()  # idle: nothing to gain from saving it later
                    await self._wait_for_data(1.0)
                    continue
                if n < self.cfg.batch_points and first_at is not None and not self.draining:
                    if await self._linger(first_at + self.cfg.flush_interval_s):
                        chunks, n, offset, first_at = self._collect()
                body = b"".join(chunks)
                ok = await self._retry(lambda: self._write(writer, body, n), "write")
                if not ok:
                    return  # stopping: the batch stays in the log
                self._commit(offset)
                self.points_written += n

    async def _linger(self, until: float) -> bool:
        """Wait for a fuller batch until `until`, but no longer than the log stays idle for _IDLE_S.

        Polls the log's end instead of waking (and re-reading the pending records) on every append:
        that was quadratic with many small messages. Flushing once the flow pauses puts the last
        readings of a burst into InfluxDB within ~10 ms instead of a whole flush interval later.
        Returns whether it waited (so the batch is worth collecting again).
        """
        waited = False
        seen = self.log.durable_end
        while not self._stop.is_set() and not self._hurry.is_set():
            wait = until - time.time()
            if self.cfg.flush_when_idle:
                wait = min(wait, _IDLE_S)
            if wait <= 0:
                break
            try:
                await asyncio.wait_for(self._hurry.wait(), wait)
            except asyncio.TimeoutError:
                pass
            waited = True
            now_end = self.log.durable_end
            if (now_end == seen and self.cfg.flush_when_idle) or now_end - self.cursor >= self.cfg.batch_points * _FULL_BATCH_BYTES_PER_POINT:
                break  # the flow paused, or there is plenty for a batch
            seen = now_end
        return waited

    async def _write(self, writer: InfluxWriter, body: bytes, n: int) -> None:
        t0 = time.perf_counter()
        rejected = await writer.write_body(body)
        self.metrics.write_latency.labels(SINK).observe(time.perf_counter() - t0)
        if rejected:
            self.dead.add_many([
                DeadLetter("influx", "influx_rejected", r.detail, "influx:" + r.line.split(",", 1)[0], item={"line": r.line})
                for r in rejected
            ])
            for _ in rejected:
                self.metrics.dead_letters.labels("influx", "influx_rejected").inc()
        self.metrics.sink_points.labels(SINK).inc(n - len(rejected))

    async def _retry(self, fn: Callable[[], object], what: str) -> bool:
        attempt = 0
        while not self._stop.is_set():
            try:
                await fn()  # type: ignore[misc]
                if self.failing_since is not None:
                    log.info("influx recovered", extra={"after_s": round(time.time() - self.failing_since, 1)})
                self.failing_since = None
                self.health.set("influx", None)
                return True
            except Retryable as e:
                attempt += 1
                self.metrics.sink_errors.labels(SINK, e.kind).inc()
                if self.failing_since is None:
                    self.failing_since = time.time()
                    log.warning("influx %s failing, retrying", what, extra={"kind": e.kind, "detail": str(e)})
                if time.time() - self.failing_since > 30:
                    self.health.set("influx", f"{what} failing for {time.time() - self.failing_since:.0f} s: {e}")
                delay = min(self.cfg.max_backoff_s, 0.2 * 2 ** min(attempt, 10)) * random.uniform(0.5, 1.5)
                if e.retry_after is not None:
                    delay = max(delay, min(e.retry_after, self.cfg.max_backoff_s * 4))
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass
        return False

    def _commit(self, offset: int) -> None:
        self.cursor = offset
        if self.draining or time.monotonic() - self._cursor_saved_at >= _CURSOR_SAVE_S:
            self._save_cursor()
        self.on_commit()

    def _save_cursor(self) -> None:
        # A cursor saved late only makes a restart rewrite points InfluxDB already holds, and they
        # overwrite themselves; saving it (write, fsync, rename) after every small batch blocked the
        # loop ~9 % of the time at one reading per message.
        if self._cursor_saved != self.cursor:
            self.log.commit_cursor(SINK, self.cursor)
            self._cursor_saved = self.cursor
        self._cursor_saved_at = time.monotonic()
