"""End-to-end accounting: every sample the node took, found in InfluxDB exactly once, with
the value the node stored, the calibrated value the simulated world implies, and the tags.

Sources of truth:
- the node's flash ring (`ring.bin`): seq, time, flags, present mask and fixed-point values
  of every reading it took (kept in its slot until overwritten `ring` readings later);
- the node's console (emulated boards): the wall time of each sample and, by line order,
  the config in force when it was taken;
- the simulated world's history (emulated boards): what the sensors measured;
- InfluxDB, polled every `POLL_S` seconds: when each point first became queryable.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Callable
from typing import Any, Protocol

from hil_tests.rig.model import F_UNSYNCED, INTEGER_FIELDS, NodeSpec, Ring, Sample, present_fields, scale_of
from hil_tests.rig.oracle import Expected
from hil_tests.rig.stack import Stack

POLL_S = 0.2


class InfluxWatcher:
    """Polls each city's database; remembers when each (node, measurement, time) first showed up."""

    def __init__(self, stack: Stack, on_poll: list[Callable[[], object]] | None = None) -> None:
        self.stack = stack
        self.on_poll = list(on_poll or [])  # e.g. snapshot each node's ring (its slots are reused)
        self.first_seen: dict[tuple[str, str, int], float] = {}
        self.rows: dict[tuple[str, str, int], dict[str, Any]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="influx-watcher", daemon=True)

    def start(self) -> "InfluxWatcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def poll(self) -> None:
        for fn in self.on_poll:
            try:
                fn()
            except OSError:
                pass
        for city in self.stack.cities:
            pts = self.stack.points(city)
            if pts is None:
                continue  # InfluxDB down: keep what was last seen
            now = time.time()
            fresh = {}
            for p in pts:
                key = (str(p.get("node")), p["_measurement"], int(p["time"]))
                fresh[key] = p
            with self._lock:
                for key in fresh:
                    self.first_seen.setdefault(key, now)
                # the city's rows are what InfluxDB holds now (a deleted point disappears)
                self.rows = {k: v for k, v in self.rows.items() if v.get("city") != city and k not in fresh}
                self.rows.update(fresh)

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self.poll()

    def node_rows(self, spec: NodeSpec) -> dict[int, dict[str, Any]]:
        with self._lock:
            return {k[2]: dict(v) for k, v in self.rows.items() if k[0] == spec.node}

    def seen_at(self, spec: NodeSpec, t: int) -> float | None:
        with self._lock:
            return self.first_seen.get((spec.node, spec.measurement, t))


class Board(Protocol):
    """What the accountant needs from a node of either backend."""

    spec: NodeSpec
    backend: str

    def ring(self) -> Ring: ...
    def sample_walls(self) -> dict[int, float]: ...
    def expectation(self, seq: int) -> list[Expected] | None: ...


@dataclass
class NodeFigures:
    node: str
    city: str
    domain: str
    taken: int = 0
    landed: int = 0
    duplicated: int = 0  # points in InfluxDB beyond one per sample (none can be a real sample)
    lost: int = 0  # taken, not in InfluxDB, and not reported as dropped by the node
    dropped: int = 0  # reported by the node (ring overflow), status `drop`
    wrong: int = 0  # landed with a value, tag or flag different from what was sampled
    unchecked: int = 0  # samples whose world could not be pinned down (none expected)
    latencies_s: list[float] = field(default_factory=list)
    recovery_s: float | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class Figures:
    scenario: str
    backend: str
    verdict: str = "pass"
    taken: int = 0
    landed: int = 0
    duplicated: int = 0
    lost: int = 0
    dropped: int = 0
    wrong: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    recovery_s: float | None = None
    redelivered: int = 0  # duplicates the gateway recognised and skipped (since its last start)
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    nodes: list[NodeFigures] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for n in d["nodes"]:
            n.pop("latencies_s", None)
        return d


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1]


