"""The sender's mirror archive: every batch made for the partner, until acknowledged and past retention.

SQLite in WAL mode, one transaction per flushed batch, holding together:
- the batch (manifest + compressed body, exactly the bytes sent) and its state
  (pending / acknowledged / rejected),
- which (measurement, node, hour) keys it covers (for digests and replay),
- the aggregation bins' running state, and the last durable-log offset applied.
Digests: the packer feeds each (measurement, node, hour)'s running digest (KeyDigest) with
the rows it commits, so reconciliation does not re-read the archive. A running digest is
trusted only if this process saw the key from its first batch and every time in order;
otherwise (restart, late or duplicate times, replays, re-sent aggregation bins) the key is
recomputed from the archive with last-write-wins, like InfluxDB.
The durable log deletes consumed segments, so replay after an acknowledgement must come
from here; `retention_h` bounds it. Because the applied offset commits in the same
transaction as the batch, a crash between this commit and the log-cursor commit never
mirrors a record twice into a bin.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.mirror_wire import KeyDigest, Point, Segment, Spec, decode_body, digest_points, split_batch

PENDING, ACKED, REJECTED = 0, 1, 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batch (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    first_a REAL NOT NULL,
    points INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    replay INTEGER NOT NULL DEFAULT 0,
    state INTEGER NOT NULL DEFAULT 0,
    acked_at REAL,
    reason TEXT,
    msg BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS batch_state ON batch(state, id);
CREATE TABLE IF NOT EXISTS batch_key (batch_id INTEGER NOT NULL, m TEXT NOT NULL, node TEXT NOT NULL, hour INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS batch_key_key ON batch_key(m, node, hour);
CREATE INDEX IF NOT EXISTS batch_key_batch ON batch_key(batch_id);
CREATE TABLE IF NOT EXISTS digest (
    m TEXT NOT NULL, node TEXT NOT NULL, hour INTEGER NOT NULL,
    count INTEGER NOT NULL DEFAULT 0, hash TEXT NOT NULL DEFAULT '', dirty INTEGER NOT NULL DEFAULT 1,
    partner_count INTEGER, partner_hash TEXT, matched INTEGER NOT NULL DEFAULT 0, checked REAL,
    replay_batch INTEGER,
    PRIMARY KEY (m, node, hour)
);
CREATE TABLE IF NOT EXISTS agg (
    m TEXT NOT NULL, node TEXT NOT NULL, bin INTEGER NOT NULL, tags TEXT NOT NULL, state TEXT NOT NULL,
    dirty INTEGER NOT NULL, PRIMARY KEY (m, node, bin)
);
"""


@dataclass
class BatchRow:
    id: int
    created: float
    first_a: float
    points: int
    bytes: int
    replay: bool
    state: int
    msg: bytes


@dataclass
class KeyStatus:
    m: str
    node: str
    hour: int
    count: int
    hash: str
    dirty: bool
    partner_count: int | None
    partner_hash: str | None
    matched: bool
    replay_batch: int | None


