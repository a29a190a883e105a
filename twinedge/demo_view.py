"""What the demo shows: the live per-city view and the final summary (rich renderables)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from twinedge.demo import CitySide, Summary, TwinDemo


@dataclass
class LiveState:
    """Per-city figures between refreshes (rates need the previous sample)."""

    history: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # (time, accepted) per city
    rates: dict[str, float] = field(default_factory=dict)
    snaps: dict[str, dict[str, Any]] = field(default_factory=dict)
    alarms: dict[str, list[str]] = field(default_factory=dict)
    alarm_counts: dict[str, int] = field(default_factory=dict)
    mirror: dict[str, tuple[int, int]] = field(default_factory=dict)
    slow_at: float = 0.0

    def refresh(self, demo: TwinDemo, slow_every_s: float = 5.0) -> None:
        now = time.time()
        for side in demo.sides.values():
            snap = demo.snapshot(side)
            self.snaps[side.name] = snap
            # readings arrive in batches: a rate over the last ~10 s reads steadier than per refresh
            h = self.history.setdefault(side.name, [])
            h.append((now, snap["accepted"]))
            while len(h) > 2 and now - h[0][0] > 10:
                h.pop(0)
            if len(h) >= 2 and h[-1][0] > h[0][0]:
                self.rates[side.name] = max(0.0, h[-1][1] - h[0][1]) / (h[-1][0] - h[0][0])
        if now - self.slow_at >= slow_every_s:  # InfluxDB queries: every few seconds is enough
            self.slow_at = now
            since = int(max(demo.started_at - 30, now - 600))
            for side in demo.sides.values():
                self.alarms[side.name] = demo.recent_alarms(side)
                self.alarm_counts[side.name] = demo.alarm_count(side)
                try:
                    shared, held, _notes = demo.mirror_check(side, since, settle_s=5)
                    self.mirror[side.name] = (shared, held)
                except OSError:
                    pass


def _secs(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.1f} s"


def _pct(held: int, shared: int) -> str:
    return f"{100.0 * held / shared:.1f} %" if shared else "—"


WIDE_ONLY = {"local time (world)", "accepted", "probe faults now", "health"}


def live_view(demo: TwinDemo, st: LiveState, duration: float, width: int = 200) -> RenderableType:
    elapsed = time.time() - demo.started_at
    a, b = demo.cfg.cities
    pol = demo.policy
    head = Text.assemble(
        ("TwinEdge twin-city demo ", "bold"), (f"{a} ⇄ {b}", "bold cyan"),
        f"   partnership {pol.policy if pol else '?'} v{pol.version if pol else '?'}",
        f"   running {_hms(elapsed)}" + (f" of {_hms(duration)}" if duration else "") + "   Ctrl-C stops everything",
    )
    t = Table(expand=False)
    cols = (("city", False), ("local time (world)", False), ("nodes online", True), ("readings/s", True),
            ("accepted", True), ("InfluxDB lag", True), ("mirror lag", True), ("mirror complete", True),
            ("dead letters", True), ("alarms", True), ("probe faults now", True), ("health", False))
    keep = [i for i, (c, _r) in enumerate(cols) if width >= 150 or c not in WIDE_ONLY]  # narrow terminals
    for i in keep:
        t.add_column(cols[i][0], justify="right" if cols[i][1] else "left")
    for side in demo.sides.values():
        s = st.snaps.get(side.name, {})
        shared, held = st.mirror.get(side.name, (0, 0))
        row = (
            side.name, demo.world.clock(side.name), f"{s.get('online', 0)}/{len(side.nodes)}",
            f"{st.rates.get(side.name, 0.0):.1f}", f"{s.get('accepted', 0):,.0f}", _secs(s.get("influx_lag")),
            _secs(s.get("mirror_lag")), _pct(held, shared), f"{s.get('dead_letters', 0):,.0f}",
            str(st.alarm_counts.get(side.name, 0)), str(demo.world.active_faults(side.name)),
            "[green]healthy[/green]" if s.get("healthy") else "[yellow]degraded[/yellow]",
        )
        t.add_row(*(row[i] for i in keep))
    parts: list[RenderableType] = [head, t]
    for side in demo.sides.values():
        lines = [f"  alarm  {x}" for x in st.alarms.get(side.name, [])] + \
                [f"  world  {x}" for x in demo.world.recent(side.name, 3)]
        parts.append(Text(f"{side.name}: " + ("recent alarms and events" if lines else "no alarms yet"), style="bold"))
        parts += [Text(x) for x in lines]
    return Group(*parts)


def headless_line(demo: TwinDemo, st: LiveState, side: CitySide) -> str:
    s = st.snaps.get(side.name, {})
    shared, held = st.mirror.get(side.name, (0, 0))
    return (f"{_hms(time.time() - demo.started_at)} {side.name}: {s.get('online', 0)}/{len(side.nodes)} nodes online, "
            f"{st.rates.get(side.name, 0.0):.1f} readings/s, {s.get('accepted', 0):,.0f} accepted, InfluxDB lag "
            f"{_secs(s.get('influx_lag'))}, mirror lag {_secs(s.get('mirror_lag'))}, mirrored {_pct(held, shared)}, "
            f"{s.get('dead_letters', 0):,.0f} dead letters, {st.alarm_counts.get(side.name, 0)} alarms")


def summary_table(summary: Summary) -> Table:
    t = Table(title="demo summary")
    for col in ("city", "nodes reported", "readings taken", "acknowledged", "in InfluxDB", "left on node flash",
                "dead letters", "alarms", "mirrored to partner", "verdict"):
        t.add_column(col, justify="left" if col in ("city", "verdict", "mirrored to partner") else "right")
    for c in summary.cities:
        mirror = (f"{c.mirror_held:,}/{c.mirror_shared:,} = {c.mirror_pct:.1f} %" if c.mirror_pct is not None
                  else "nothing shared yet")
        problems = []
        if c.reported < c.nodes:
            problems.append(f"{c.nodes - c.reported} node(s) silent")
        if c.missing:
            problems.append(f"{c.missing} reading(s) missing in InfluxDB")
        if c.on_flash:
            problems.append(f"{c.on_flash} reading(s) not sent")
        if c.mirror_held < c.mirror_shared:
            problems.append(f"{c.mirror_shared - c.mirror_held} point(s) not at the partner")
        verdict = "[green]complete[/green]" if c.complete else "[red]" + "; ".join(problems) + "[/red]"
        t.add_row(c.city, f"{c.reported}/{c.nodes}", f"{c.taken:,}", f"{c.acked:,}", f"{c.in_influx:,}",
                  f"{c.on_flash:,}", f"{c.dead_letters:,}", f"{c.alarms:,}", mirror, verdict)
    return t


def where_lines(demo: TwinDemo) -> list[str]:
    w = demo.workdir
    out = [f"data lives in {w}:"]
    for side in demo.sides.values():
        d = side.workdir
        out.append(f"  {side.name}: InfluxDB {d / 'influxdb'} (databases twinedge, twinedge_partner; look again with "
                   f"`influxd -config {d / 'influxdb' / 'influxdb.conf'}`), gateway log and dead letters "
                   f"{d / f'gw-{side.name}-gw1'}, broker {d / 'mosquitto'}, node flash {d / 'nodes'}")
    out.append(f"  registry {w / 'registry'}, secrets {w / 'secrets'}, what provisioning printed {w / 'provisioning.log'}")
    return out


def grafana_lines(demo: TwinDemo) -> list[str]:
    out = []
    for side in demo.sides.values():
        g = demo.grafana_dir / side.name
        out.append(f"  {side.name}: dashboards {g / 'dashboards'}  provisioning {g / 'provisioning'}")
    return out


def _hms(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"
