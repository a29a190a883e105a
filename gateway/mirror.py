"""Partner mirroring: a policy-filtered, acknowledged, reconcilable copy of our city's data for the partner.

Stages (see docs/mirroring.md):

    durable log --own cursor--> MirrorSink (policy filter + transforms + aggregation)
        --> archive (SQLite, one transaction per batch) --> Sender --MQTT/TLS, QoS 1-->
        partner broker `mirror/<partner>/<us>/batch` --> partner's Receiver --> partner InfluxDB
        <-- app-level ack `mirror/<partner>/<us>/ack` (per batch)
    Sender <--> partner's Receiver: reconciliation `recon` / `recon_reply` (count + hash per node per hour);
        mismatching hours are replayed from the archive.
    our broker `mirror/<us>/+/batch` --> our Receiver --> our InfluxDB (partner database, tag origin)

The mirror sink has its own log cursor: a partner outage fills the archive (then the log),
never blocks InfluxDB; an InfluxDB outage never blocks mirroring. The receiver writes
partner data straight to InfluxDB, never into our durable log, and the sink only mirrors
records whose city is ours: two cities mirroring each other cannot loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import struct
import time
import zlib
from collections import OrderedDict
from array import array
from bisect import bisect_left
from collections.abc import Awaitable, Sequence
from itertools import chain
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import aiohttp
import numpy as np
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from gateway import records
from gateway.config import ConfigError, InfluxConfig
from gateway.dead_letter import DeadLetter
from gateway.mirror_archive import ACKED, REJECTED, Archive
from gateway.mirror_link import LinkMessage, MqttLink
from gateway.mirror_policy import POINT_TAGS, Policy, PolicyError, ShareRule, finite, load_policy
from gateway.mirror_wire import (DIGEST_VERSION, Point, Segment, Spec, WireError, check_manifest, decode_body,
                                 digest_points, encode_segments, fast_columns, float_columns, make_segment, segment_head,
                                 segments_from_points, split_batch, strictly_increasing)
from gateway.decode import accepted_compact_readings
from gateway.schema import HEADER_TAIL
from gateway.schema import MAGIC as MAGIC_COMPACT
from gateway.schema import NAME_RE, SCHEMAS_BY_DOMAIN, Schema
from gateway.sink_influx import InfluxWriter, Retryable

if TYPE_CHECKING:
    from gateway.service import Gateway, Sink

log = logging.getLogger("twinedge.gateway.mirror")

TOPIC_ROOT = "mirror"
_SKIP = object()
INFLUX_TAGS = set(POINT_TAGS) | {"origin"}
_T = itemgetter(0)
_FIELDS = itemgetter(1)
_SEQ = itemgetter(2)
# Bytes the durable log puts before each record (u32 length, u32 crc32; gateway/durable_log.py).
LOG_FRAME_OVERHEAD = 8


def topic(dest: str, origin: str, kind: str) -> str:
    """All mirror traffic lives under the receiving city's `mirror/<dest>/#` (the partner account's ACL)."""
    return f"{TOPIC_ROOT}/{dest}/{origin}/{kind}"


# -- configuration ---------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class PartnerBroker(_Strict):
    host: str = Field(..., description="the partner city's broker")
    port: int = Field(8883, ge=1, le=65535)
    username: str = Field("", description="partner-issued account, e.g. partner-<our city>")
    password: SecretStr = SecretStr("")
    tls_ca: Path | None = Field(None, description="the partner city's CA certificate; required unless insecure = true")
    insecure: bool = Field(False, description="allow a plain-TCP link (tests and labs only)")
    client_id: str = ""
    keepalive_s: int = Field(30, ge=5, le=3600)

    @model_validator(mode="after")
    def _tls(self) -> "PartnerBroker":
        if self.tls_ca is None and not self.insecure:
            raise ValueError("tls_ca is required (the partner's CA certificate); set insecure = true only in a lab")
        return self


class Inbound(_Strict):
    enabled: bool = Field(True, description="receive the partner's batches on our own broker")
    host: str = Field("", description="default: the gateway's [mqtt] host")
    port: int = Field(0, ge=0, le=65535, description="default: the gateway's [mqtt] port")
    username: str = ""
    password: SecretStr = SecretStr("")
    tls_ca: Path | None = None
    database: str = Field("twinedge_partner", description="InfluxDB database (v1) for partner data")
    bucket: str = Field("", description="InfluxDB bucket (v2) for partner data; default: database")
    write_batch_points: int = Field(20000, ge=100)


class MirrorConfig(_Strict):
    partner: str
    policy: Path
    partner_broker: PartnerBroker
    inbound: Inbound = Field(default_factory=lambda: Inbound.model_validate({}))
    # 20,000 points ~ 100 KB on the wire: per-batch and per-series costs (commit, fsync, headers, digest
    # updates) are then spread over 4x more points than at 5,000 (bench/mirror_bench.py).
    batch_max_points: int = Field(20_000, ge=1, le=100_000)
    batch_max_age_s: float = Field(1.0, gt=0, le=600)
    max_inflight_batches: int = Field(16, ge=1, le=1000)
    ack_timeout_s: float = Field(20.0, gt=0)
    archive_max_pending_bytes: int = Field(512 * 1024**2, ge=1024 * 1024,
                                           description="unacknowledged archive bound; beyond it the sink stops reading the log")
    retention_h: int = Field(48, ge=1, description="acknowledged batches kept for replay")
    reconcile_interval_s: float = Field(300.0, gt=0)
    reconcile_window_h: int = Field(24, ge=1)
    reconcile_settle_s: float = Field(120.0, ge=0, description="compare an hour this long after it ends")
    agg_grace_s: float = Field(60.0, ge=0, description="emit an aggregation bin this long after it ends")

    @model_validator(mode="after")
    def _names(self) -> "MirrorConfig":
        if not NAME_RE.match(self.partner):
            raise ValueError("partner: use the partner city's name (lowercase letters, digits, '-')")
        if self.reconcile_window_h > self.retention_h:
            raise ValueError("reconcile_window_h must not exceed retention_h (replay needs the archive)")
        return self


def validate_mirror_config(data: dict[str, Any], city: str | None = None) -> MirrorConfig:
    """Validate the `[mirror]` section (and the policy file it names). Raises ConfigError, one line per problem."""
    try:
        cfg = MirrorConfig.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = "mirror." + ".".join(str(p) for p in err["loc"]) if err["loc"] else "mirror"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "missing":
                msg = "is required but missing (see docs/mirroring.md)"
            elif err["type"] == "extra_forbidden":
                msg = "is not a known mirror setting (see docs/mirroring.md)"
            problems.append(f"{loc}: {msg}")
        raise ConfigError(problems) from None
    try:
        policy = load_policy(cfg.policy)
        if city is not None:
            other = policy.partner_of(city)
            if other != cfg.partner:
                raise PolicyError([f"{cfg.policy}: policy partners {city} with {other}, but mirror.partner = {cfg.partner!r}"])
    except PolicyError as e:
        raise ConfigError([f"mirror.policy: {p}" for p in e.problems]) from None
    return cfg


# -- metrics ----------------------------------------------------------------------------------

class MirrorMetrics:
    def __init__(self, gw: "Gateway") -> None:
        r = gw.metrics.registry
        self.points = Counter("twinedge_mirror_points", "Mirrored points", ["direction"], registry=r)
        self.bytes = Counter("twinedge_mirror_bytes", "Mirror batch bytes (compressed, with manifest)", ["direction"], registry=r)
        self.batches = Counter("twinedge_mirror_batches", "Mirror batches by result", ["direction", "result"], registry=r)
        self.filtered = Counter("twinedge_mirror_filtered", "Log records or rows not mirrored, by reason", ["reason"], registry=r)
        self.lag = Gauge("twinedge_mirror_lag_seconds", "Age of the oldest record not yet acknowledged by the partner", registry=r)
        self.pending = Gauge("twinedge_mirror_pending_batches", "Batches not yet acknowledged by the partner", registry=r)
        self.pending_bytes = Gauge("twinedge_mirror_pending_bytes", "Bytes of batches not yet acknowledged", registry=r)
        self.completeness = Gauge("twinedge_mirror_completeness",
                                  "Share of what we sent that the partner holds (last reconciliation, 0..1)", registry=r)
        self.compared_points = Gauge("twinedge_mirror_compared_points", "Points covered by the last reconciliation", registry=r)
        self.replayed = Counter("twinedge_mirror_replayed_points", "Points replayed after reconciliation found a gap", registry=r)
        self.recon_rounds = Counter("twinedge_mirror_reconciliations", "Reconciliation rounds answered", registry=r)
        self.link_up = Gauge("twinedge_mirror_link_connected", "1 while the mirror link is connected", ["link"], registry=r)
        self.completeness.set(math.nan)


# -- sending side: policy filter, transforms, aggregation, archive -------------------------------

class MirrorSink:
    """Reads the durable log from its own cursor and turns it into archived batches for the partner."""

    def __init__(self, gw: "Gateway", cfg: MirrorConfig, policy: Policy, archive: Archive, metrics: MirrorMetrics,
                 batch_ready: asyncio.Event) -> None:
        self.gw = gw
        self.cfg = cfg
        self.policy = policy
        self.archive = archive
        self.metrics = metrics
        self.batch_ready = batch_ready
        self.city = gw.cfg.city
        self.name = f"mirror-{cfg.partner}"
        self.partner_lag_s = 0.0
        self.cursor = max(gw.log.cursor(self.name), archive.applied_offset())
        self.oldest_pending_at: float | None = None
        self._stop = asyncio.Event()
        self._tokens = policy.max_points_per_s
        self._tokens_at = time.monotonic()
        # (m, node, bin) -> [tags, {field: [n, sum, max, min]}, dirty]
        self._bins: dict[tuple[str, str, int], list[Any]] = {}
        self._plans: dict[str, Plan] = {}
        self._routes: dict[tuple[Any, ...], str | _Route] = {}
        self._cursor_saved_at = 0.0
        self._filtered: dict[str, Any] = {}
        self.feed: RecordFeed | None = None
        self._under_bound = False
        for m, node, b, tags, state in archive.agg_dirty():
            self._bins[(m, node, b)] = [tags, state, True]

    def lag_seconds(self) -> float:
        """Age of the oldest record the partner has not acknowledged (not just what our cursor passed)."""
        return self.partner_lag_s

    def stop(self) -> None:
        self._stop.set()

    # -- transforms ---------------------------------------------------------------------
    def _route(self, m: str, tags: dict[str, Any]) -> "str | _Route":
        """Where a record of this measurement and tag set goes: a reason it is not mirrored, or its route."""
        rule = self.policy.rule(m)
        if rule is None:
            return "measurement"
        if tags.get("city") != self.city:
            # Never mirror what is not ours: this is what makes two mirroring cities loop-free.
            return "not_our_city"
        dom = tags.get("domain")
        if dom and dom not in rule.domains:
            return "domain"
        node = str(tags.get("node", ""))
        if not rule.node_ok(node):
            return "node"
        out_tags = {k: str(tags[k]) for k in ("city", "domain", "node") if tags.get(k)}
        site = rule.site_value(str(tags.get("site", "")))
        if site:
            out_tags["site"] = site
        plan = self._plan(rule)
        return _Route(rule, plan, out_tags, (m, tuple(out_tags.items())), node, segment_head(m, out_tags, plan.names))

    def route_for(self, m: str, tags: dict[str, Any]) -> "str | _Route":
        """_route(), cached per measurement and tag set."""
        ck = (m, tuple(tags.items()))
        route = self._routes.get(ck)
        if route is None:
            if len(self._routes) >= 100_000:
                self._routes.clear()
            route = self._routes[ck] = self._route(m, tags)
        return route

    def _count_filtered(self, reason: str) -> None:
        child = self._filtered.get(reason)
        if child is None:
            child = self._filtered[reason] = self.metrics.filtered.labels(reason)
        child.inc()

    def _read(self, offset: int) -> list[tuple[int, bytes | None]]:
        """Log frames from `offset`: (offset after it, the frame, or None where RecordFeed holds the record
        and the log has made it durable: then the frame is not read back from the log)."""
        if self.feed is not None:
            ends = self.feed.chain(offset, self.gw.log.durable_end, 4096)
            if ends:
                return [(end, None) for end in ends]
        return self.gw.log.read(offset, max_bytes=1024 * 1024)  # type: ignore[return-value]

    def take(self, start: int, end: int, blob: bytes | None, buf: dict[tuple[Any, ...], "_Pending"]) -> int:
        """The log frame from `start` to `end` into `buf`: as RecordFeed handed it over when it did, else
        decoded. Returns the number of rows taken."""
        got = self.feed.take(start) if self.feed is not None else None
        if got is not None and (got[4] != end or (blob is not None and got[0] != records.frame_received_at(blob))):
            got = None
        if got is None:
            if blob is None:
                blob = self.gw.log.read(start, max_bytes=1)[0][1]
            return self.transform(records.decode(blob), buf)
        _a, rec, route, raw, _end = got
        if rec is not None:
            return self.transform(rec, buf)
        if raw is None:
            assert isinstance(route, str)
            self._count_filtered(route)
            return 0
        assert isinstance(route, _Route)
        return self._take_raw(route, raw, buf)

    def transform(self, rec: dict[str, Any], buf: dict[tuple[Any, ...], "_Pending"]) -> int:
        """Policy filter of one log record; its rows go to `buf` (per series and hour) as references and are
        turned into columns once per flush (Plan.segments). Returns the number of rows taken."""
        m = rec.get("m", "")
        route = self.route_for(m, rec.get("tags", {}))
        if isinstance(route, str):
            self._count_filtered(route)
            return 0
        rows = rec["rows"]
        if route.rule.aggregate_minutes:
            self._aggregate(route.rule, m, route.node, route.tags, rows)
            return 0
        return self._take_rows(route, rows, buf)

    def _take_rows(self, route: _Route, rows: list[Any], buf: dict[tuple[Any, ...], "_Pending"]) -> int:
        if not rows:
            return 0
        try:
            ts = array("q", map(_T, rows))  # TypeError: a time that is not an integer (row by row below)
        except (TypeError, OverflowError):
            ts = None
        if ts is not None and strictly_increasing(ts):
            # The usual record: in order, one hour (else one run per hour). Its shared values are taken now,
            # while ingest's row objects are still in the CPU cache (at flush time they are not: ~3x slower).
            i, n = 0, len(ts)
            while i < n:
                hour = ts[i] - ts[i] % 3600
                j = n if ts[-1] < hour + 3600 else bisect_left(ts, hour + 3600, i)
                self._take_run(route, rows if j - i == n else rows[i:j], ts if j - i == n else ts[i:j], hour, buf)
                i = j
            return n
        for row in rows:  # times out of order or not integers (rare): row by row
            t = int(row[0])
            key = (route.series, t - t % 3600)
            pend = buf.get(key)
            if pend is None:
                pend = buf[key] = _Pending(route, t - t % 3600)
            elif t <= pend.last_t:
                pend.ordered = False
            pend.last_t = t
            pend.unflatten()
            pend.ts.append(t)
            pend.seqs.append(row[2])
            pend.recs.append([row])
        return len(rows)

    def _take_run(self, route: _Route, rows: list[Any], ts: array, hour: int, buf: dict[tuple[Any, ...], "_Pending"]) -> None:
        """Rows of one hour, times strictly increasing."""
        key = (route.series, hour)
        pend = buf.get(key)
        if pend is None:
            pend = buf[key] = _Pending(route, hour)
        elif ts[0] <= pend.last_t:
            pend.ordered = False
        pend.last_t = ts[-1]
        pend.materialize()  # a record without its payload's place: values from the rows from now on
        if pend.flat is not None and route.plan.flat_values(rows, pend.flat) is None:
            pend.unflatten()  # this record is not all floats: keep rows from now on
        if pend.flat is None:
            pend.recs.append(rows)
        # (while the values are kept as floats the rows are not: ingest's objects go right away)
        pend.ts.extend(ts)
        pend.seqs.extend(map(_SEQ, rows))

    def _take_raw(self, route: _Route, runs: "tuple[RawReadings, ...]", buf: dict[tuple[Any, ...], "_Pending"]) -> int:
        if len(runs) == 1:
            return self._take_raw_run(route, runs[0], buf)
        return sum(self._take_raw_run(route, raw, buf) for raw in runs)

    def _take_raw_run(self, route: _Route, raw: "RawReadings", buf: dict[tuple[Any, ...], "_Pending"]) -> int:
        """One hour's run of a record's readings (every shared value present: RecordFeed.put checked) from
        its compact payload: sequence numbers now, the readings' bytes kept for one vectorised decode per
        flush (Plan.segments). Ingest's rows are never visited."""
        payload, head, n, t0, seq0, first, last = raw
        hour = first - first % 3600
        key = (route.series, hour)
        pend = buf.get(key)
        if pend is None:
            pend = buf[key] = _Pending(route, hour)
        layout = route.plan.raw
        assert layout is not None
        end = head + n * layout.size
        if pend.raw is None and pend.flat is None:
            # This series and hour already holds rows (values that are not all floats; rare): rows too.
            return self._take_rows(route, layout.rows(payload[head:end], t0, seq0), buf)
        if first <= pend.last_t:
            pend.ordered = False  # (times out of order inside the record: found at flush, strictly_increasing)
        pend.last_t = last
        if pend.raw is not None:
            pend.raw.append(payload[head:end])
            pend.raw_t0.append(t0)
            pend.raw_n.append(n)
            pend.raw_seq0.append(seq0)  # (sequence numbers too are made at flush: usually one range)
        else:  # float columns already (a record came without its payload): decoded into them now
            assert pend.flat is not None
            ts, cols = layout.columns(payload[head:end], [t0], [n])
            pend.ts.frombytes(ts.tobytes())
            for arr, col in zip(pend.flat, cols):
                arr.frombytes(col.tobytes())
            pend.seqs.extend(range(seq0, seq0 + n))
        return n

    def _raw_checked(self, route: "_Route", raw: tuple[bytes, int, int, int, int, int],
                     rows: list[Any] | None) -> "tuple[RawReadings, ...] | None":
        """RecordFeed.put(): the record's place in its compact payload, one run per hour, if the sink can take
        it from there (every reading of the payload, every shared value present, times in order when they
        span hours), else None. `rows` None: ingest says the record is every reading of the payload."""
        layout = route.plan.raw
        if layout is None or route.rule.aggregate_minutes:
            return None
        payload, head, n, t0, seq0, schema_id = raw
        size = layout.size
        end = head + n * size
        if schema_id != layout.schema_id or (rows is not None and n != len(rows)) or len(payload) < end:
            return None
        dts = layout.dts(n).unpack_from(payload, head)
        first, last = t0 + dts[0], t0 + dts[-1]
        if rows is not None and (rows[0][0] != first or rows[-1][0] != last):
            return None  # not the record's readings
        if payload[head + 3 : end : size].translate(None, layout.full_masks):
            return None  # a shared value absent (mask bit clear)
        hour = first - first % 3600
        if t0 + max(dts) < hour + 3600 and t0 + min(dts) >= hour:
            return ((payload, head, n, t0, seq0, first, last),)
        if not strictly_increasing(dts):
            return None
        runs = []
        i = 0
        while i < n:  # one run per hour
            t = t0 + dts[i]
            j = bisect_left(dts, t - t % 3600 + 3600 - t0, i)
            runs.append((payload, head + i * size, j - i, t0, seq0 + i, t, t0 + dts[j - 1]))
            i = j
        return tuple(runs)

    def _plan(self, rule: ShareRule) -> "Plan":
        plan = self._plans.get(rule.measurement)
        if plan is None:
            plan = self._plans[rule.measurement] = Plan(rule)
        return plan

    def spec_for(self, m: str) -> Spec | None:
        rule = self.policy.rule(m)
        return None if rule is None else self._plan(rule).spec

    def _aggregate(self, rule: ShareRule, m: str, node: str, tags: dict[str, str], rows: list[Any]) -> None:
        width = rule.aggregate_minutes * 60
        for t, fields, _seq, _flags in rows:
            b = int(t) - int(t) % width
            key = (m, node, b)
            slot = self._bins.get(key)
            if slot is None:
                loaded = self.archive.agg_load(m, node, b)
                slot = [tags, loaded[1] if loaded else {}, True]
                self._bins[key] = slot
            slot[0] = tags
            slot[2] = True
            state = slot[1]
            for k, v in fields.items():
                if k not in rule.fields or v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not finite(v):
                    continue
                st = state.get(k)
                if st is None:
                    state[k] = [1, v, v, v]
                else:
                    st[0] += 1
                    st[1] += v
                    st[2] = max(st[2], v)
                    st[3] = min(st[3], v)

    def _closed_bins(self, now: float) -> tuple[list[Point], list[tuple[str, str, int, str, str, int]]]:
        """Emit every dirty bin that has closed; persist all dirty bins' state."""
        points: list[Point] = []
        rows: list[tuple[str, str, int, str, str, int]] = []
        done = []
        for (m, node, b), (tags, state, dirty) in self._bins.items():
            if not dirty:
                continue
            rule = self.policy.rule(m)
            width = (rule.aggregate_minutes if rule else 1) * 60
            closed = b + width + self.cfg.agg_grace_s <= now
            if closed and rule is not None and state:
                f: dict[str, Any] = {}
                for k, (n, s, mx, mn) in state.items():
                    fr = rule.fields[k]
                    for stat in rule.stats:
                        if stat == "count":
                            f[f"{k}_count"] = int(n)
                        elif stat == "mean":
                            f[f"{k}_mean"] = fr.apply(float(s) / n)
                        elif stat == "max":
                            f[f"{k}_max"] = fr.apply(mx)
                        else:
                            f[f"{k}_min"] = fr.apply(mn)
                points.append(Point(m, dict(tags), b, f, None))
            rows.append((m, node, b, json.dumps(tags), json.dumps(state), 0 if closed else 1))
            if closed:
                done.append((m, node, b))
        for k in done:
            del self._bins[k]  # reloaded from the archive if a late reading arrives
        return points, rows

    # -- loop ----------------------------------------------------------------------------
    async def _wait(self, timeout: float) -> None:
        cond = self.gw.appended
        assert cond is not None
        async with cond:
            try:
                await asyncio.wait_for(cond.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def _over_bound(self) -> bool:
        # Pending bytes grow only when a batch is committed (_flush, replay_batch, which clear the flag);
        # until then a "no" stays true, and the archive is not asked on every loop.
        if self._under_bound:
            return False
        _n, nbytes, _a = self.archive.pending_stats()
        self._under_bound = nbytes < self.cfg.archive_max_pending_bytes
        return not self._under_bound

    def _feed_a(self, start: int) -> float:
        a = self.feed.received_at(start) if self.feed is not None else None
        return a if a is not None else time.time()

    async def run(self) -> None:
        buf: dict[tuple[Any, ...], _Pending] = {}
        npoints = 0
        first_a: float | None = None
        first_seen = 0.0
        offset = self.cursor
        applied = self.archive.applied_offset()
        last_bins = 0.0
        while not self._stop.is_set():
            if self._over_bound():
                self.gw.health.set("mirror_archive", "mirror archive holds the bound of unacknowledged batches; "
                                   "the partner link is down or slow (the durable log keeps the rest)")
                await self._wait(1.0)
                continue
            self.gw.health.set("mirror_archive", None)
            recs = self._read(offset)
            for next_off, blob in recs:
                if next_off > applied:
                    if first_a is None:
                        first_a = records.frame_received_at(blob) if blob is not None else self._feed_a(offset)
                        first_seen = time.monotonic()
                    npoints += self.take(offset, next_off, blob, buf)
                offset = next_off
                if npoints >= self.cfg.batch_max_points:
                    break
            now = time.time()
            self.oldest_pending_at = first_a
            # Age in the sink, not since receipt: behind a backlog every record is already old, and
            # batching by receipt age would flush after every read (many small batches).
            age = time.monotonic() - first_seen if first_a is not None else 0.0
            bins_due = any(s[2] for s in self._bins.values()) and now - last_bins >= 1.0
            # A batch goes when it is full or its oldest record is batch_max_age_s old (not each time the
            # sink catches up with ingest: many small batches cost a commit, fsyncs and a message each).
            if npoints >= self.cfg.batch_max_points or (first_a is not None and age >= self.cfg.batch_max_age_s) \
                    or (not recs and (bins_due or (first_a is None and offset != self.cursor))):
                last_bins = now
                agg_points, agg_rows = self._closed_bins(now)
                segs = _segments(buf)
                segs += segments_from_points(agg_points, self.spec_for)
                await self._flush(segs, first_a or now, offset, agg_rows)
                applied = offset
                buf, npoints, first_a = {}, 0, None
                continue
            if not recs:
                await self._wait(min(1.0, max(0.02, self.cfg.batch_max_age_s - age)) if first_a else 1.0)

    async def _flush(self, segments: list[Segment], first_a: float, offset: int,
                     agg_rows: list[tuple[str, str, int, str, str, int]]) -> None:
        chunks = _chunks(segments, self.cfg.batch_max_points) or [[]]
        for i, chunk in enumerate(chunks):
            n = sum(len(s.ts) for s in chunk)
            await self._take_tokens(n)
            last = i == len(chunks) - 1
            msg = None
            batch_id = None
            if chunk:
                batch_id = self.archive.next_id()
                msg, _manifest = encode_segments(self._manifest_base(batch_id, False), chunk)
            self.archive.commit_batch(batch_id, msg, chunk, first_a, False,
                                      offset if last else None, agg_rows if last else [])
            self._under_bound = False
            if chunk:
                self.batch_ready.set()
        self.cursor = offset
        now = time.monotonic()
        if now - self._cursor_saved_at >= 2.0:
            # The archive's applied offset (committed with the batch above) is what a restart resumes from;
            # the log's cursor file may lag a little (it only keeps log segments longer), so it is not
            # written and fsynced after every batch.
            self.gw.log.commit_cursor(self.name, offset)
            self._cursor_saved_at = now
        self.gw._release()

    async def _take_tokens(self, n: int) -> None:
        """Rate cap of the policy: pace batches; nothing is dropped, the backlog waits in the log."""
        rate = self.policy.max_points_per_s
        while True:
            now = time.monotonic()
            self._tokens = min(max(rate, float(self.cfg.batch_max_points)), self._tokens + (now - self._tokens_at) * rate)
            self._tokens_at = now
            if self._tokens >= n or n == 0:
                self._tokens -= n
                return
            await asyncio.sleep(min(1.0, (n - self._tokens) / rate))

    def _manifest_base(self, batch_id: int, replay: bool) -> dict[str, Any]:
        return {"origin": self.city, "dest": self.cfg.partner, "policy": self.policy.policy,
                "policy_version": self.policy.version, "batch": self.archive.bid(batch_id),
                "created": round(time.time(), 3), "replay": replay}

    def replay_batch(self, points: list[Point]) -> int:
        batch_id = self.archive.next_id()
        segs = segments_from_points(points, self.spec_for)
        msg, _ = encode_segments(self._manifest_base(batch_id, True), segs)
        self.archive.commit_batch(batch_id, msg, segs, time.time(), True, None, [])
        self._under_bound = False
        self.batch_ready.set()
        return batch_id


def _segments(buf: dict[tuple[Any, ...], _Pending]) -> list[Segment]:
    by_plan: dict[int, tuple[Plan, list[_Pending]]] = {}
    for pend in buf.values():
        by_plan.setdefault(id(pend.route.plan), (pend.route.plan, []))[1].append(pend)
    return [seg for plan, pends in by_plan.values() for seg in plan.segments(pends)]


def _chunks(segments: list[Segment], max_points: int) -> list[list[Segment]]:
    """Split into batches of at most max_points points (slicing a segment where needed)."""
    out: list[list[Segment]] = []
    cur: list[Segment] = []
    room = max_points
    for seg in segments:
        while seg.ts:
            if len(seg.ts) <= room:
                cur.append(seg)
                room -= len(seg.ts)
                break
            k = room
            head, seg = seg.slice(0, k), seg.slice(k, len(seg.ts))
            cur.append(head)
            out.append(cur)
            cur, room = [], max_points
        if room == 0:
            out.append(cur)
            cur, room = [], max_points
    if cur:
        out.append(cur)
    return out


class _Route(NamedTuple):
    """A mirrored series: its rule and plan, the tags it is sent with, and its node."""
    rule: ShareRule
    plan: "Plan"
    tags: dict[str, str]
    series: tuple[Any, ...]
    node: str
    head: str


class _Pending:
    """Rows of one series and hour taken from log records since the last flush: times, sequence numbers,
    and the values, in the cheapest form that holds them all: the readings' bytes in their compact payloads
    (`raw`, while every record came with its payload's place), else (while every shared value is a float)
    the shared values column by column (`flat`), else references to the rows (`recs`)."""

    __slots__ = ("route", "hour", "ts", "seqs", "recs", "flat", "raw", "raw_t0", "raw_n", "raw_seq0", "last_t", "ordered")

    def __init__(self, route: _Route, hour: int) -> None:
        self.route = route
        self.hour = hour
        self.ts = array("q")
        self.seqs: list[Any] = []
        self.recs: list[list[Any]] = []  # the records' row lists
        self.flat: list[array] | None = [array("d") for _ in route.plan.names] if route.plan.getter is not None else None
        # Raw mode: the readings' bytes, and per record t0 and count (times are t0 + dt, made at flush).
        self.raw: list[bytes] | None = [] if route.plan.raw is not None else None
        self.raw_t0: list[int] = []
        self.raw_n: list[int] = []
        self.raw_seq0: list[int] = []
        self.last_t = -(2**63)
        self.ordered = True

    def materialize(self) -> None:
        """Switch from payload bytes to float columns (a record came without its payload's place)."""
        if self.raw is None:
            return
        raw, self.raw = self.raw, None
        if raw:
            layout = self.route.plan.raw
            assert layout is not None and self.flat is not None and not self.ts
            ts, cols = layout.columns(b"".join(raw), self.raw_t0, self.raw_n)
            self.ts.frombytes(ts.tobytes())
            assert not self.seqs
            self.seqs = list(self.raw_seqs())
            for arr, col in zip(self.flat, cols):
                arr.frombytes(col.tobytes())

    def raw_seqs(self) -> Sequence[int]:
        """Sequence numbers of the raw runs: one range when they follow each other (the usual case)."""
        q0, ns = self.raw_seq0, self.raw_n
        if all(a + n == b for a, n, b in zip(q0, ns, q0[1:])):
            return range(q0[0], q0[0] + sum(ns)) if q0 else range(0)
        return list(chain.from_iterable(range(a, a + n) for a, n in zip(q0, ns)))

    def unflatten(self) -> None:
        """Switch to keeping rows: the points so far become rows of their (shared) float values."""
        self.materialize()
        if self.flat is None:
            return
        n = len(self.ts)
        names = self.route.plan.names
        cols = [c[:n] for c in self.flat]
        self.recs = [[[t, dict(zip(names, vals)), q, 0] for t, q, vals in zip(self.ts, self.seqs, zip(*cols))]]
        self.flat = None

    @property
    def rows(self) -> list[Any]:
        self.materialize()
        if self.flat is not None:
            names = self.route.plan.names
            return [[t, dict(zip(names, vals)), q, 0] for t, q, vals in zip(self.ts, self.seqs, zip(*self.flat))]
        return list(chain.from_iterable(self.recs))


class Plan:
    """Per shared measurement: output field order and decimals, value steps, and the column fast path."""

    def __init__(self, rule: ShareRule) -> None:
        self.rule = rule
        self.spec: Spec = rule.canon_spec()
        self.names = [k for k, _d in self.spec]
        # Per field: None = keep as is, int = round to N decimals, the rule itself otherwise.
        self.steps: dict[str, Any] = {
            k: None if fr.round is None and fr.quantum is None else (fr.round if fr.quantum is None else fr)
            for k, fr in rule.fields.items()}
        fast = (not rule.aggregate_minutes and len(self.names) >= 1
                and all(k in self.steps and (self.steps[k] is None or type(self.steps[k]) is int) for k in self.names))
        self.getter: Any = itemgetter(*self.names) if fast else None
        self.getters = [itemgetter(k) for k in self.names]
        schema = SCHEMAS_BY_DOMAIN.get(rule.measurement)
        # Values straight from compact payloads: only where each shared field is a non-integer field of the
        # measurement's schema (ingest's value is then exactly raw / scale, a float).
        self.raw = _RawLayout(schema, self.names) if fast and schema is not None and all(
            (f := schema.field(k)) is not None and not f.integer for k in self.names) else None

    def flat_values(self, rows: list[Any], flat: list[array]) -> list[array] | None:
        """`flat` (a float64 array per field) extended by the rows' shared values when all are floats, else
        None. Column by column: no per-row tuple, so no extra work for the garbage collector."""
        dicts = list(map(_FIELDS, rows))
        try:
            for get, arr in zip(self.getters, flat):
                col = list(map(get, dicts))
                if set(map(type, col)) != {float}:
                    return None
                arr.extend(col)
        except (KeyError, TypeError, IndexError):
            return None
        return flat

    def segments(self, pends: list[_Pending]) -> list[Segment]:
        """The pending series' segments. Series whose shared values are all floats: one vectorised pass per
        field over all of them (mirror_wire.float_columns), then the columns are sliced per series. Others:
        per field and series when each column holds one number type (mirror_wire.fast_columns), else value
        by value through the field rules."""
        out: list[Segment] = []
        raw: list[_Pending] = []
        sections: list[bytes] = []
        t0s: list[int] = []
        ns: list[int] = []
        flat: list[_Pending] = []
        bufs: list[list[array]] = [[] for _ in self.names]
        rest: list[_Pending] = []
        for p in pends:
            if p.raw and self.raw is not None:
                raw.append(p)
                sections += p.raw
                t0s += p.raw_t0
                ns += p.raw_n
            elif p.flat is not None and p.ts and all(len(c) == len(p.ts) for c in p.flat):
                flat.append(p)
                for j, c in enumerate(p.flat):
                    bufs[j].append(c)
            else:
                rest.append(p)
        cols: list[Any] = []
        times: list[list[int]] = []  # per pending series, in the order of `flat` below
        seqs: list[Sequence[Any]] = []
        if raw:
            assert self.raw is not None
            ts_all, cols = self.raw.columns(b"".join(sections), t0s, ns)
            a = 0
            for p in raw:
                b = a + sum(p.raw_n)
                times.append(ts_all[a:b].tolist())
                seqs.append(p.raw_seqs())
                a = b
        if flat:
            fcols = [np.frombuffer(b"".join(b), dtype=np.float64) for b in bufs]
            cols = [np.concatenate((a, b)) for a, b in zip(cols, fcols)] if cols else fcols
            times += [p.ts.tolist() for p in flat]
            seqs += [p.seqs for p in flat]
        flat = raw + flat
        if flat:
            fast = float_columns(self.spec, cols)
            if fast is None:
                rest += flat
            else:
                kinds, wire, canon = fast
                a = 0
                for p, ts, qs in zip(flat, times, seqs):
                    b = a + len(ts)
                    w = [c[a:b] for c in wire]
                    cn = [w[i] if c is wire[i] else c[a:b] for i, c in enumerate(canon)]
                    out.append(Segment(p.route.series[0], p.route.tags, p.hour, self.names, ts, qs, kinds, w,
                                       None, cn, [], p.ordered and strictly_increasing(ts), p.route.head))
                    a = b
        for p in rest:
            seg = self.segment(p)
            if seg is not None:
                out.append(seg)
        return out

    def segment(self, p: _Pending) -> Segment | None:
        p.materialize()
        ts = p.ts.tolist()
        ordered = p.ordered and strictly_increasing(ts)
        rows = p.rows
        if self.getter is not None and ts:
            try:
                vals: list[Any] | None = list(map(self.getter, map(_FIELDS, rows)))
            except (KeyError, TypeError, IndexError):
                vals = None
            if vals is not None:
                fast = fast_columns(self.spec, list(zip(*vals)) if len(self.names) > 1 else [vals])
                if fast is not None:
                    kinds, wire, canon = fast
                    return Segment(p.route.series[0], p.route.tags, p.hour, self.names, ts, p.seqs, kinds, wire,
                                   None, canon, [], ordered, p.route.head)
        return self.slow_segment(p, ts, p.seqs, ordered)

    def slow_segment(self, p: _Pending, ts: list[int], seqs: list[Any], ordered: bool) -> Segment | None:
        """Any rows: the field rules value by value (absent values, booleans, mixed types, steps)."""
        kept_ts: list[int] = []
        kept_seqs: list[Any] = []
        points: list[dict[str, Any]] = []
        steps = self.steps
        fields_rules = self.rule.fields
        for t, row, seq in zip(ts, p.rows, seqs):
            f: dict[str, Any] = {}
            for k, v in row[1].items():
                step = steps.get(k, _SKIP)
                if step is _SKIP or v is None or (type(v) is float and not math.isfinite(v)):
                    continue
                f[k] = v if step is None else fields_rules[k].apply(v)
            if f:
                kept_ts.append(t)
                kept_seqs.append(seq)
                points.append(f)
        if not kept_ts:
            return None
        return make_segment(p.route.series[0], dict(p.route.tags), p.hour, self.spec, kept_ts, kept_seqs, points,
                            ordered and strictly_increasing(kept_ts))


class _RawLayout:
    """The compact payload's fixed-size reading (gateway.schema) as a numpy record: the shared fields'
    float values of many readings in one call, exactly ingest's raw / scale."""

    def __init__(self, schema: Schema, names: list[str]) -> None:
        st = schema.reading_struct
        fmt = st.format if isinstance(st.format, str) else st.format.decode()
        assert fmt[:4] == "<HBB" and len(fmt) == 4 + len(schema.fields)
        self.dtype = np.dtype([("dt", "<u2"), ("flags", "u1"), ("mask", "u1")]
                              + [(f.name, "<" + c) for f, c in zip(schema.fields, fmt[4:])])
        assert self.dtype.itemsize == st.size
        self.schema_id = schema.schema_id
        self.size = st.size
        self.scales = [(k, float(f.scale)) for k in names if (f := schema.field(k)) is not None]
        need = sum(1 << i for i, f in enumerate(schema.fields) if f.name in names)
        # Present masks holding every shared field (bytes.translate deletes them; anything left is a miss).
        self.full_masks = bytes(m for m in range(256) if m & need == need)
        self._dts: dict[int, struct.Struct] = {}

    def dts(self, n: int) -> struct.Struct:
        """Struct unpacking the `dt` (u16, first) of n readings in one call."""
        st = self._dts.get(n)
        if st is None:
            st = self._dts[n] = struct.Struct("<" + f"H{self.size - 2}x" * n)
        return st

    def rows(self, blob: bytes, t0: int, seq0: int) -> list[Any]:
        """The readings of one record as rows of their shared values (for a series already kept as rows)."""
        rec = np.frombuffer(blob, dtype=self.dtype)
        ts, cols = self.columns(blob, [t0], [len(rec)])
        names = [k for k, _s in self.scales]
        return [[t, dict(zip(names, vals)), seq0 + i, 0] for i, (t, *vals) in enumerate(zip(ts.tolist(), *(c.tolist() for c in cols)))]

    def columns(self, blob: bytes, t0s: list[int], ns: list[int]) -> tuple[Any, list[Any]]:
        """Times (int64: each record's t0 + dt) and a float64 column per shared field of the readings in
        `blob`: the decoder's raw / scale (both exact in a double, so numpy's correctly rounded division
        gives Python's int / int bit for bit)."""
        rec = np.frombuffer(blob, dtype=self.dtype)
        ts = rec["dt"].astype(np.int64) + np.repeat(np.asarray(t0s, dtype=np.int64), ns)
        return ts, [rec[k].astype(np.float64) / scale for k, scale in self.scales]


# Where a record's readings sit in the compact payload they were decoded from (docs/wire-format.md):
# (payload, head, n, t0, seq0, first time, last time): n fixed-size readings from byte `head`, times
# t0 + dt, sequence numbers seq0 + i. A plain tuple: RecordFeed.put() makes one per message on ingest's path.
RawReadings = tuple[bytes, int, int, int, int, int, int]

# RecordFeed entry: (received_at, record or None, route or None, RawReadings or None, log offset after the frame)
_FeedEntry = tuple[float, dict[str, Any] | None, Any, tuple[RawReadings, ...] | None, int]

_COMPACT_MAGIC = bytes([MAGIC_COMPACT])


class RecordFeed:
    """Log records handed from ingest to the mirror sink, so the sink neither reads the frames back from
    the log nor parses their JSON again (~2.4 µs per reading). Keyed by the frame's log offset; bounded;
    a miss (the sink lagging, a restart, frames not written by ingest) just means the sink reads and
    decodes the frame. Ingest calls put() right after each log write.

    With the ingest batch's MQTT messages and the sink's routes (`sink`), put() keeps no reference to
    ingest's rows for a record the sink does not mirror, nor for one that holds every reading of a
    compact payload: for that one it keeps the payload's place (RawReadings), and the sink takes the
    shared values as fixed-width integers, vectorised once per flush. bench/mirror_bench.py showed both
    costs of the rows: visiting five Python floats per reading in ingest's dicts, and the young garbage
    collections that traversed the rows the feed kept alive (ingest's own rows die before any)."""

    # A record kept as its payload's place weighs this many readings per row kept (memory: ~20 bytes of
    # payload against ~400 of row objects), so the bound is about memory, not readings.
    RAW_WEIGHT = 1 / 16

    def __init__(self, max_rows: int = 50_000, sink: MirrorSink | None = None) -> None:
        self.max_rows = max_rows
        self.sink = sink
        # log offset of the frame -> (received_at, record or None, route or None, RawReadings or None, offset after it)
        self._recs: OrderedDict[int, _FeedEntry] = OrderedDict()
        self._rows: dict[int, int] = {}  # offset -> weight in the bound
        self._nrows = 0

    def put(self, end_offset: int, frames: list[bytes], recs: list[dict[str, Any]], msgs: Sequence[Any] = (),
            wholes: Sequence[bytes | None] = ()) -> None:
        """`msgs`: the ingest batch's messages (anything with a `payload`), in any order. `wholes`: per record,
        the compact payload it holds every reading of (ingest built no rows for it), or None."""
        index: dict[tuple[bytes, int], tuple[bytes, int, int, int, int, int] | None] = {}
        sink = self.sink
        if sink is not None and not wholes:
            unpack = HEADER_TAIL.unpack_from
            for msg in msgs:
                payload = msg.payload
                # Only the header is read: ingest has validated the message, and the record must match it below.
                if payload[:1] == _COMPACT_MAGIC and len(payload) >= 3 + payload[2] + HEADER_TAIL.size:
                    nlen = payload[2]
                    seq0, t0, n = unpack(payload, 3 + nlen)
                    key = (payload[3 : 3 + nlen], seq0)
                    # Two payloads of one node starting at the same number (a resend): which one ingest
                    # kept is not known here, so neither is used (the sink takes the record's values).
                    index[key] = None if key in index else (payload, 3 + nlen + HEADER_TAIL.size, n, t0, seq0, payload[1])
        off = end_offset - sum(len(f) + LOG_FRAME_OVERHEAD for f in frames)
        for i, (f, r) in enumerate(zip(frames, recs)):
            start, off = off, off + len(f) + LOG_FRAME_OVERHEAD
            whole = wholes[i] if wholes else None
            rows = r.get("rows", ())
            n_rows = len(rows)
            entry: _FeedEntry = (r.get("a", 0.0), r, None, None, off)
            route: "str | _Route | None" = None
            if sink is not None:
                route = sink.route_for(r.get("m", ""), r.get("tags", {}))
            if whole is not None:
                nlen = whole[2]
                seq0, t0, n_rows = HEADER_TAIL.unpack_from(whole, 3 + nlen)
                raw = None
                if sink is not None and route is not None and not isinstance(route, str):
                    raw = sink._raw_checked(route, (whole, 3 + nlen + HEADER_TAIL.size, n_rows, t0, seq0, whole[1]), None)
                if raw is not None:
                    entry = (entry[0], None, route, raw, off)
                elif not isinstance(route, str):  # the rows' way after all: they come from the payload
                    r["rows"] = records.rows_of(accepted_compact_readings(whole))
            if isinstance(route, str):
                entry = (entry[0], None, route, None, off)  # not mirrored: only counted
            elif whole is None and sink is not None and route is not None:
                tags = r.get("tags", {})
                if index and rows:
                    found = index.get((str(tags.get("node", "")).encode(), rows[0][2]))
                    # Every reading of the payload, none rejected nor de-duplicated: same count, same first
                    # number (the rows are a subset of the payload's readings, in order), same times.
                    raw = sink._raw_checked(route, found, rows) if found is not None else None
                    if raw is not None:
                        entry = (entry[0], None, route, raw, off)
            self._recs[start] = entry
            weight = n_rows if entry[1] is not None else 1 + int(n_rows * self.RAW_WEIGHT)
            self._rows[start] = weight
            self._nrows += weight
        while self._nrows > self.max_rows and self._recs:
            old, _ = self._recs.popitem(last=False)
            self._nrows -= self._rows.pop(old)

    def take(self, start: int) -> _FeedEntry | None:
        """The entry of the frame at log offset `start`, removed."""
        got = self._recs.pop(start, None)
        if got is not None:
            self._nrows -= self._rows.pop(start)
        return got

    def chain(self, start: int, limit: int, max_n: int) -> list[int]:
        """End offsets of the consecutive frames from `start` that the feed holds and that end at or before
        `limit` (the log's durable end: a sink never goes past it), at most max_n."""
        out: list[int] = []
        while len(out) < max_n:
            e = self._recs.get(start)
            if e is None or e[4] > limit:
                break
            start = e[4]
            out.append(start)
        return out

    def received_at(self, start: int) -> float | None:
        e = self._recs.get(start)
        return None if e is None else e[0]


# -- sending side: link, acknowledgements, reconciliation -----------------------------------------

class Sender:
    def __init__(self, gw: "Gateway", cfg: MirrorConfig, policy: Policy, archive: Archive, metrics: MirrorMetrics,
                 sink: MirrorSink, batch_ready: asyncio.Event) -> None:
        self.gw, self.cfg, self.policy, self.archive, self.metrics, self.sink = gw, cfg, policy, archive, metrics, sink
        self.batch_ready = batch_ready
        self.city = gw.cfg.city
        self.inflight: dict[int, float] = {}
        self.link_gen = 0
        self.round = 0
        self.next_recon = time.monotonic() + min(5.0, cfg.reconcile_interval_s)
        self.recon_sent_at: float | None = None
        self.link: MqttLink | None = None

    def _make_link(self) -> MqttLink:
        pb = self.cfg.partner_broker
        return MqttLink(
            "partner", pb.host, pb.port, pb.client_id or f"twinedge-mirror-{self.city}-to-{self.cfg.partner}",
            pb.username, pb.password.get_secret_value(), str(pb.tls_ca) if pb.tls_ca else None,
            [topic(self.cfg.partner, self.city, "ack"), topic(self.cfg.partner, self.city, "recon_reply")],
            asyncio.get_running_loop(), keepalive_s=pb.keepalive_s)

    async def run(self) -> None:
        link = self.link = self._make_link()
        link.start()
        try:
            while True:
                self._handle_incoming(link)
                if link.connected:
                    if link.generation != self.link_gen:
                        self.link_gen = link.generation
                        self.inflight.clear()  # new connection: resend whatever is unacknowledged now
                    self._send(link)
                    if time.monotonic() >= self.next_recon:
                        self._reconcile(link)
                self.gw.health.set("mirror_link", None if link.connected or time.time() - self.gw.health.started < 30
                                   else link.last_error)
                self._refresh_metrics(link)
                self.batch_ready.clear()
                link.wakeup.clear()
                if link.queue:
                    continue
                waits = [asyncio.ensure_future(self.batch_ready.wait()), asyncio.ensure_future(link.wakeup.wait())]
                await asyncio.wait(waits, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
        finally:
            link.stop()

    def _send(self, link: MqttLink) -> None:
        now = time.monotonic()
        for bid, nbytes in self.archive.pending_ids(self.cfg.max_inflight_batches):
            sent = self.inflight.get(bid)
            if sent is not None and now - sent < self.cfg.ack_timeout_s:
                continue
            msg = self.archive.message(bid)
            if msg is None:
                continue
            link.publish(topic(self.cfg.partner, self.city, "batch"), msg)
            self.inflight[bid] = now
            if sent is None:
                self.metrics.bytes.labels("out").inc(nbytes)
                self.metrics.batches.labels("out", "sent").inc()
            else:
                self.metrics.batches.labels("out", "resent").inc()

    def _handle_incoming(self, link: MqttLink) -> None:
        results: list[tuple[int, int, str | None]] = []
        while link.queue:
            msg = link.queue.popleft()
            kind = msg.topic.rsplit("/", 1)[-1]
            try:
                doc = json.loads(zlib.decompress(msg.payload) if kind == "recon_reply" else msg.payload)
            except (ValueError, zlib.error):
                log.warning("unreadable message from partner", extra={"topic": msg.topic})
                continue
            if kind == "ack":
                for bid, result, detail in doc.get("acks", []):
                    i = Archive.parse_bid(str(bid), self.archive.epoch)
                    if i is None:
                        continue
                    self.inflight.pop(i, None)
                    if result == "ok":
                        results.append((i, ACKED, None))
                    elif result in ("hash", "format"):
                        # Damaged on the way: it stays pending and goes out again.
                        self.metrics.batches.labels("out", "damaged").inc()
                    else:
                        results.append((i, REJECTED, f"{result}: {detail}"))
                        log.error("partner rejected a mirror batch", extra={"batch": bid, "reason": result, "detail": detail})
                        self.gw.health.set("mirror_rejected", f"partner rejected batch {bid}: {result}: {detail}")
            elif kind == "recon_reply":
                self._on_recon_reply(doc)
        if results:
            acked = [r for r in results if r[1] == ACKED]
            if acked:
                ids = ",".join(str(r[0]) for r in acked)
                n = self.archive.db.execute(f"SELECT coalesce(sum(points), 0) FROM batch WHERE state = 0 AND id IN ({ids})").fetchone()[0]
                self.metrics.points.labels("out").inc(int(n))
                self.metrics.batches.labels("out", "acked").inc(len(acked))
            self.metrics.batches.labels("out", "rejected").inc(len(results) - len(acked))
            self.archive.mark(results)

    def _refresh_metrics(self, link: MqttLink) -> None:
        n, nbytes, first_a = self.archive.pending_stats()
        self.metrics.pending.set(n)
        self.metrics.pending_bytes.set(nbytes)
        oldest = [a for a in (first_a, self.sink.oldest_pending_at) if a is not None]
        self.sink.partner_lag_s = max(0.0, time.time() - min(oldest)) if oldest else 0.0
        self.metrics.lag.set(self.sink.partner_lag_s)
        self.metrics.link_up.labels("partner").set(1 if link.connected else 0)

    # -- reconciliation ---------------------------------------------------------------------
    def _reconcile(self, link: MqttLink) -> None:
        self.next_recon = time.monotonic() + self.cfg.reconcile_interval_s
        now = time.time()
        self.archive.refresh_digests(now - self.cfg.reconcile_settle_s, self.sink.spec_for)
        cutoff = int(now - self.cfg.retention_h * 3600)
        self.archive.prune(cutoff - cutoff % 3600)
        since = int(now - self.cfg.reconcile_window_h * 3600)
        busy = self.archive.key_has_pending()
        keys = [[k.m, k.node, k.hour, k.count, k.hash, not k.matched] for k in self.archive.keys(since - since % 3600)
                if not k.dirty and (k.m, k.node, k.hour) not in busy]
        self.round += 1
        payload = zlib.compress(json.dumps({"round": self.round, "origin": self.city, "dv": DIGEST_VERSION,
                                            "keys": keys}).encode())
        link.publish(topic(self.cfg.partner, self.city, "recon"), payload)
        self.recon_sent_at = now

    def _on_recon_reply(self, doc: dict[str, Any]) -> None:
        ours = {(k.m, k.node, k.hour): k for k in self.archive.keys(0)}
        busy = self.archive.key_has_pending()
        rows: list[tuple[str, str, int, int, str | None, bool, int | None]] = []
        sent = held = 0
        replays: list[tuple[str, str, int]] = []
        for m, node, hour, pcount, phash in doc.get("keys", []):
            k = ours.get((m, node, hour))
            if k is None or k.dirty or (m, node, hour) in busy:
                continue  # changed since the request: compared next round
            ok = pcount == k.count and (phash == k.hash if phash is not None else k.matched)
            sent += k.count
            held += k.count if ok else (min(pcount, k.count) if pcount < k.count else max(k.count - 1, 0))
            rb = None
            if not ok and pcount <= k.count:
                replays.append((m, node, hour))
            elif not ok:
                log.warning("partner holds more points than we sent; not replayable",
                            extra={"m": m, "node": node, "hour": hour, "partner": pcount, "ours": k.count})
            rows.append((m, node, hour, int(pcount), phash, ok, rb))
        replay_ids: dict[tuple[str, str, int], int] = {}
        cache: dict[int, list[Point]] = {}
        for m, node, hour in replays:
            pts = list(self.archive.key_points(m, node, hour, cache).values())
            if pts:
                replay_ids[(m, node, hour)] = self.sink.replay_batch(pts)
                self.metrics.replayed.inc(len(pts))
                log.warning("reconciliation found a gap; replaying", extra={"m": m, "node": node, "hour": hour,
                                                                            "points": len(pts)})
        rows = [(m, node, hour, pc, ph, ok, replay_ids.get((m, node, hour))) for m, node, hour, pc, ph, ok, _ in rows]
        self.archive.record_partner(rows)
        self.metrics.recon_rounds.inc()
        if sent:
            ratio = held / sent
            self.metrics.completeness.set(ratio)
            self.metrics.compared_points.set(sent)
            self._write_completeness(ratio)

    def _write_completeness(self, ratio: float) -> None:
        # Until Gateway._stats_records carries it, add mirror_completeness to our own `gateway` series.
        rec = {"a": time.time(), "m": "gateway", "tags": {"city": self.city, "instance": self.gw.cfg.instance},
               "rows": [[int(time.time()), {"mirror_completeness": float(ratio)}, None, 0]]}
        if self.gw.log.has_room(64 * 1024):
            self.gw.log.append([records.encode(rec)])


# -- receiving side ---------------------------------------------------------------------------

class Receiver:
    """Validates the partner's batches, writes them to our partner database, acknowledges per batch."""

    def __init__(self, gw: "Gateway", cfg: MirrorConfig, policy: Policy, metrics: MirrorMetrics) -> None:
        self.gw, self.cfg, self.policy, self.metrics = gw, cfg, policy, metrics
        self.city = gw.cfg.city
        upd: dict[str, Any] = {"database": cfg.inbound.database, "bucket": cfg.inbound.bucket or cfg.inbound.database,
                               "batch_points": min(cfg.inbound.write_batch_points, 100_000)}
        self.influx: InfluxConfig = gw.cfg.influx.model_copy(update=upd)
        self.seen: OrderedDict[str, None] = OrderedDict()

    def _make_link(self) -> MqttLink:
        ib, mq = self.cfg.inbound, self.gw.cfg.mqtt
        tls = ib.tls_ca or (mq.tls_ca if not ib.host else None)
        return MqttLink(
            "inbound", ib.host or mq.host, ib.port or mq.port, f"twinedge-mirror-rx-{self.city}-{self.gw.cfg.instance}",
            ib.username or (mq.username if not ib.host else ""),
            (ib.password.get_secret_value() or (mq.password.get_secret_value() if not ib.host else "")),
            str(tls) if tls else None,
            [f"{TOPIC_ROOT}/{self.city}/+/batch", f"{TOPIC_ROOT}/{self.city}/+/recon"],
            asyncio.get_running_loop(), manual_ack=True, receive_maximum=64)

    async def run(self) -> None:
        link = self._make_link()
        link.start()
        try:
            async with aiohttp.ClientSession() as session:
                writer = InfluxWriter(self.influx, session)
                await self._retry(writer.ensure_database)
                while True:
                    self.metrics.link_up.labels("inbound").set(1 if link.connected else 0)
                    if not link.queue:
                        link.wakeup.clear()
                        try:
                            await asyncio.wait_for(link.wakeup.wait(), 1.0)
                        except asyncio.TimeoutError:
                            pass
                        continue
                    msgs = []
                    while link.queue and len(msgs) < 64:
                        msgs.append(link.queue.popleft())
                    await self._handle(link, writer, session, msgs)
        finally:
            link.stop()

    async def _retry(self, fn: Any) -> None:
        attempt = 0
        while True:
            try:
                await fn()
                self.gw.health.set("mirror_inbound", None)
                return
            except Retryable as e:
                attempt += 1
                if attempt > 3:
                    self.gw.health.set("mirror_inbound", f"writing partner data to InfluxDB failing: {e}")
                await asyncio.sleep(min(self.influx.max_backoff_s, 0.2 * 2 ** min(attempt, 8)) * random.uniform(0.5, 1.5))

    async def _handle(self, link: MqttLink, writer: InfluxWriter, session: aiohttp.ClientSession,
                      msgs: list[LinkMessage]) -> None:
        lines: list[str] = []
        acks: dict[str, list[list[Any]]] = {}
        dead: list[DeadLetter] = []
        accepted = 0
        nbytes = 0
        for msg in msgs:
            parts = msg.topic.split("/")
            origin, kind = parts[2], parts[3]
            if kind == "recon":
                await self._recon(link, session, msg, origin)
                continue
            try:
                manifest, pts = self.validate(origin, msg.payload)
            except WireError as e:
                dead.append(DeadLetter("mirror", e.reason, e.detail, msg.topic, None, msg.payload))
                self.metrics.batches.labels("in", "rejected").inc()
                bid = _peek_bid(msg.payload)
                if bid is not None and origin == self.cfg.partner:
                    acks.setdefault(origin, []).append([bid, e.reason, e.detail[:200]])
                log.warning("mirror batch rejected", extra={"origin": origin, "reason": e.reason, "detail": e.detail})
                continue
            bid = str(manifest["batch"])
            acks.setdefault(origin, []).append([bid, "ok", ""])
            if bid in self.seen:
                self.metrics.batches.labels("in", "duplicate").inc()
                continue
            self.seen[bid] = None
            while len(self.seen) > 100_000:
                self.seen.popitem(last=False)
            lines.extend(_lines(pts, origin))
            accepted += len(pts)
            nbytes += len(msg.payload)
        if dead:
            self.gw.dead.add_many(dead)
            for d in dead:
                self.gw.metrics.dead_letters.labels(d.stage, d.reason).inc()
        for start in range(0, len(lines), self.influx.batch_points):
            chunk = lines[start : start + self.influx.batch_points]

            async def write(chunk: list[str] = chunk) -> None:
                rejected = await writer.write(chunk)
                if rejected:
                    self.gw.dead.add_many([DeadLetter("mirror", "influx_rejected", r.detail, "influx-partner", item={"line": r.line})
                                           for r in rejected])

            await self._retry(write)
        # InfluxDB has it: now acknowledge to the partner (app level) and to our broker (PUBACK).
        for origin, items in acks.items():
            link.publish(topic(self.city, origin, "ack"), json.dumps({"acks": items}).encode())
        self.metrics.points.labels("in").inc(accepted)
        self.metrics.bytes.labels("in").inc(nbytes)
        self.metrics.batches.labels("in", "written").inc(sum(1 for items in acks.values() for i in items if i[1] == "ok"))
        link.ack(msgs)

    def validate(self, origin: str, payload: bytes) -> tuple[dict[str, Any], list[Point]]:
        if origin == self.city:
            raise WireError("loop", f"batch claims our own city {origin!r} as origin: never accepted (no loops)")
        if origin != self.cfg.partner:
            raise WireError("unknown_partner", f"{origin!r} is not our partner ({self.cfg.partner})")
        manifest, body = split_batch(payload)
        if manifest.get("origin") != origin or manifest.get("dest") != self.city:
            raise WireError("unknown_partner", f"manifest says {manifest.get('origin')!r} -> {manifest.get('dest')!r}, "
                                               f"topic says {origin!r} -> {self.city!r}")
        if manifest.get("policy") != self.policy.policy or manifest.get("policy_version") != self.policy.version:
            raise WireError("policy_version", f"batch made under policy {manifest.get('policy')} "
                                              f"v{manifest.get('policy_version')}, ours is {self.policy.policy} "
                                              f"v{self.policy.version}: both cities must deploy the same policy file")
        if not isinstance(manifest.get("batch"), str):
            raise WireError("format", "manifest has no batch id")
        pts = decode_body(body)
        check_manifest(manifest, pts)
        # What holds for a series (measurement + tags) is checked once per series, and each (field, value)
        # once per batch: the per-point checks took 40 % of the receiving gateway's CPU (py-spy, bench).
        series: dict[tuple[Any, ...], tuple[ShareRule, dict[str, Any]]] = {}
        held: set[tuple[str, type, Any]] = set()
        for p in pts:
            sk = (p.m, tuple(p.tags.items()))
            got = series.get(sk)
            if got is None:
                got = series[sk] = self._check_series(p, origin)
            rule, allowed = got
            for k, v in p.fields.items():
                hk = (k, type(v), v)  # the type too: True == 1 == 1.0 as keys, not for the rules
                if hk in held:
                    continue
                fr = allowed.get(k)
                if fr is None:
                    raise WireError("policy", f"{p.m}: field {k!r} is not shared by the policy")
                if not fr.holds(v):
                    raise WireError("policy", f"{p.m}: field {k}={v!r} is finer than the policy allows")
                held.add(hk)
            if rule.aggregate_minutes and p.t % (rule.aggregate_minutes * 60):
                raise WireError("policy", f"{p.m}: point at {p.t} is not on a {rule.aggregate_minutes}-minute bin")
        return manifest, pts

    def _check_series(self, p: Point, origin: str) -> tuple[ShareRule, dict[str, Any]]:
        """The checks that depend only on the point's measurement and tags; (rule, allowed fields)."""
        rule = self.policy.rule(p.m)
        if rule is None:
            raise WireError("policy", f"measurement {p.m!r} is not shared by the policy")
        extra = set(p.tags) - set(POINT_TAGS)
        if extra:
            raise WireError("policy", f"{p.m}: tag(s) {', '.join(sorted(extra))} are not allowed")
        if p.tags.get("city") != origin:
            raise WireError("loop", f"{p.m}: point of city {p.tags.get('city')!r} in a batch from {origin!r}")
        if p.tags.get("domain") and p.tags["domain"] not in rule.domains:
            raise WireError("policy", f"{p.m}: domain {p.tags['domain']!r} is not shared")
        if not rule.node_ok(p.node):
            raise WireError("policy", f"{p.m}: node {p.node!r} is not shared by the policy")
        if isinstance(rule.site, int) and p.tags.get("site", "").count("-") >= rule.site:
            raise WireError("policy", f"{p.m}: site {p.tags.get('site')!r} is finer than the policy allows")
        if rule.site == "drop" and "site" in p.tags:
            raise WireError("policy", f"{p.m}: site must not be shared")
        return rule, rule.out_fields()

    # -- reconciliation (answer the partner's request from our InfluxDB) ---------------------
    async def _recon(self, link: MqttLink, session: aiohttp.ClientSession, msg: LinkMessage, origin: str) -> None:
        try:
            if origin != self.cfg.partner:
                raise WireError("unknown_partner", f"reconciliation request from {origin!r}, not our partner")
            doc = json.loads(zlib.decompress(msg.payload))
            if doc.get("dv") != DIGEST_VERSION:
                raise WireError("format", f"reconciliation digest version {doc.get('dv')!r}, ours is {DIGEST_VERSION}: "
                                          "both cities must run the same gateway version")
            keys = doc["keys"]
            reply = await self._answer(session, origin, keys)
        except WireError as e:
            self.gw.dead.add_many([DeadLetter("mirror", e.reason, e.detail, msg.topic, None, msg.payload)])
            self.gw.metrics.dead_letters.labels("mirror", e.reason).inc()
            link.ack([msg])
            return
        except (ValueError, KeyError, TypeError, zlib.error) as e:
            self.gw.dead.add_many([DeadLetter("mirror", "format", f"reconciliation request unreadable: {e}",
                                              msg.topic, None, msg.payload)])
            link.ack([msg])
            return
        except Retryable as e:
            log.warning("reconciliation query failed; the partner asks again next round", extra={"detail": str(e)})
            link.ack([msg])
            return
        link.publish(topic(self.city, origin, "recon_reply"),
                     zlib.compress(json.dumps({"round": doc.get("round"), "keys": reply}).encode()))
        self.metrics.recon_rounds.inc()
        link.ack([msg])

    async def _query(self, session: aiohttp.ClientSession, q: str) -> dict[str, Any]:
        cfg = self.influx
        params = {"q": q, "db": cfg.database, "epoch": "s"}
        if cfg.username:
            params.update(u=cfg.username, p=cfg.password.get_secret_value())
        headers = {}
        if cfg.token.get_secret_value():
            headers["Authorization"] = f"Token {cfg.token.get_secret_value()}"
        try:
            async with session.get(f"{cfg.url}/query", params=params, headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=cfg.timeout_s * 3)) as r:
                if r.status >= 300:
                    raise Retryable(f"http_{r.status}", f"InfluxDB query answered {r.status}")
                return await r.json()  # type: ignore[no-any-return]
        except asyncio.TimeoutError:
            raise Retryable("timeout", "InfluxDB query timed out") from None
        except aiohttp.ClientError as e:
            raise Retryable("connection", f"{type(e).__name__}: {e}") from None

    async def _answer(self, session: aiohttp.ClientSession, origin: str, keys: list[list[Any]]) -> list[list[Any]]:
        by_m: dict[str, list[list[Any]]] = {}
        for k in keys:
            by_m.setdefault(str(k[0]), []).append(k)
        out: list[list[Any]] = []
        for m, ks in by_m.items():
            if self.policy.rule(m) is None or not all(NAME_RE.match(str(k[1])) for k in ks):
                raise WireError("policy", f"reconciliation asks for {m!r} or a bad node name")
            lo = min(int(k[2]) for k in ks)
            hi = max(int(k[2]) for k in ks) + 3600
            res = await self._query(session, f'SELECT count(*) FROM "{m}" WHERE "origin" = \'{origin}\' '
                                             f'AND time >= {lo}s AND time < {hi}s GROUP BY "node", time(1h)')
            counts: dict[tuple[str, int], int] = {}
            for s in res.get("results", [{}])[0].get("series", []) or []:
                node = s["tags"]["node"]
                for row in s["values"]:
                    n = max((int(v) for v in row[1:] if v is not None), default=0)
                    counts[(node, int(row[0]))] = n
            for _m, node, hour, count, _hash, verify in ks:
                pc = counts.get((node, int(hour)), 0)
                h: str | None = None
                if verify or pc != count:
                    pc, h = await self._key_digest(session, m, origin, node, int(hour))
                out.append([m, node, int(hour), pc, h])
        return out

    async def _key_digest(self, session: aiohttp.ClientSession, m: str, origin: str, node: str, hour: int) -> tuple[int, str]:
        res = await self._query(session, f'SELECT * FROM "{m}" WHERE "origin" = \'{origin}\' AND "node" = \'{node}\' '
                                         f'AND time >= {hour}s AND time < {hour + 3600}s')
        rule = self.policy.rule(m)
        spec = rule.canon_spec() if rule is not None else ()
        pts: dict[int, dict[str, Any]] = {}
        for s in res.get("results", [{}])[0].get("series", []) or []:
            cols = s["columns"]
            for row in s["values"]:
                pts[int(row[0])] = {c: v for c, v in zip(cols, row) if c != "time" and c not in INFLUX_TAGS and v is not None}
        return digest_points(pts, spec)


def _peek_bid(payload: bytes) -> str | None:
    try:
        manifest, _ = split_batch(payload)
    except WireError:
        try:
            n = int.from_bytes(payload[4:8], "little")
            manifest = json.loads(payload[8 : 8 + n])
        except ValueError:
            return None
    bid = manifest.get("batch") if isinstance(manifest, dict) else None
    return bid if isinstance(bid, str) else None


def _lines(points: list[Point], origin: str) -> list[str]:
    series: dict[tuple[str, tuple[tuple[str, str], ...]], list[list[Any]]] = {}
    for p in points:
        series.setdefault((p.m, tuple(sorted(p.tags.items()))), []).append([p.t, p.fields, None, 0])
    out: list[str] = []
    for (m, tags), rows in series.items():
        out.extend(records.to_lines({"m": m, "tags": dict(tags), "rows": rows}, extra_tags={"origin": origin}))
    return out


# -- wiring -------------------------------------------------------------------------------------

def build_mirror_stages(gw: "Gateway") -> tuple[list["Sink"], list[Awaitable[None]]]:
    """Called by Gateway.run() when [mirror] is configured."""
    assert gw.cfg.mirror is not None
    cfg = validate_mirror_config(gw.cfg.mirror, gw.cfg.city)
    policy = load_policy(cfg.policy)
    metrics = MirrorMetrics(gw)
    archive = Archive(gw.cfg.data_dir / "mirror" / f"archive-{cfg.partner}.sqlite3")
    ready = asyncio.Event()
    sink = MirrorSink(gw, cfg, policy, archive, metrics, ready)
    # Ingest hands decoded records over when it knows `mirror_feed` (Gateway._ingest calls put() after
    # each log append); without that, the feed stays empty and the sink decodes every frame itself.
    sink.feed = RecordFeed(sink=sink)
    gw.mirror_feed = sink.feed
    sender = Sender(gw, cfg, policy, archive, metrics, sink, ready)
    stages: list[Awaitable[None]] = [sender.run()]
    if cfg.inbound.enabled:
        stages.append(Receiver(gw, cfg, policy, metrics).run())
    log.info("mirror configured", extra={"partner": cfg.partner, "policy": policy.policy, "policy_version": policy.version,
                                         "partner_broker": f"{cfg.partner_broker.host}:{cfg.partner_broker.port}",
                                         "inbound_database": cfg.inbound.database})
    return [sink], stages
