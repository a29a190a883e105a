"""The gateway service: wires the stages of the data flow as asyncio tasks.

    MQTT (asyncio reader, gateway/ingest_mqtt.py) --deque, bounded by the broker's receive window-->
    ingest: decode + validate (--> dead-letter) + de-duplicate --> durable log write
    commit: one fdatasync per group of batches (inline, or on a worker thread when large) --> PUBACK,
            and only then do the sinks see the frames
    durable log --own cursor--> InfluxDB sink      (gateway/sink_influx.py)
    durable log --own cursor--> partner mirror sink (when configured)
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from collections.abc import Awaitable
from typing import Any, Protocol

import orjson

from gateway import records
from gateway.config import GatewayConfig
from gateway.alarms import AlarmTracker
from gateway.dead_letter import DeadLetter, DeadLetterStore
from gateway.decode import Rejected, decode_up
from gateway.durable_log import DurableLog
from gateway.ingest_mqtt import Inbound, MqttIngest
from gateway.metrics import GatewayMetrics, HealthState, start_http
from gateway.sequence import SequenceTracker
from gateway.sink_influx import InfluxSink
from gateway.status import StatusError, status_record
from gateway.topics import Topic, TopicError, parse_topic

log = logging.getLogger("twinedge.gateway")

# What ingest logs per accepted message: the record, its line protocol (None: rendered when encoded) and the
# compact payload the record holds whole (None: the rows go to the log as JSON).
LogEntry = tuple[dict[str, Any], "str | None", "bytes | None"]

_THREAD_SYNC_BYTES = 256 * 1024  # unsynced bytes from which the fdatasync goes to a worker thread


class Sink(Protocol):
    name: str
    cursor: int
    oldest_pending_at: float | None

    async def run(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class Registry:
    """Known nodes (id -> (city, domain, site)), reloaded when an unknown node shows up."""

    cfg: GatewayConfig
    nodes: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    loaded_at: float = 0.0

    def load(self) -> None:
        if self.cfg.registry is None:
            return
        from provisioning.registry import load_registry

        self.nodes = {
            n.id: (n.city, n.domain, n.site) for n in load_registry(self.cfg.registry).values() if not n.retired
        }
        self.loaded_at = time.monotonic()

    def lookup(self, node: str) -> tuple[str, str, str] | None:
        hit = self.nodes.get(node)
        if hit is None and self.cfg.registry is not None and time.monotonic() - self.loaded_at > 5:
            try:
                self.load()
            except Exception as e:  # a half-written registry file must not stop ingestion
                log.warning("registry reload failed", extra={"error": str(e)})
            hit = self.nodes.get(node)
        return hit


class Gateway:
    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.metrics = GatewayMetrics(cfg.city, cfg.instance)
        self.health = HealthState()
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.log = DurableLog(cfg.data_dir / "log", cfg.log.max_bytes, cfg.log.segment_bytes, cfg.log.fsync)
        self.dead = DeadLetterStore(cfg.data_dir / "dead_letters.sqlite3")
        self.seq = SequenceTracker()
        self._seq_path = cfg.data_dir / "sequence.json"
        self._load_sequence()
        self.alarms = AlarmTracker(cfg.city, cfg.alarm_bands())
        self.node_domain: dict[str, str] = {}
        self._line_prefixes: dict[tuple[str, ...], str] = {}  # per node: measurement and tags, escaped
        # Bound metric children: prometheus' labels() lookup costs more than the rest of a small message.
        self._received_by_kind = {k: self.metrics.received.labels(k) for k in ("up", "status", "cfg", "cmd")}
        self._accepted_by_domain = {d: self.metrics.accepted.labels(d) for d in ("marine", "mobility")}
        self._batch_received: dict[str, int] = {}
        self._batch_accepted: dict[str, int] = {}
        self._topics: dict[str, Topic] = {}  # parsed topics: one node publishes on the same few
        self.registry = Registry(cfg)
        self.registry.load()
        self.limits = cfg.limits.to_limits()
        self.sinks: list[Sink] = []
        self.stopping = asyncio.Event()
        self.space_freed = asyncio.Event()
        self.appended: asyncio.Condition | None = None
        # The messages of each batch written to the log but not yet fdatasync'ed nor acknowledged.
        self._unsynced: collections.deque[list[Inbound]] = collections.deque()
        self._written = asyncio.Event()
        self._ingest_finished = False
        self.mqtt: MqttIngest | None = None
        self.mirror_feed: Any = None  # gateway.mirror.RecordFeed when mirroring
        self.http_port = 0
        self.counts = {"received_msgs": 0, "accepted_readings": 0, "dead_letters": 0, "duplicates": 0}
        if self.log.torn_bytes_cut:
            log.warning("cut torn tail of durable log", extra={"bytes": self.log.torn_bytes_cut})

    # -- stage: ingest ----------------------------------------------------------------
    @staticmethod
    def record_bound(msg: Inbound) -> int:
        """Upper bound of the log bytes one message can become (a 20-byte compact reading is < 500 B of frame)."""
        return 25 * len(msg.payload) + 2048

    def _process(self, batch: list[Inbound]) -> tuple[list[LogEntry], list[DeadLetter]]:
        out: list[LogEntry] = []
        dead: list[DeadLetter] = []
        now = int(time.time())
        received = self._batch_received = dict.fromkeys(self._received_by_kind, 0)
        accepted = self._batch_accepted = dict.fromkeys(self._accepted_by_domain, 0)
        for msg in batch:
            self._process_one(msg, now, out, dead)
        # One prometheus inc() per batch, not per message (two per message were ~5 % of the CPU at 1/message).
        for kind, n in received.items():
            if n:
                self._received_by_kind[kind].inc(n)
        for domain, n in accepted.items():
            if n:
                self._accepted_by_domain[domain].inc(n)
        for d in dead:
            self.metrics.dead_letters.labels(d.stage, d.reason).inc()
        self.counts["dead_letters"] += len(dead)
        self.counts["received_msgs"] += len(batch)
        return out, dead

    def _process_one(self, msg: Inbound, now: int, out: list[LogEntry],
                     dead: list[DeadLetter]) -> None:
        m = self.metrics
        topic = self._topics.get(msg.topic)
        if topic is None:
            try:
                topic = parse_topic(msg.topic)
            except TopicError as e:
                dead.append(DeadLetter("decode", "topic", str(e), msg.topic, None, msg.payload))
                return
            if len(self._topics) >= 100_000:  # bounded: a flood of made-up node names cannot grow it
                self._topics.clear()
            self._topics[msg.topic] = topic
        self._batch_received[topic.kind] += 1
        if topic.city != self.cfg.city:
            dead.append(DeadLetter("decode", "topic", f"city {topic.city!r} is not this gateway's ({self.cfg.city})",
                                   msg.topic, topic.node, msg.payload))
            return
        known = self.registry.lookup(topic.node)
        if known is None and self.cfg.require_registration:
            dead.append(DeadLetter("decode", "unknown_node", f"node {topic.node!r} is not in the registry "
                                   "(register it with `twinedge node add`)", msg.topic, topic.node, msg.payload))
            return
        if known is not None and (known[0], known[1]) != (topic.city, topic.domain):
            dead.append(DeadLetter("decode", "domain_mismatch", f"registry has {topic.node} in {known[0]}/{known[1]}",
                                   msg.topic, topic.node, msg.payload))
            return
        site = known[2] if known else "unknown"
        if topic.kind == "status":
            if not msg.payload:
                return  # a cleared retained status: nothing to record
            try:
                out.append((status_record(topic, msg.payload, site, msg.received_at), None, None))
            except StatusError as e:
                dead.append(DeadLetter("decode", "status_format", str(e), msg.topic, topic.node, msg.payload))
            return
        try:
            dec = decode_up(topic, msg.payload, now, self.limits)
        except Rejected as e:
            dead.append(DeadLetter("decode", e.reason, e.detail, msg.topic, topic.node, msg.payload))
            return
        for rj in dec.rejected:
            dead.append(DeadLetter("reading", rj.reason, rj.detail, msg.topic, dec.node, None, rj.reading))
        fresh = []
        rs = dec.readings
        if (rs and rs[0].seq is not None and rs[-1].seq is not None and rs[-1].seq - rs[0].seq == len(rs) - 1
                and self.seq.commit_run(dec.node, rs[0].seq, len(rs), max(r.t for r in rs))):
            fresh = rs  # the common case: a new batch, consecutive numbers above everything seen
            rs = []
        for r in rs:
            if r.seq is None:
                fresh.append(r)
            elif self.seq.is_new(dec.node, r.seq):
                self.seq.commit(dec.node, r.seq, r.t)
                fresh.append(r)
            else:
                self.seq.duplicate(dec.node)
                self.counts["duplicates"] += 1
                m.duplicates.inc()
        self.node_domain[dec.node] = dec.schema.domain
        if fresh:
            whole = fresh is dec.readings and not dec.rejected and dec.fmt == "compact"
            # Logged as its payload: no rows are built (log readers and the mirror decode them from it if they
            # need them). 50 readings/message: gateway CPU 2.1-2.3 vs 3.1-3.2 s per million readings.
            rec = records.reading_record(dec, site, msg.received_at, [] if whole else fresh)
            key = (dec.schema.domain, topic.city, topic.domain, dec.node, site)
            prefix = self._line_prefixes.get(key)
            if prefix is None:
                prefix = self._line_prefixes[key] = records.line_prefix(rec)
            out.append((rec, records.reading_lines(rec, dec, fresh, prefix), msg.payload if whole else None))
            alarm = self.alarms.check(dec.schema.domain, dec.node, fresh, msg.received_at)
            if alarm is not None:
                out.append((alarm, None, None))
            self._batch_accepted[dec.schema.domain] += len(fresh)
            self.counts["accepted_readings"] += len(fresh)

    async def _ingest(self, mqtt: MqttIngest) -> None:
        assert self.appended is not None
        q = mqtt.queue
        while not self.stopping.is_set():
            if not q:
                # One event, no helper tasks: at one reading per message this wait runs for every few
                # messages. request_stop() sets the wakeup too.
                mqtt.wakeup.clear()
                await mqtt.wakeup.wait()
                continue
            if not self.log.has_room(self.record_bound(q[0])):
                # Full policy: stop acknowledging; the broker keeps the backlog. Never evict.
                self.metrics.log_full.set(1)
                self.health.set("log", f"durable log full ({self.log.size_bytes} bytes): not acknowledging; "
                                "check the InfluxDB sink and mirror")
                self.space_freed.clear()
                try:
                    await asyncio.wait_for(self.space_freed.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
                continue
            self.metrics.log_full.set(0)
            self.health.set("log", None)
            batch = []
            budget = self.cfg.ingest_batch
            room = self.log.max_bytes - self.log.size_bytes
            # Take only what is sure to fit, so a message is never de-duplicated and then not logged.
            payload_budget = self.cfg.ingest_batch_bytes
            while q and budget and payload_budget > 0 and room >= self.record_bound(q[0]):
                room -= self.record_bound(q[0])
                payload_budget -= len(q[0].payload)
                batch.append(q.popleft())
                budget -= 1
            mqtt.taken(batch)
            recs, dead = self._process(batch)
            # Durable first (dead letters and log), then acknowledge: a crash in between only
            # causes a redelivery, which de-duplication and InfluxDB's overwrite absorb.
            self.dead.add_many(dead)
            if recs:
                frames = [records.encode(r, lines, payload) for r, lines, payload in recs]
                end = self.log.write(frames)
                if self.mirror_feed is not None:  # the mirror takes the decoded records and payloads (no re-parse)
                    self.mirror_feed.put(end, frames, [r for r, _lines, _payload in recs],
                                         wholes=[payload for _r, _lines, payload in recs])
                self.metrics.log_appends.inc()
            self._unsynced.append(batch)
            self._written.set()
            await asyncio.sleep(0)

    async def _commit(self, mqtt: MqttIngest) -> None:
        """Group commit: one fdatasync for everything ingest wrote meanwhile, then PUBACK those messages
        and wake the sinks. A large group is synced on a worker thread so ingest goes on decoding (50
        readings/message: 150-158k vs 124-146k readings/s); a small one inline, where the thread hand-off
        cost more CPU than the fdatasync blocks (1 reading/message)."""
        assert self.appended is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._unsynced:
                if self._ingest_finished:
                    return
                self._written.clear()
                await self._written.wait()
                continue
            end = self.log.end
            batches = list(self._unsynced)
            self._unsynced.clear()
            if end - self.log.durable_end >= _THREAD_SYNC_BYTES:
                await loop.run_in_executor(None, self.log.sync, self.log.unsynced_fds())
            elif end > self.log.durable_end:
                self.log.sync(self.log.unsynced_fds())  # ~0.2 ms: cheaper than a thread hand-off
            if end > self.log.durable_end:
                self.log.mark_durable(end)
                async with self.appended:
                    self.appended.notify_all()
            mqtt.ack([m for b in batches for m in b])

    async def _ingest_then_commit(self, mqtt: MqttIngest) -> None:
        try:
            await self._ingest(mqtt)
        finally:
            self._ingest_finished = True
            self._written.set()

    # -- sequence state across restarts ------------------------------------------------
    def _save_sequence(self) -> None:
        """Snapshot the per-node sequence state with the log offset it covers (write, fsync, rename)."""
        tmp = self._seq_path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(orjson.dumps({"log_offset": self.log.durable_end, "nodes": self.seq.snapshot()}))
            f.flush()
            if self.cfg.log.fsync:
                os.fsync(f.fileno())
        os.replace(tmp, self._seq_path)

    def _load_sequence(self) -> None:
        """Snapshot, then the readings the log holds after it: gaps and duplicates stay right across a
        restart or a crash (a redelivered message the log already holds counts as a duplicate)."""
        try:
            snap = orjson.loads(self._seq_path.read_bytes())
            self.seq.restore(snap["nodes"])
            offset = int(snap["log_offset"])
        except FileNotFoundError:
            offset = self.log.start
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            log.warning("sequence state unreadable, counting gaps afresh", extra={"file": str(self._seq_path),
                                                                                  "error": str(e)[:200]})
            self.seq = SequenceTracker()
            offset = self.log.start
        if offset < self.log.start:
            log.warning("sequence state is older than the durable log; gap counts may include readings "
                        "received before the last stop", extra={"snapshot_offset": offset, "log_start": self.log.start})
        replayed = 0
        while batch := self.log.read(max(offset, self.log.start)):
            for offset, blob in batch:
                rec = records.decode(blob)
                node = rec.get("tags", {}).get("node")
                if rec.get("m") not in ("marine", "mobility") or not node:
                    continue
                for row in rec["rows"]:
                    if row[2] is not None:
                        self.seq.replay(node, row[2], row[0])
                        replayed += 1
        if replayed:
            log.info("sequence state brought up to date from the durable log", extra={"readings": replayed})

    # -- stage: stats -----------------------------------------------------------------
    def _stats_records(self) -> list[dict[str, Any]]:
        now = time.time()
        t = int(now)
        node_rows = []
        recs: list[dict[str, Any]] = []
        for node, st in self.seq.nodes.items():
            node_rows.append((node, st))
        for node, st in node_rows:
            recs.append({"a": now, "m": "gateway_node",
                         "tags": {"city": self.cfg.city, "node": node, "domain": self.node_domain.get(node, ""),
                                  "instance": self.cfg.instance},
                         "rows": [[t, {"received": st.received, "duplicates": st.duplicates, "gaps": st.gaps,
                                       "completeness": float(st.completeness), "last_seen": st.last_seen}, None, 0]]})
        lag_s = self._lag_seconds(now)
        gw_fields: dict[str, Any] = {
            "received_msgs": self.counts["received_msgs"], "accepted_readings": self.counts["accepted_readings"],
            "dead_letters": self.counts["dead_letters"], "log_bytes": self.log.size_bytes,
            "log_full": not self.log.has_room(), "sink_lag_points": 0, "sink_lag_s": float(lag_s.get("influx", 0.0)),
        }
        for name, v in lag_s.items():
            if name.startswith("mirror"):
                gw_fields["mirror_lag_s"] = float(v)
        recs.append({"a": now, "m": "gateway", "tags": {"city": self.cfg.city, "instance": self.cfg.instance},
                     "rows": [[t, gw_fields, None, 0]]})
        return recs

    def _lag_seconds(self, now: float) -> dict[str, float]:
        out = {}
        for s in self.sinks:
            behind = s.cursor < self.log.end
            out[s.name] = max(0.0, now - s.oldest_pending_at) if behind and s.oldest_pending_at else 0.0
            own = getattr(s, "lag_seconds", None)  # a sink whose work ends later than its cursor (the mirror)
            if own is not None:
                out[s.name] = max(out[s.name], float(own()))
        return out

    async def _stats(self) -> None:
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), self.cfg.stats_interval_s)
                return
            except asyncio.TimeoutError:
                pass
            self._save_sequence()
            if self.log.has_room(1024 * 1024):
                self.log.append([records.encode(r) for r in self._stats_records()])
                assert self.appended is not None
                async with self.appended:
                    self.appended.notify_all()

    def refresh_metrics(self) -> None:
        m = self.metrics
        m.log_bytes.set(self.log.size_bytes)
        now = time.time()
        lag = self._lag_seconds(now)
        for s in self.sinks:
            m.sink_lag_bytes.labels(s.name).set(max(0, self.log.end - s.cursor))
            m.sink_lag_seconds.labels(s.name).set(lag.get(s.name, 0.0))
        for node, st in self.seq.nodes.items():
            m.node_last_seen.labels(node).set(st.last_seen)
            m.node_gaps.labels(node).set(st.gaps)
            m.node_duplicates.labels(node).set(st.duplicates)
            m.node_completeness.labels(node).set(st.completeness)
        m.ingest_queue.set(len(self.mqtt.queue) if self.mqtt else 0)
        m.backpressure.set(self.mqtt.backpressure_waits if self.mqtt else 0)
        m.mqtt_unacked.set(self.mqtt.received_count - self.mqtt.acked_count if self.mqtt else 0)
        connected = bool(self.mqtt and self.mqtt.connected)
        m.mqtt_connected.set(1 if connected else 0)
        self.health.set("mqtt", None if connected else (self.mqtt.last_error if self.mqtt else "not started"))

    def _release(self) -> None:
        if self.sinks:
            freed = self.log.release(min(s.cursor for s in self.sinks))
            if freed:
                self.space_freed.set()

    def add_sink(self, sink: Sink) -> None:
        self.sinks.append(sink)

    # -- lifecycle --------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # The hot path allocates many short-lived dicts and lists; a larger young generation halves
        # the number of collections (measured with bench/mirror_bench.py and bench/gateway_bench.py).
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        self.appended = asyncio.Condition()
        self.add_sink(InfluxSink(self.cfg.influx, self.log, self.appended, self.dead, self.metrics, self.health,
                                 self._release))
        extra_stages: list[Awaitable[None]] = []
        if self.cfg.mirror:
            from gateway.mirror import build_mirror_stages  # optional stage, see docs/mirroring.md

            mirror_sinks, extra_stages = build_mirror_stages(self)
            for sink in mirror_sinks:
                self.add_sink(sink)
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):
                pass
        runner = None
        if self.cfg.http.enabled:
            runner, self.http_port = await start_http(self.cfg.http.host, self.cfg.http.port, self.metrics,
                                                      self.health, self.refresh_metrics)
            (self.cfg.data_dir / "http.port").write_text(str(self.http_port))
        self.mqtt = MqttIngest(self.cfg.mqtt, self.cfg.city, loop)
        self.mqtt.start()
        log.info("gateway started", extra={"city": self.cfg.city, "instance": self.cfg.instance,
                                           "broker": f"{self.cfg.mqtt.host}:{self.cfg.mqtt.port}",
                                           "http_port": self.http_port, "log_bytes": self.log.size_bytes})
        sink_tasks = [asyncio.create_task(s.run(), name=f"sink-{s.name}") for s in self.sinks]
        ingest = asyncio.create_task(self._ingest_then_commit(self.mqtt), name="ingest")
        commit = asyncio.create_task(self._commit(self.mqtt), name="commit")
        stats = asyncio.create_task(self._stats(), name="stats")
        extra_tasks = [asyncio.ensure_future(c) for c in extra_stages]
        all_tasks = [ingest, commit, stats, *sink_tasks, *extra_tasks]
        done, _ = await asyncio.wait([*all_tasks, asyncio.ensure_future(self.stopping.wait())],
                                     return_when=asyncio.FIRST_COMPLETED)
        failed = [t for t in done if t in all_tasks and t.exception() is not None]
        self.request_stop()
        await asyncio.gather(ingest, stats, return_exceptions=True)
        if not commit.done():
            await asyncio.gather(commit, return_exceptions=True)  # acknowledges what ingest made durable
        self.mqtt.stop()
        for t in extra_tasks:
            t.cancel()
        await asyncio.gather(*extra_tasks, return_exceptions=True)
        if not failed:
            await self._drain()
        for s in self.sinks:
            s.stop()
        await asyncio.gather(*sink_tasks, return_exceptions=True)
        if runner is not None:
            await runner.cleanup()
        self._save_sequence()
        self.dead.close()
        self.log.close()
        for t in failed:
            exc = t.exception()
            log.error("stage failed", extra={"stage": t.get_name(), "error": repr(exc)})
            return 1
        log.info("gateway stopped", extra={"log_bytes": self.log.size_bytes})
        return 0

    async def _drain(self) -> None:
        for s in self.sinks:
            drain = getattr(s, "drain", None)
            if drain is not None:
                await drain()
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        while time.monotonic() < deadline and any(s.cursor < self.log.end for s in self.sinks):
            await asyncio.sleep(0.05)
        behind = {s.name: self.log.end - s.cursor for s in self.sinks if s.cursor < self.log.end}
        if behind:
            log.warning("drain timed out; the rest stays in the durable log for the next start",
                        extra={"bytes_behind": behind})

    def request_stop(self) -> None:
        self.stopping.set()
        if self.mqtt is not None:
            self.mqtt.wakeup.set()