def account_node(board: Board, watcher: InfluxWatcher, cut: int, first: int = 1,
                 fault_end: float | None = None, allow_drops: bool = False) -> NodeFigures:
    spec = board.spec
    nf = NodeFigures(spec.node, spec.city, spec.domain)
    ring = board.ring()
    walls = board.sample_walls()
    rows = watcher.node_rows(spec)
    seqs = sorted({s for s in set(ring.samples) | set(walls) if first <= s <= cut})
    nf.taken = len(seqs)
    nf.dropped = ring.drop
    by_time: dict[int, list[Sample]] = {}
    for s in ring.samples.values():
        by_time.setdefault(s.t, []).append(s)
    for t, group in by_time.items():
        if len(group) > 1 and any(first <= g.seq <= cut for g in group):
            nf.problems.append(f"samples {[g.seq for g in group]} share the second {t}: InfluxDB keeps one point "
                               "per second (raise interval_s/speed)")
    missing: list[int] = []
    for seq in seqs:
        smp = ring.samples.get(seq)
        if smp is None:
            missing.append(seq)  # overwritten in the ring before it was sent (counted as dropped)
            continue
        row = rows.get(smp.t)
        if row is None or row.get("_measurement") != spec.measurement:
            missing.append(seq)
            continue
        nf.landed += 1
        bad = _compare(spec, smp, row)
        exp = board.expectation(seq)
        if not exp:
            if board.backend == "emulated":
                nf.unchecked += 1
        else:
            bad += _oracle(spec, smp, exp)
        if bad:
            nf.wrong += 1
            if len(nf.problems) < 8:
                nf.problems.append(f"seq {seq}: " + "; ".join(bad))
        seen = watcher.seen_at(spec, smp.t)
        wall = walls.get(seq, float(smp.t))  # a real board: the reading's own (1 s) clock
        if seen is not None:
            nf.latencies_s.append(max(0.0, seen - wall))
            if fault_end is not None and wall < fault_end:
                nf.recovery_s = max(nf.recovery_s or 0.0, seen - fault_end)
    known_t = {s.t for s in ring.samples.values()}
    nf.duplicated = sum(1 for t in rows if t not in known_t)
    if nf.duplicated:
        extra = sorted(t for t in rows if t not in known_t)[:5]
        nf.problems.append(f"{nf.duplicated} point(s) in InfluxDB match no sample (times {extra})")
    nf.lost = max(0, len(missing) - (nf.dropped if allow_drops else 0))
    if nf.lost:
        nf.problems.append(f"{nf.lost} sample(s) not in InfluxDB: seq {missing[:10]}")
    if nf.recovery_s is not None:
        nf.recovery_s = max(0.0, nf.recovery_s)
    return nf


def _close(a: float, b: float, tol: float) -> bool:
    return abs(float(a) - float(b)) <= tol + 1e-9


def _compare(spec: NodeSpec, smp: Sample, row: dict[str, Any]) -> list[str]:
    """InfluxDB point versus the node's own record of the sample."""
    bad = []
    for tag, want in (("city", spec.city), ("domain", spec.domain), ("node", spec.node), ("site", spec.site)):
        if row.get(tag) != want:
            bad.append(f"tag {tag}={row.get(tag)!r}, want {want!r}")
    fields = {k for k in row if k not in ("time", "city", "domain", "node", "site", "origin", "_measurement", "unsynced")}
    want_fields = present_fields(spec.domain, smp.mask)
    if fields != want_fields:
        bad.append(f"fields {sorted(fields)} but the node stored {sorted(want_fields)}")
    for name in fields & want_fields:
        got = row[name]
        if name in INTEGER_FIELDS and not isinstance(got, int):
            bad.append(f"{name}={got!r} is not an integer")
        if not _close(got, smp.values[name], 0.5 / scale_of(spec.domain, name)):
            bad.append(f"{name}={got} but the node stored {smp.values[name]}")
    unsynced = bool(row.get("unsynced", False))
    if unsynced != bool(smp.flags & F_UNSYNCED):
        bad.append(f"unsynced={unsynced} but the node's flag is {bool(smp.flags & F_UNSYNCED)}")
    return bad


def _oracle(spec: NodeSpec, smp: Sample, candidates: list[Expected]) -> list[str]:
    """The stored sample versus what the simulated world and the calibration in force imply.
    Several candidates when the world changed within the sample's pick-up window."""
    have = set(smp.values)
    reasons = []
    for exp in candidates:
        if not exp.present <= have or not have <= exp.present | exp.optional:
            reasons.append(f"present {sorted(have)}, world says {sorted(exp.present)}")
            continue
        off = [f"{k}={smp.values[k]} want {exp.values[k]:.4g}±{exp.tolerance.get(k, 0):.3g}" for k in sorted(have)
               if k in exp.values and not _close(smp.values[k], exp.values[k], exp.tolerance.get(k, 0.0))]
        if not off:
            return []
        reasons.append(", ".join(off))
    return ["not what the world and the calibration imply: " + " | ".join(reasons)]


def summarise(name: str, backend: str, per_node: list[NodeFigures], redelivered: int = 0) -> Figures:
    f = Figures(name, backend, nodes=per_node, redelivered=redelivered)
    lat: list[float] = []
    for n in per_node:
        f.taken += n.taken
        f.landed += n.landed
        f.duplicated += n.duplicated
        f.lost += n.lost
        f.dropped += n.dropped
        f.wrong += n.wrong + n.unchecked
        lat += n.latencies_s
        if n.recovery_s is not None:
            f.recovery_s = max(f.recovery_s or 0.0, n.recovery_s)
        f.problems += [f"{n.node}: {p}" for p in n.problems]
        if n.unchecked:
            f.problems.append(f"{n.node}: {n.unchecked} sample(s) could not be checked against the world")
    p50, p99 = _pct(lat, 50), _pct(lat, 99)
    f.p50_ms = round(p50 * 1000) if p50 is not None else None
    f.p99_ms = round(p99 * 1000) if p99 is not None else None
    if f.recovery_s is not None:
        f.recovery_s = round(f.recovery_s, 2)
    if f.lost or f.duplicated or f.wrong or f.problems:
        f.verdict = "fail"
    if f.taken == 0:
        f.verdict = "fail"
        f.problems.append("no samples taken")
    return f