class Archive:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        self.running: dict[tuple[str, str, int], KeyDigest] = {}
        if self.meta("epoch") is None:
            # Batch ids are "<epoch>-<n>": a re-created archive never reuses an id the partner has seen.
            self.set_meta("epoch", secrets.token_hex(4))

    def meta(self, k: str) -> str | None:
        row = self.db.execute("SELECT v FROM meta WHERE k = ?", (k,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, k: str, v: str) -> None:
        self.db.execute("INSERT INTO meta(k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v", (k, v))

    @property
    def epoch(self) -> str:
        return self.meta("epoch") or ""

    def applied_offset(self) -> int:
        return int(self.meta("applied_offset") or -1)

    def next_id(self) -> int:
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'batch'").fetchone()
        return (int(row[0]) if row else 0) + 1

    def bid(self, batch_id: int) -> str:
        return f"{self.epoch}-{batch_id}"

    @staticmethod
    def parse_bid(bid: str, epoch: str) -> int | None:
        e, _, n = bid.partition("-")
        return int(n) if e == epoch and n.isdigit() else None

    # -- packer ---------------------------------------------------------------------------
    def commit_batch(self, batch_id: int | None, msg: bytes | None, segments: list[Segment], first_a: float,
                     replay: bool, applied_offset: int | None, agg_rows: list[tuple[str, str, int, str, str, int]]) -> None:
        """One transaction: the batch, its keys, dirty digests, aggregation state, applied offset.
        Then the running digests are fed (they are only trusted from a key's first batch on)."""
        keys = list(dict.fromkeys(s.key for s in segments if s.ts))
        fresh = {}
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if msg is not None and batch_id is not None:
                self.db.execute(
                    "INSERT INTO batch(id, created, first_a, points, bytes, replay, msg) VALUES (?,?,?,?,?,?,?)",
                    (batch_id, time.time(), first_a, sum(len(s.ts) for s in segments), len(msg), int(replay), msg))
                self.db.executemany("INSERT INTO batch_key(batch_id, m, node, hour) VALUES (?,?,?,?)",
                                    [(batch_id, *k) for k in keys])
                for k in keys:
                    if k not in self.running:
                        fresh[k] = self.db.execute("SELECT 1 FROM digest WHERE m = ? AND node = ? AND hour = ?", k).fetchone() is None
                self.db.executemany(
                    "INSERT INTO digest(m, node, hour) VALUES (?,?,?) ON CONFLICT(m, node, hour) DO UPDATE SET dirty = 1",
                    keys)
            if agg_rows:
                self.db.executemany(
                    "INSERT INTO agg(m, node, bin, tags, state, dirty) VALUES (?,?,?,?,?,?) "
                    "ON CONFLICT(m, node, bin) DO UPDATE SET tags = excluded.tags, state = excluded.state, dirty = excluded.dirty",
                    agg_rows)
            if applied_offset is not None:
                self.db.execute("INSERT INTO meta(k, v) VALUES ('applied_offset', ?) "
                                "ON CONFLICT(k) DO UPDATE SET v = excluded.v", (str(applied_offset),))
        if msg is None or batch_id is None:
            return
        for seg in segments:
            if not seg.ts:
                continue
            run = self.running.get(seg.key)
            if run is None:
                run = self.running[seg.key] = KeyDigest(len(seg.canon), valid=fresh.get(seg.key, False))
            run.feed(seg.ts, seg.canon, seg.others, seg.ordered)

    def agg_load(self, m: str, node: str, bin_t: int) -> tuple[dict[str, str], dict[str, list[float]]] | None:
        row = self.db.execute("SELECT tags, state FROM agg WHERE m = ? AND node = ? AND bin = ?", (m, node, bin_t)).fetchone()
        return None if row is None else (json.loads(row[0]), json.loads(row[1]))

    def agg_dirty(self) -> list[tuple[str, str, int, dict[str, str], dict[str, list[float]]]]:
        return [(r[0], r[1], int(r[2]), json.loads(r[3]), json.loads(r[4]))
                for r in self.db.execute("SELECT m, node, bin, tags, state FROM agg WHERE dirty = 1")]

    # -- sender ---------------------------------------------------------------------------
    def pending_ids(self, limit: int) -> list[tuple[int, int]]:
        """(id, bytes) of the oldest unacknowledged batches, without their bodies."""
        return [(int(r[0]), int(r[1])) for r in self.db.execute(
            "SELECT id, bytes FROM batch WHERE state = 0 ORDER BY id LIMIT ?", (limit,))]

    def message(self, batch_id: int) -> bytes | None:
        row = self.db.execute("SELECT msg FROM batch WHERE id = ?", (batch_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def pending_stats(self) -> tuple[int, int, float | None]:
        n, b, a = self.db.execute("SELECT count(*), coalesce(sum(bytes), 0), min(first_a) FROM batch WHERE state = 0").fetchone()
        return int(n), int(b), a

    def mark(self, results: list[tuple[int, int, str | None]]) -> None:
        now = time.time()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("UPDATE batch SET state = ?, acked_at = ?, reason = ? WHERE id = ? AND state = 0",
                                [(st, now, reason, i) for i, st, reason in results])

    def counts(self) -> dict[str, int]:
        out = {"pending": 0, "acked": 0, "rejected": 0}
        names = {PENDING: "pending", ACKED: "acked", REJECTED: "rejected"}
        for st, n in self.db.execute("SELECT state, count(*) FROM batch GROUP BY state"):
            out[names[int(st)]] = int(n)
        return out

    # -- digests and replay ----------------------------------------------------------------
    def _batch_points(self, ids: list[int], cache: dict[int, list[Point]]) -> Iterator[tuple[int, list[Point]]]:
        for i in ids:
            if i not in cache:
                row = self.db.execute("SELECT msg FROM batch WHERE id = ?", (i,)).fetchone()
                if row is None:
                    continue
                _manifest, body = split_batch(row[0])
                cache[i] = decode_body(body)
            yield i, cache[i]

    def key_points(self, m: str, node: str, hour: int, cache: dict[int, list[Point]]) -> dict[int, Point]:
        """Last-write-wins view of what we sent for one key (as the partner's InfluxDB would hold it)."""
        ids = [int(r[0]) for r in self.db.execute(
            "SELECT batch_id FROM batch_key WHERE m = ? AND node = ? AND hour = ? ORDER BY batch_id", (m, node, hour))]
        out: dict[int, Point] = {}
        for _i, pts in self._batch_points(ids, cache):
            for p in pts:
                if p.m == m and p.node == node and hour <= p.t < hour + 3600:
                    prev = out.get(p.t)
                    if prev is not None and prev.tags == p.tags:
                        prev.fields.update(p.fields)  # InfluxDB merges fields of the same point
                    else:
                        out[p.t] = Point(p.m, dict(p.tags), p.t, dict(p.fields), p.seq)
        return out

    def refresh_digests(self, settled_before: float, spec_for: Callable[[str], Spec | None]) -> int:
        """Finish dirty digests of hours that ended before `settled_before`. Returns how many."""
        busy = self.key_has_pending()  # finished once their batches are acknowledged
        rows = [r for r in self.db.execute("SELECT m, node, hour FROM digest WHERE dirty = 1 AND hour + 3600 <= ?",
                                           (settled_before,)).fetchall() if (r[0], r[1], int(r[2])) not in busy]
        cache: dict[int, list[Point]] = {}
        updates = []
        for m, node, hour in rows:
            key = (m, node, int(hour))
            run = self.running.pop(key, None)
            if run is not None and run.valid:
                n, h = run.result()
            else:
                spec = spec_for(m) or ()
                pts = self.key_points(m, node, hour, cache)
                n, h = digest_points({t: p.fields for t, p in pts.items()}, spec)
                if len(cache) > 256:
                    cache.clear()
            updates.append((n, h, m, node, hour))
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("UPDATE digest SET count = ?, hash = ?, dirty = 0, matched = 0 "
                                "WHERE m = ? AND node = ? AND hour = ?", updates)
        return len(updates)

    def keys(self, since_hour: int) -> list[KeyStatus]:
        return [KeyStatus(r[0], r[1], int(r[2]), int(r[3]), r[4], bool(r[5]), r[6], r[7], bool(r[8]), r[9])
                for r in self.db.execute(
                    "SELECT m, node, hour, count, hash, dirty, partner_count, partner_hash, matched, replay_batch "
                    "FROM digest WHERE hour >= ? ORDER BY hour, m, node", (since_hour,))]

    def key_has_pending(self) -> set[tuple[str, str, int]]:
        return {(r[0], r[1], int(r[2])) for r in self.db.execute(
            "SELECT DISTINCT k.m, k.node, k.hour FROM batch_key k JOIN batch b ON b.id = k.batch_id WHERE b.state = 0")}

    def record_partner(self, rows: list[tuple[str, str, int, int, str | None, bool, int | None]]) -> None:
        now = time.time()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(
                "UPDATE digest SET partner_count = ?, partner_hash = coalesce(?, partner_hash), matched = ?, checked = ?, "
                "replay_batch = ? WHERE m = ? AND node = ? AND hour = ?",
                [(pc, ph, int(ok), now, rb, m, node, hour) for m, node, hour, pc, ph, ok, rb in rows])

    def prune(self, cutoff_hour: int) -> int:
        """Forget hours before `cutoff_hour`, and acknowledged batches no key refers to any more."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            for k in [k for k in self.running if k[2] < cutoff_hour]:
                del self.running[k]
            self.db.execute("DELETE FROM batch_key WHERE hour < ?", (cutoff_hour,))
            self.db.execute("DELETE FROM digest WHERE hour < ?", (cutoff_hour,))
            self.db.execute("DELETE FROM agg WHERE bin < ? AND dirty = 0", (cutoff_hour,))
            cur = self.db.execute("DELETE FROM batch WHERE state != 0 AND id NOT IN (SELECT batch_id FROM batch_key)")
            return int(cur.rowcount)

    def close(self) -> None:
        self.db.close()


def summary(path: Path, since_hour: int) -> dict[str, Any]:
    """Read-only view for `twinedge mirror status` (safe while the gateway runs: WAL)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        counts = {"pending": 0, "acked": 0, "rejected": 0}
        names = {PENDING: "pending", ACKED: "acked", REJECTED: "rejected"}
        for st, n in db.execute("SELECT state, count(*) FROM batch GROUP BY state"):
            counts[names[int(st)]] = int(n)
        pend = db.execute("SELECT coalesce(sum(points), 0), min(first_a) FROM batch WHERE state = 0").fetchone()
        keys = db.execute("SELECT m, node, hour, count, partner_count, matched, dirty FROM digest WHERE hour >= ? "
                          "ORDER BY hour, m, node", (since_hour,)).fetchall()
        reasons = db.execute("SELECT reason, count(*) FROM batch WHERE state = 2 GROUP BY reason").fetchall()
        return {"batches": counts, "pending_points": int(pend[0]), "oldest_pending_at": pend[1],
                "keys": keys, "rejected_reasons": dict(reasons)}
    finally:
        db.close()
